// Centring of the float64 nodes for the low-rank similarity core on the CPU (see
// skd_kernels/ops/pairwise/lowrank.py, docs/ops/pairwise.md): the core then works on residuals
// r = u - mean and rank-2 corrections built from the means.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace skd::cpu {

// c = mean over nodes (B, C); r = u - c written as float32 or float64 (B, C, M); q[b, m] = sum_c r c;
// sumsq[b, c] = sum_m r^2. The residual's images lie residual_batch_stride elements apart (>= C M:
// the core stacks the student's and the teacher's residuals, image by image, in one buffer); its
// rows are contiguous.
struct PairwiseCentreProblem {
  int64_t batch, channels, nodes;
  const double* nodes_in;
  void* residual; DType residual_dtype;
  double* mean; double* q; double* sumsq;
  int64_t residual_batch_stride;
};

// The difference form's centring (Cs == Ct): with rs = us - mean_s and rt = ut - mean_t (per
// channel, over the nodes), writes S = (rs + rt) / 2 into rows [0, C) and E = rs - rt into rows
// [C, 2C) of stacked (B, 2C, M), float32 or float64, each rounded once from float64; q_s[b, m] =
// sum_c rs mean_s, q_t likewise (B, M); sumsq (B, 2C): the per-row sums of squares of S and E.
struct PairwiseCentrePairProblem {
  int64_t batch, channels, nodes;
  const double* nodes_s; const double* nodes_t;
  void* stacked; DType stacked_dtype;
  double* mean_s; double* mean_t; double* q_s; double* q_t; double* sumsq;
};

// OpenMP over (image, chunk of nodes).
void pairwise_centre(const PairwiseCentreProblem& p);
void pairwise_centre_pair(const PairwiseCentrePairProblem& p);

}  // namespace skd::cpu
