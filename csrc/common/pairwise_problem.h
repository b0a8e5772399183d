// The pair-wise distillation problem's fused passes as every backend sees them: plain pointers,
// sizes and strides. The similarity core (Gram products or tiles of a_ij^s - a_ij^t) runs on the
// platform's float64 GEMM between these two passes; see skd_kernels/ops/pairwise.py.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace skd {

enum class NodePooling : int { None = 0, Max = 1, Avg = 2 };

// How a node's pooled feature p becomes u: Official u = p / (||p|| + 1e-8) with the norm detached
// (the official code); Paper u = p / max(||p||, 1e-12) with the gradient through the norm (F.normalize).
enum class NodeNorm : int { Official = 0, Paper = 1 };

// One feature map (B, C, H, W) and its nodes: windows of window_h x window_w, stride = the window,
// ceil mode (partial windows at the border are nodes too), so every position lies in exactly one
// window. M = nodes_h * nodes_w.
struct PairwiseNodesProblem {
  DType dtype;
  NodePooling pooling;
  NodeNorm norm;
  int64_t batch, channels, height, width;
  int64_t window_h, window_w, nodes_h, nodes_w;
  const void* features; int64_t feature_strides[4];  // in elements, any layout
  // Forward outputs (contiguous): normalised nodes u (B, C, M) in float64, so that the float64
  // similarity core sees the features exactly; 1 / (the normaliser) per node (B, M); for max pooling
  // the flat position h * W + w of each node's maximum (B, C, M; max pooling, and only when the
  // backward will run: nullptr skips tracking it).
  double* nodes;
  double* inv_norm;
  int32_t* argmax;
  // Backward: d loss / d u, given as the similarity core leaves it (B, C, M):
  //   grad_scale * (grad_residual[b, c, m] + grad_bias[b, c] + grad_outer_c[b, c] * grad_outer_q[b, m]),
  // the residual part in float32 or float64 and the low-rank core's rank-2 mean terms in float64
  // (nullptr: absent). d loss / d features is written in the features' dtype, every element exactly
  // once (zero where a max window did not pick it).
  const void* grad_residual; DType grad_dtype;
  const double* grad_bias; const double* grad_outer_c; const double* grad_outer_q;
  double grad_scale;
  void* grad_features; int64_t grad_strides[4];
};

}  // namespace skd
