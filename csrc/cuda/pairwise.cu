// The two fused passes of pair-wise distillation on CUDA: features -> normalised float64 nodes, and
// the gradient back from nodes to features.
//
// Small windows: one thread per node, looping over channels. Neighbouring threads own neighbouring
// nodes, so for node size 1 every channel step is a coalesced load of the map and a coalesced store
// of the nodes; the node's norm needs all its channels, which one thread has. Each thread re-reads
// its own nodes to scale them (L2 hits).
// Large windows (the official 3x3 nodes of 32x32 pixels): that gives too few threads, each walking
// thousands of pixels, so one warp pools one (channel, node) window instead, its lanes reading the
// window's rows coalesced, and a second kernel normalises (one block per node, threads over
// channels); the backward's warps write the window rows the same way.
// Only plain CUDA headers, so this file compiles in seconds.
#include <cuda_runtime.h>

#include <cmath>

#include "cuda/numeric.cuh"
#include "cuda/pairwise.h"

namespace skd::cuda {
namespace {

struct Window { int64_t h0, h1, w0, w1; };

__device__ __forceinline__ Window window(const PairwiseNodesProblem& p, int64_t i, int64_t j) {
  return {i * p.window_h, min((i + 1) * p.window_h, p.height), j * p.window_w, min((j + 1) * p.window_w, p.width)};
}

// The image b, node and window of this thread in the one-thread-per-node kernels (m nodes per image);
// false past the last node.
struct ThreadNode { int64_t b, node, m; Window win; };

__device__ __forceinline__ bool thread_node(const PairwiseNodesProblem& p, ThreadNode& t) {
  t.m = p.nodes_h * p.nodes_w;
  const int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= p.batch * t.m) return false;
  t.b = id / t.m;
  t.node = id % t.m;
  t.win = window(p, t.node / p.nodes_w, t.node % p.nodes_w);
  return true;
}

// The normaliser of a node whose pooled feature has squared norm `sumsq` (see NodeNorm).
__device__ __forceinline__ double inverse_norm(const PairwiseNodesProblem& p, double sumsq) {
  const double norm = sqrt(sumsq);
  return p.norm == NodeNorm::Official ? 1.0 / (norm + 1e-8) : 1.0 / fmax(norm, 1e-12);
}

template <typename Scalar>
__global__ void nodes_forward_kernel(PairwiseNodesProblem p) {
  ThreadNode t;
  if (!thread_node(p, t)) return;
  const auto [b, node, m, win] = t;
  const int64_t* st = p.feature_strides;
  const Scalar* base = static_cast<const Scalar*>(p.features) + b * st[0];
  double sumsq = 0.0;
  for (int64_t c = 0; c < p.channels; ++c) {
    const Scalar* plane = base + c * st[1];
    double acc = p.pooling == NodePooling::Max ? -INFINITY : 0.0;
    int32_t best = int32_t(win.h0 * p.width + win.w0);
    for (int64_t h = win.h0; h < win.h1; ++h) {
      for (int64_t w = win.w0; w < win.w1; ++w) {
        const double v = to_float(plane[h * st[2] + w * st[3]]);
        if (p.pooling != NodePooling::Max) {
          acc += v;
        } else if ((v > acc || isnan(v)) && !isnan(acc)) {  // first maximum; NaN wins (max_pool2d)
          acc = v;
          best = int32_t(h * p.width + w);
        }
      }
    }
    if (p.pooling == NodePooling::Avg) acc /= double((win.h1 - win.h0) * (win.w1 - win.w0));
    p.nodes[(b * p.channels + c) * m + node] = acc;
    if (p.argmax) p.argmax[(b * p.channels + c) * m + node] = best;
    sumsq += acc * acc;
  }
  const double inv = inverse_norm(p, sumsq);
  p.inv_norm[b * m + node] = inv;
  for (int64_t c = 0; c < p.channels; ++c) p.nodes[(b * p.channels + c) * m + node] *= inv;
}

// d loss / d u of one node and channel (see PairwiseNodesProblem).
__device__ __forceinline__ double grad_u(const PairwiseNodesProblem& p, int64_t b, int64_t c, int64_t node, int64_t m) {
  const int64_t k = (b * p.channels + c) * m + node;
  double g = p.grad_dtype == DType::Float32 ? double(static_cast<const float*>(p.grad_residual)[k])
                                            : static_cast<const double*>(p.grad_residual)[k];
  if (p.grad_bias) g += p.grad_bias[b * p.channels + c];
  if (p.grad_outer_c) g += p.grad_outer_c[b * p.channels + c] * p.grad_outer_q[b * m + node];
  return p.grad_scale * g;
}

template <typename Scalar>
__global__ void nodes_backward_kernel(PairwiseNodesProblem p) {
  ThreadNode t;
  if (!thread_node(p, t)) return;
  const auto [b, node, m, win] = t;
  const double inv = p.inv_norm[b * m + node];
  // Paper form: the gradient through the norm projects out the radial part, unless the norm was
  // clamped at 1e-12 (then it is a constant), as F.normalize.
  double radial = 0.0;
  if (p.norm == NodeNorm::Paper && inv < 1e12) {
    for (int64_t c = 0; c < p.channels; ++c) radial += p.nodes[(b * p.channels + c) * m + node] * grad_u(p, b, c, node, m);
  }
  const int64_t* gs = p.grad_strides;
  Scalar* base = static_cast<Scalar*>(p.grad_features) + b * gs[0];
  const double count = double((win.h1 - win.h0) * (win.w1 - win.w0));
  for (int64_t c = 0; c < p.channels; ++c) {
    const int64_t k = (b * p.channels + c) * m + node;
    const double dp = (grad_u(p, b, c, node, m) - p.nodes[k] * radial) * inv;
    Scalar* plane = base + c * gs[1];
    for (int64_t h = win.h0; h < win.h1; ++h) {
      for (int64_t w = win.w0; w < win.w1; ++w) {
        double g = p.pooling == NodePooling::Avg ? dp / count : dp;
        if (p.argmax && p.argmax[k] != h * p.width + w) g = 0.0;
        store(plane + h * gs[2] + w * gs[3], g);
      }
    }
  }
}

// --- large windows ------------------------------------------------------------------------------

constexpr int kWarps = 8;  // per block: one (channel, node) window each
constexpr int32_t kNoIndex = INT32_MAX;

// max_pool2d's pick between two disjoint parts of a window: NaN wins, then the larger value; on a tie
// (or two NaNs) the earlier position, so the result is the first maximum of the whole window.
__device__ __forceinline__ void merge_max(double& v, int32_t& i, double v2, int32_t i2) {
  const bool nan1 = isnan(v), nan2 = isnan(v2);
  const bool take = nan1 != nan2 ? nan2 : (v2 > v || ((v2 == v || nan1) && i2 < i));
  if (take) { v = v2; i = i2; }
}

template <typename Scalar>
__global__ void window_pool_kernel(PairwiseNodesProblem p) {
  const int64_t m = p.nodes_h * p.nodes_w, bn = blockIdx.x, b = bn / m, node = bn % m;
  const int lane = threadIdx.x % 32;
  const Window win = window(p, node / p.nodes_w, node % p.nodes_w);
  const int64_t* st = p.feature_strides;
  for (int64_t c = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32; c < p.channels; c += int64_t(gridDim.y) * kWarps) {
    const Scalar* plane = static_cast<const Scalar*>(p.features) + b * st[0] + c * st[1];
    double acc = p.pooling == NodePooling::Max ? -INFINITY : 0.0;
    int32_t best = kNoIndex;
    for (int64_t h = win.h0; h < win.h1; ++h) {
      for (int64_t w = win.w0 + lane; w < win.w1; w += 32) {  // each lane visits increasing positions
        const double v = to_float(plane[h * st[2] + w * st[3]]);
        if (p.pooling == NodePooling::Avg) acc += v;
        else merge_max(acc, best, v, int32_t(h * p.width + w));
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const double other = __shfl_down_sync(0xffffffffu, acc, offset);
      const int32_t other_index = __shfl_down_sync(0xffffffffu, best, offset);
      if (p.pooling == NodePooling::Avg) acc += other;
      else merge_max(acc, best, other, other_index);
    }
    if (lane == 0) {
      const int64_t k = (b * p.channels + c) * m + node;
      p.nodes[k] = p.pooling == NodePooling::Avg ? acc / double((win.h1 - win.h0) * (win.w1 - win.w0)) : acc;
      if (p.argmax) p.argmax[k] = best;
    }
  }
}

// Sum over the block's threads; every thread gets it. `scratch` holds one double per warp.
__device__ double block_sum(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();  // scratch may still be read from a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += scratch[w];
  return total;
}

__global__ void window_normalise_kernel(PairwiseNodesProblem p) {
  __shared__ double scratch[kWarps];
  const int64_t m = p.nodes_h * p.nodes_w, b = blockIdx.x / m, node = blockIdx.x % m;
  double* u = p.nodes + b * p.channels * m + node;
  double sumsq = 0.0;
  for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x) sumsq += u[c * m] * u[c * m];
  const double inv = inverse_norm(p, block_sum(sumsq, scratch));
  if (threadIdx.x == 0) p.inv_norm[b * m + node] = inv;
  for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x) u[c * m] *= inv;
}

