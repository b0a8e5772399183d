// A small general matrix product for the CPU kernels, sized for the attention strips: a few dozen
// rows against a few hundred columns, with K up to a few thousand.
#pragma once
#include <cstdint>

namespace skd::cpu {

// C (rows x cols) (+)= A (rows x K) B (K x cols). B and C are row-major with leading dimensions ldb
// and ldc; A's element (r, k) is A[r * lda + k * a_k], so a transposed A is read in place. With
// accumulate the product is added to C, otherwise it overwrites C (K = 0 then writes zeros).
void gemm(int64_t rows, int64_t cols, int64_t K, const float* A, int64_t lda, int64_t a_k, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm(int64_t rows, int64_t cols, int64_t K, const double* A, int64_t lda, int64_t a_k, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool accumulate);

}  // namespace skd::cpu
