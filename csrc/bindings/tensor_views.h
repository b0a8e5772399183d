// Turns tensors into the plain pointers, dtypes and strides the kernels take.
#pragma once
#include <torch/extension.h>

#include "../common/dtype.h"

namespace skd {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "skd_kernels: unsupported dtype ", t.scalar_type());
  }
}

template <size_t N>
void copy_strides(const at::Tensor& t, int64_t (&out)[N]) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(N), "skd_kernels: expected a ", N, "-d tensor");
  for (size_t i = 0; i < N; ++i) out[i] = t.stride(i);
}

}  // namespace skd