template <typename Scalar>
__global__ void window_backward_kernel(PairwiseNodesProblem p) {
  __shared__ double scratch[kWarps];
  const int64_t m = p.nodes_h * p.nodes_w, b = blockIdx.x / m, node = blockIdx.x % m;
  const int lane = threadIdx.x % 32;
  const Window win = window(p, node / p.nodes_w, node % p.nodes_w);
  const double inv = p.inv_norm[b * m + node];
  // The paper form's radial part needs every channel of the node: each block sums it (the nodes are
  // few when windows are large, so the repeat is cheap).
  double radial = 0.0;
  if (p.norm == NodeNorm::Paper && inv < 1e12) {
    double part = 0.0;
    for (int64_t c = threadIdx.x; c < p.channels; c += blockDim.x)
      part += p.nodes[(b * p.channels + c) * m + node] * grad_u(p, b, c, node, m);
    radial = block_sum(part, scratch);
  }
  const int64_t* gs = p.grad_strides;
  const double count = double((win.h1 - win.h0) * (win.w1 - win.w0));
  for (int64_t c = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32; c < p.channels; c += int64_t(gridDim.y) * kWarps) {
    const int64_t k = (b * p.channels + c) * m + node;
    double dp = (grad_u(p, b, c, node, m) - p.nodes[k] * radial) * inv;
    if (p.pooling == NodePooling::Avg) dp /= count;
    const int32_t best = p.argmax ? p.argmax[k] : kNoIndex;
    Scalar* plane = static_cast<Scalar*>(p.grad_features) + b * gs[0] + c * gs[1];
    for (int64_t h = win.h0; h < win.h1; ++h) {
      for (int64_t w = win.w0 + lane; w < win.w1; w += 32) {
        const bool picked = p.pooling != NodePooling::Max || best == h * p.width + w;
        store(plane + h * gs[2] + w * gs[3], picked ? dp : 0.0);
      }
    }
  }
}

