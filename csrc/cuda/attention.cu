// Fused SAGAN attention in CUDA: forward, backward and double backward without the N x N map.
//
// Deliberately simple (written and compiled without a GPU to run it): one thread block of kThreads
// per query row (row passes) or per key column (column passes). A block walks the other index in
// tiles of kThreads; each thread forms one pair's scalars (S, P, dP, ...; dot products over Dk or
// Dv), the block reduces row statistics in shared memory, and weighted sums of vectors are
// accumulated one channel per thread from a shared tile of weights. Column passes recompute P from
// the saved lse instead of reducing across blocks, so there are no atomics and results are
// deterministic. The math of each pass is derived in docs/ops/attention.md.
#include "cuda/attention.h"

#include <cuda_runtime.h>

namespace skd::cuda {
namespace {

constexpr int kThreads = 128;

__device__ inline float exp_acc(float x) { return expf(x); }
__device__ inline double exp_acc(double x) { return exp(x); }
__device__ inline float log_acc(float x) { return logf(x); }
__device__ inline double log_acc(double x) { return log(x); }

template <typename T>
__device__ T dot(const T* x, const T* y, int64_t d) {
  T s = 0;
  for (int64_t c = 0; c < d; ++c) s += x[c] * y[c];
  return s;
}

// The block's threads' values reduced by `op` (a tree over shared memory); every thread gets it.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* shm, Op op) {
  shm[threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) shm[threadIdx.x] = op(shm[threadIdx.x], shm[threadIdx.x + w]);
    __syncthreads();
  }
  const T r = shm[0];
  __syncthreads();
  return r;
}

struct Add { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { template <typename T> __device__ T operator()(T a, T b) const { return fmax(a, b); } };

template <typename T>
__device__ T block_sum(T v, T* shm) { return block_reduce(v, shm, Add{}); }
template <typename T>
__device__ T block_max(T v, T* shm) { return block_reduce(v, shm, Max{}); }

// out[c] (+)= sum_{j < n} weight(j) y[j * d + c] for c < d, one channel per thread; the weights of
// a tile of kThreads indices are computed once per channel chunk and shared through `w`.
template <typename T, typename Weight>
__device__ void accumulate(int64_t n, const T* y, int64_t d, T* out, bool add, T* w, Weight weight) {
  for (int64_t c0 = 0; c0 < d; c0 += blockDim.x) {
    const int64_t c = c0 + threadIdx.x;
    T acc = 0;
    for (int64_t j0 = 0; j0 < n; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      w[threadIdx.x] = j < n ? weight(j) : T(0);
      __syncthreads();
      const int64_t count = n - j0 < blockDim.x ? n - j0 : blockDim.x;
      if (c < d)
        for (int64_t t = 0; t < count; ++t) acc += w[t] * y[(j0 + t) * d + c];
      __syncthreads();
    }
    if (c < d) out[c] = add ? out[c] + acc : acc;
  }
}

template <typename T>
__device__ const T* row_of(const void* base, int64_t b, int64_t n, int64_t i, int64_t d) {
  return static_cast<const T*>(base) + (b * n + i) * d;
}
template <typename T>
__device__ T* row_of(void* base, int64_t b, int64_t n, int64_t i, int64_t d) {
  return static_cast<T*>(base) + (b * n + i) * d;
}

// One block per (query row i = blockIdx.x, image b = blockIdx.y): lse_i and out_i.
template <typename T>
__global__ void forward_rows(AttentionProblem p) {
  __shared__ T shm[kThreads];
  __shared__ T w[kThreads];
  const int64_t i = blockIdx.x, b = blockIdx.y, n = p.n;
  const T* q = row_of<T>(p.q, b, n, i, p.dk);
  const T* k = row_of<T>(p.k, b, n, 0, p.dk);
  T m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmax(m, dot(q, k + j * p.dk, p.dk));
  m = block_max(m, shm);
  T z = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) z += exp_acc(dot(q, k + j * p.dk, p.dk) - m);
  z = block_sum(z, shm);
  const T lse = m + log_acc(z);
  if (threadIdx.x == 0) static_cast<T*>(p.lse)[b * n + i] = lse;
  accumulate(n, row_of<T>(p.v, b, n, 0, p.dv), p.dv, row_of<T>(p.out, b, n, i, p.dv), false, w,
             [&](int64_t j) { return exp_acc(dot(q, k + j * p.dk, p.dk) - lse); });
}

