// The SAGAN attention problem as the C++ (OpenMP) kernels see it: plain pointers and sizes; includes
// nothing from torch so it compiles fast.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace skd {

// All arrays but lse are contiguous and of one dtype, Float32 or Float64 (the accumulation type: the
// Python side converts half inputs once). Shapes: q, k (batch, n, dk); v (batch, n, dv); row vectors (batch, n).
struct AttentionProblem {
  DType dtype;
  int64_t batch, n, dk, dv;
  const void* q; const void* k; const void* v;
  // Forward outputs; the backward passes read lse (the row log-sum-exp of S = q k^T). lse is float64
  // (batch, n) in the CPU passes whatever the dtype: float32's ~|lse| eps absolute error becomes a
  // relative error of every P = exp(S - lse) at large energies.
  void* out; void* lse;
  // Backward: incoming gradient of out (batch, n, dv) and the gradients of q, k, v.
  const void* dout;
  void* grad_q; void* grad_k; void* grad_v;
  // Double backward: cotangents of (dq, dk, dv) (nullptr = zero) and the gradient of dout.
  const void* gq; const void* gk; const void* gv;
  void* grad_dout;
};

}  // namespace skd
