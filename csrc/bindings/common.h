// What every binding needs besides the tensor views: the check of a buffer the kernels index as flat
// memory, and the one place that picks the CPU or the CUDA kernel of a pass.
#pragma once
#include <torch/extension.h>

#include <optional>

#ifdef SKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace skd {

// The kernels index a buffer as one flat block of `numel` elements of `dtype` on the device the
// other arguments live on; anything else would be read or written out of bounds.
inline void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                         const at::Device& device) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel, "skd_kernels: ", name,
              " must be a contiguous ", dtype, " tensor of ", numel, " elements, got ",
              t.is_contiguous() ? "a contiguous " : "a non-contiguous ", t.scalar_type(), " tensor of ",
              t.numel());
  TORCH_CHECK(t.device() == device, "skd_kernels: ", name, " must be on ", device, ", got ", t.device());
}

// The same for an optional buffer: its data, or nullptr (the kernels read nullptr as "absent").
inline void* optional_buffer(const std::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
                             int64_t numel, const at::Device& device) {
  if (!t) return nullptr;
  check_buffer(*t, name, dtype, numel, device);
  return t->data_ptr();
}

// The kernels accumulate in float32 or float64 only; the Python side converts half inputs once.
inline void check_accumulation_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "skd_kernels: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// The kernels of one pass; nested so that run_on_device deduces Problem from the problem alone and
// takes nullptr for an absent CUDA pass.
template <typename Problem>
struct Pass {
  using Cpu = void (*)(const Problem&);
  using Cuda = void (*)(const Problem&, void* stream);
};

// A CUDA pass by name, or nullptr in a build without CUDA: the name is then never referenced, so the
// CPU-only extension links without the .cu objects.
#ifdef SKD_WITH_CUDA
#define SKD_CUDA_PASS(name) ::skd::cuda::name
#else
#define SKD_CUDA_PASS(name) nullptr
#endif

// Runs the pass on the device of `like`: the CPU kernel, or the CUDA kernel on the current stream
// under a guard for that device (the kernels launch asynchronously; a launch error is raised here).
template <typename Problem>
void run_on_device(const at::Tensor& like, const Problem& p, typename Pass<Problem>::Cpu cpu_pass,
                   typename Pass<Problem>::Cuda cuda_pass) {
  if (like.is_cpu()) {
    cpu_pass(p);
    return;
  }
#ifdef SKD_WITH_CUDA
  TORCH_CHECK(like.is_cuda(), "skd_kernels: tensors must be on CPU or CUDA, got ", like.device());
  const c10::cuda::CUDAGuard guard(like.device());
  cuda_pass(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  (void)cuda_pass;
  TORCH_CHECK(false, "skd_kernels: this build has no CUDA kernels (tensors on ", like.device(), ")");
#endif
}

}  // namespace skd