// Backward, rows: D_i = sum_j P dP (stored), dq_i = sum_j P (dP - D_i) k_j.
template <typename T>
__global__ void backward_rows(AttentionProblem p) {
  __shared__ T shm[kThreads];
  __shared__ T w[kThreads];
  const int64_t i = blockIdx.x, b = blockIdx.y, n = p.n;
  const T *q = row_of<T>(p.q, b, n, i, p.dk), *k = row_of<T>(p.k, b, n, 0, p.dk);
  const T *dout = row_of<T>(p.dout, b, n, i, p.dv), *v = row_of<T>(p.v, b, n, 0, p.dv);
  const T lse = static_cast<const T*>(p.lse)[b * n + i];
  T d = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    d += exp_acc(dot(q, k + j * p.dk, p.dk) - lse) * dot(dout, v + j * p.dv, p.dv);
  d = block_sum(d, shm);
  if (threadIdx.x == 0) static_cast<T*>(p.row_stats)[b * n + i] = d;
  accumulate(n, k, p.dk, row_of<T>(p.grad_q, b, n, i, p.dk), false, w, [&](int64_t j) {
    return exp_acc(dot(q, k + j * p.dk, p.dk) - lse) * (dot(dout, v + j * p.dv, p.dv) - d);
  });
}

// Backward, columns (key j = blockIdx.x): dv_j = sum_i P dout_i, dk_j = sum_i P (dP - D_i) q_i.
template <typename T>
__global__ void backward_columns(AttentionProblem p) {
  __shared__ T w[kThreads];
  const int64_t j = blockIdx.x, b = blockIdx.y, n = p.n;
  const T *k = row_of<T>(p.k, b, n, j, p.dk), *q = row_of<T>(p.q, b, n, 0, p.dk);
  const T *v = row_of<T>(p.v, b, n, j, p.dv), *dout = row_of<T>(p.dout, b, n, 0, p.dv);
  const T *lse = static_cast<const T*>(p.lse) + b * n, *d = static_cast<const T*>(p.row_stats) + b * n;
  accumulate(n, dout, p.dv, row_of<T>(p.grad_v, b, n, j, p.dv), false, w,
             [&](int64_t i) { return exp_acc(dot(q + i * p.dk, k, p.dk) - lse[i]); });
  accumulate(n, q, p.dk, row_of<T>(p.grad_k, b, n, j, p.dk), false, w, [&](int64_t i) {
    return exp_acc(dot(q + i * p.dk, k, p.dk) - lse[i]) * (dot(dout + i * p.dv, v, p.dv) - d[i]);
  });
}

// The scalars of pair (i, j) that the double backward needs (notation of docs/ops/attention.md).
template <typename T>
struct Pair {
  T prob, dp, a, bb;
};

template <typename T>
__device__ Pair<T> pair_terms(const AttentionProblem& p, int64_t b, int64_t i, int64_t j, T lse) {
  const int64_t n = p.n;
  const T *qi = row_of<T>(p.q, b, n, i, p.dk), *kj = row_of<T>(p.k, b, n, j, p.dk);
  const T *oi = row_of<T>(p.dout, b, n, i, p.dv), *vj = row_of<T>(p.v, b, n, j, p.dv);
  Pair<T> t;
  t.prob = exp_acc(dot(qi, kj, p.dk) - lse);
  t.dp = dot(oi, vj, p.dv);
  t.a = 0;
  if (p.gq) t.a += dot(row_of<T>(p.gq, b, n, i, p.dk), kj, p.dk);
  if (p.gk) t.a += dot(qi, row_of<T>(p.gk, b, n, j, p.dk), p.dk);
  t.bb = p.gv ? dot(oi, row_of<T>(p.gv, b, n, j, p.dv), p.dv) : T(0);
  return t;
}

