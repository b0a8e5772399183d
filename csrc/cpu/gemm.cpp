// The CPU GEMM (see gemm.h). Register tiles of R rows by kTileCols columns accumulate over a block
// of K; blocking K keeps the B panel in cache while every row group of the strip reuses it. The
// loops are plain C++ that GCC vectorises; like the other CPU kernels they are compiled twice, for
// AVX2 (x86-64-v3) and the baseline, and picked at load time (the extension is built without
// -march, so it still runs on any x86-64).
#include "cpu/gemm.h"

#include <algorithm>

namespace skd::cpu {
namespace {

template <typename T>
constexpr int kTileCols = 64 / sizeof(T);  // one cache line of C per tile row
constexpr int64_t kBlockK = 128;

template <typename T, int R, bool kFullTile>
inline void gemm_tile(int64_t K, const T* A, int64_t lda, int64_t a_k, const T* B, int64_t ldb, T* C,
                      int64_t ldc, int64_t width, bool accumulate) {
  constexpr int W = kTileCols<T>;
  T c[R][W] = {};
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    for (int r = 0; r < R; ++r) {
      const T a = A[r * lda + k * a_k];
      if constexpr (kFullTile) {
#pragma omp simd
        for (int t = 0; t < W; ++t) c[r][t] += a * b[t];
      } else {
        for (int64_t t = 0; t < width; ++t) c[r][t] += a * b[t];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t t = 0; t < (kFullTile ? W : width); ++t)
      C[r * ldc + t] = accumulate ? C[r * ldc + t] + c[r][t] : c[r][t];
}

template <typename T, int R>
inline void gemm_rows(int64_t cols, int64_t K, const T* A, int64_t lda, int64_t a_k, const T* B, int64_t ldb,
                      T* C, int64_t ldc, bool accumulate) {
  constexpr int W = kTileCols<T>;
  int64_t c0 = 0;
  for (; c0 + W <= cols; c0 += W) gemm_tile<T, R, true>(K, A, lda, a_k, B + c0, ldb, C + c0, ldc, W, accumulate);
  if (c0 < cols) gemm_tile<T, R, false>(K, A, lda, a_k, B + c0, ldb, C + c0, ldc, cols - c0, accumulate);
}

// flatten inlines the tiles into each clone, so every clone's loops are compiled for its ISA.
template <typename T>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void gemm_blocked(int64_t rows, int64_t cols, int64_t K, const T* A, int64_t lda, int64_t a_k, const T* B,
                  int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (K == 0 && !accumulate)
    for (int64_t r = 0; r < rows; ++r) std::fill(C + r * ldc, C + r * ldc + cols, T(0));
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, K - k0);
    const bool acc = accumulate || k0 > 0;
    const T* Ak = A + k0 * a_k;
    int64_t a = 0;
    for (; a + 4 <= rows; a += 4) gemm_rows<T, 4>(cols, kc, Ak + a * lda, lda, a_k, B + k0 * ldb, ldb, C + a * ldc, ldc, acc);
    for (; a < rows; ++a) gemm_rows<T, 1>(cols, kc, Ak + a * lda, lda, a_k, B + k0 * ldb, ldb, C + a * ldc, ldc, acc);
  }
}

}  // namespace

void gemm(int64_t rows, int64_t cols, int64_t K, const float* A, int64_t lda, int64_t a_k, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_blocked(rows, cols, K, A, lda, a_k, B, ldb, C, ldc, accumulate);
}

void gemm(int64_t rows, int64_t cols, int64_t K, const double* A, int64_t lda, int64_t a_k, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_blocked(rows, cols, K, A, lda, a_k, B, ldb, C, ldc, accumulate);
}

}  // namespace skd::cpu