// Windows of at least this many positions take the warp-per-window kernels.
constexpr int64_t kLargeWindow = 8;

bool large_windows(const PairwiseNodesProblem& p) {
  return p.pooling != NodePooling::None && p.window_h * p.window_w >= kLargeWindow;
}

// Blocks: one row per (image, node); enough channel groups to fill the GPU, but not more than the
// channels need.
dim3 window_grid(const PairwiseNodesProblem& p) {
  const int64_t nodes = p.batch * p.nodes_h * p.nodes_w;
  const int64_t groups = (p.channels + kWarps - 1) / kWarps;
  const int64_t wanted = (4096 + nodes - 1) / nodes;  // ~4096 blocks in all
  return dim3(unsigned(nodes), unsigned(groups < wanted ? groups : wanted));
}

template <typename Scalar>
void window_forward(const PairwiseNodesProblem& p, cudaStream_t s) {
  window_pool_kernel<Scalar><<<window_grid(p), kWarps * 32, 0, s>>>(p);
  window_normalise_kernel<<<unsigned(p.batch * p.nodes_h * p.nodes_w), kWarps * 32, 0, s>>>(p);
}

template <typename Scalar>
void window_backward(const PairwiseNodesProblem& p, cudaStream_t s) {
  window_backward_kernel<Scalar><<<window_grid(p), kWarps * 32, 0, s>>>(p);
}

template <template <typename> class Kernel>
void launch(const PairwiseNodesProblem& p, void* stream) {
  const int64_t threads = 128, total = p.batch * p.nodes_h * p.nodes_w;
  if (total == 0) return;
  const dim3 grid(unsigned((total + threads - 1) / threads));
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::Float32: Kernel<float>::launch(grid, threads, s, p); break;
    case DType::Float64: Kernel<double>::launch(grid, threads, s, p); break;
    case DType::Float16: Kernel<__half>::launch(grid, threads, s, p); break;
    case DType::BFloat16: Kernel<__nv_bfloat16>::launch(grid, threads, s, p); break;
  }
}

template <typename Scalar> struct Forward {
  static void launch(dim3 g, int t, cudaStream_t s, const PairwiseNodesProblem& p) {
    if (large_windows(p)) window_forward<Scalar>(p, s);
    else nodes_forward_kernel<Scalar><<<g, t, 0, s>>>(p);
  }
};
template <typename Scalar> struct Backward {
  static void launch(dim3 g, int t, cudaStream_t s, const PairwiseNodesProblem& p) {
    if (large_windows(p)) window_backward<Scalar>(p, s);
    else nodes_backward_kernel<Scalar><<<g, t, 0, s>>>(p);
  }
};

}  // namespace

void pairwise_nodes_forward(const PairwiseNodesProblem& p, void* stream) { launch<Forward>(p, stream); }
void pairwise_nodes_backward(const PairwiseNodesProblem& p, void* stream) { launch<Backward>(p, stream); }

}  // namespace skd::cuda