// Double backward, rows: statistics D, Abar, Hbar (stored); grad q_i = sum_j (dS gk_j + dS2 k_j),
// grad dout_i = sum_j (G v_j + P gv_j).
template <typename T>
__global__ void double_backward_rows(AttentionProblem p) {
  __shared__ T shm[kThreads];
  __shared__ T w[kThreads];
  const int64_t i = blockIdx.x, b = blockIdx.y, n = p.n;
  const T lse = static_cast<const T*>(p.lse)[b * n + i];
  T d = 0, abar = 0, c = 0, bbar = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const Pair<T> t = pair_terms<T>(p, b, i, j, lse);
    d += t.prob * t.dp;
    abar += t.prob * t.a;
    c += t.prob * t.dp * t.a;
    bbar += t.prob * t.bb;
  }
  d = block_sum(d, shm);
  abar = block_sum(abar, shm);
  c = block_sum(c, shm);
  bbar = block_sum(bbar, shm);
  const T hbar = c - 2 * d * abar + bbar;
  T* stats = static_cast<T*>(p.row_stats);
  if (threadIdx.x == 0) {
    stats[b * n + i] = d;
    stats[(p.batch + b) * n + i] = abar;
    stats[(2 * p.batch + b) * n + i] = hbar;
  }
  T* grad_q = row_of<T>(p.grad_q, b, n, i, p.dk);
  accumulate(n, row_of<T>(p.k, b, n, 0, p.dk), p.dk, grad_q, false, w, [&](int64_t j) {
    const Pair<T> t = pair_terms<T>(p, b, i, j, lse);
    return t.prob * ((t.dp - d) * t.a - t.dp * abar + t.bb - hbar);
  });
  if (p.gk)
    accumulate(n, row_of<T>(p.gk, b, n, 0, p.dk), p.dk, grad_q, true, w, [&](int64_t j) {
      const Pair<T> t = pair_terms<T>(p, b, i, j, lse);
      return t.prob * (t.dp - d);
    });
  T* grad_dout = row_of<T>(p.grad_dout, b, n, i, p.dv);
  accumulate(n, row_of<T>(p.v, b, n, 0, p.dv), p.dv, grad_dout, false, w, [&](int64_t j) {
    const Pair<T> t = pair_terms<T>(p, b, i, j, lse);
    return t.prob * (t.a - abar);
  });
  if (p.gv)
    accumulate(n, row_of<T>(p.gv, b, n, 0, p.dv), p.dv, grad_dout, true, w,
               [&](int64_t j) { return pair_terms<T>(p, b, i, j, lse).prob; });
}

// Double backward, columns: grad k_j = sum_i (dS gq_i + dS2 q_i), grad v_j = sum_i G dout_i.
template <typename T>
__global__ void double_backward_columns(AttentionProblem p) {
  __shared__ T w[kThreads];
  const int64_t j = blockIdx.x, b = blockIdx.y, n = p.n;
  const T* lse = static_cast<const T*>(p.lse) + b * n;
  const T* stats = static_cast<const T*>(p.row_stats);
  const T *d = stats + b * n, *abar = stats + (p.batch + b) * n, *hbar = stats + (2 * p.batch + b) * n;
  T* grad_k = row_of<T>(p.grad_k, b, n, j, p.dk);
  accumulate(n, row_of<T>(p.q, b, n, 0, p.dk), p.dk, grad_k, false, w, [&](int64_t i) {
    const Pair<T> t = pair_terms<T>(p, b, i, j, lse[i]);
    return t.prob * ((t.dp - d[i]) * t.a - t.dp * abar[i] + t.bb - hbar[i]);
  });
  if (p.gq)
    accumulate(n, row_of<T>(p.gq, b, n, 0, p.dk), p.dk, grad_k, true, w, [&](int64_t i) {
      const Pair<T> t = pair_terms<T>(p, b, i, j, lse[i]);
      return t.prob * (t.dp - d[i]);
    });
  accumulate(n, row_of<T>(p.dout, b, n, 0, p.dv), p.dv, row_of<T>(p.grad_v, b, n, j, p.dv), false, w,
             [&](int64_t i) {
               const Pair<T> t = pair_terms<T>(p, b, i, j, lse[i]);
               return t.prob * (t.a - abar[i]);
             });
}

template <typename T>
void launch_forward(const AttentionProblem& p, cudaStream_t s) {
  forward_rows<T><<<dim3(p.n, p.batch), kThreads, 0, s>>>(p);
}
template <typename T>
void launch_backward(const AttentionProblem& p, cudaStream_t s) {
  backward_rows<T><<<dim3(p.n, p.batch), kThreads, 0, s>>>(p);
  backward_columns<T><<<dim3(p.n, p.batch), kThreads, 0, s>>>(p);
}
template <typename T>
void launch_double_backward(const AttentionProblem& p, cudaStream_t s) {
  double_backward_rows<T><<<dim3(p.n, p.batch), kThreads, 0, s>>>(p);
  double_backward_columns<T><<<dim3(p.n, p.batch), kThreads, 0, s>>>(p);
}

}  // namespace

void attention_forward(const AttentionProblem& p, void* stream) {
  if (p.batch == 0 || p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::Float64) launch_forward<double>(p, s); else launch_forward<float>(p, s);
}

void attention_backward(const AttentionProblem& p, void* stream) {
  if (p.batch == 0 || p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::Float64) launch_backward<double>(p, s); else launch_backward<float>(p, s);
}

void attention_double_backward(const AttentionProblem& p, void* stream) {
  if (p.batch == 0 || p.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::Float64) launch_double_backward<double>(p, s);
  else launch_double_backward<float>(p, s);
}

}  // namespace skd::cuda
