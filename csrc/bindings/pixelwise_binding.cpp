// Binding of the fused pixel-wise loss: tensors in, PixelwiseProblem out, CPU or CUDA kernel.
#include "../common/pixelwise_problem.h"
#include "../cpu/pixelwise.h"
#include "common.h"
#include "registry.h"
#include "tensor_views.h"

#ifdef SKD_WITH_CUDA
#include "../cuda/pixelwise.h"
#endif

namespace {

void pixelwise_loss_and_grad(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& labels, int64_t ignore_index, double inv_tau,
                       int64_t loss_kind, const at::Tensor& scale, at::Tensor& pixel_loss,
                       const std::optional<at::Tensor>& grad_student,
                       const std::optional<at::Tensor>& grad_teacher,
                       const std::optional<at::Tensor>& loss_sum, const std::optional<at::Tensor>& ticket) {
  TORCH_CHECK(student.sizes() == teacher.sizes() && student.dtype() == teacher.dtype(),
              "skd_kernels: student and teacher must match in shape and dtype");
  TORCH_CHECK(student.dim() == 4, "skd_kernels: the logits must be (B, C, H, W), got ", student.sizes());
  const at::Device device = student.device();
  skd::check_buffer(pixel_loss, "pixel_loss (B, H, W)", at::kDouble,
                    student.size(0) * student.size(2) * student.size(3), device);
  skd::check_buffer(scale, "scale", at::kDouble, 1, device);
  skd::PixelwiseProblem p{};
  p.dtype = skd::dtype_of(student);
  p.loss = static_cast<skd::PixelLoss>(loss_kind);
  p.batch = student.size(0); p.classes = student.size(1);
  p.height = student.size(2); p.width = student.size(3);
  p.student = student.data_ptr(); skd::copy_strides(student, p.student_strides);
  p.teacher = teacher.data_ptr(); skd::copy_strides(teacher, p.teacher_strides);
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong, "skd_kernels: labels must be int64 here");
    p.labels = labels->data_ptr<int64_t>(); skd::copy_strides(*labels, p.label_strides);
  }
  p.ignore_index = ignore_index;
  p.inv_tau = inv_tau;
  p.scale = scale.data_ptr<double>();
  p.pixel_loss = pixel_loss.data_ptr<double>();
  for (const auto* g : {&grad_student, &grad_teacher}) {
    if (*g) TORCH_CHECK((*g)->sizes() == student.sizes() && (*g)->dtype() == student.dtype(),
                        "skd_kernels: gradient buffers must match the logits");
  }
  if (grad_student) { p.grad_student = grad_student->data_ptr(); skd::copy_strides(*grad_student, p.grad_student_strides); }
  if (grad_teacher) { p.grad_teacher = grad_teacher->data_ptr(); skd::copy_strides(*grad_teacher, p.grad_teacher_strides); }

  if (student.is_cpu()) {
    skd::cpu::pixelwise_loss_and_grad(p);
    return;
  }
#ifdef SKD_WITH_CUDA
  // CUDA sums the pixel losses in the kernel: into loss_sum (one double), with one partial per block
  // and a ticket (one int32, 0, left 0) shared by the launches on this device.
  TORCH_CHECK(loss_sum && ticket, "skd_kernels: the CUDA pixel-wise pass needs loss_sum and ticket");
  skd::check_buffer(*loss_sum, "loss_sum", at::kDouble, 1, device);
  skd::check_buffer(*ticket, "ticket", at::kInt, 1, device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor partials = at::empty({skd::cuda::pixelwise_reduction_blocks(p)}, student.options().dtype(at::kDouble));
  const skd::cuda::PixelwiseReduction red{partials.data_ptr<double>(), loss_sum->data_ptr<double>(),
                                          reinterpret_cast<unsigned*>(ticket->data_ptr<int32_t>())};
  skd::cuda::pixelwise_loss_and_grad(p, red, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "skd_kernels: this build has no CUDA kernels (tensors on ", device, ")");
#endif
}

// grad *= factor in place, the factor (a 0-d loss-dtype tensor) read on the device: no host sync,
// and nothing to do when it is 1. CUDA only; the CPU caller reads the factor itself.
void pixelwise_scale_in_place(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_contiguous() && factor.numel() == 1 && grad.device() == factor.device(),
              "skd_kernels: scale_in_place needs a contiguous gradient and a one-element factor on its device");
#ifdef SKD_WITH_CUDA
  TORCH_CHECK(grad.is_cuda(), "skd_kernels: scale_in_place is a CUDA pass");
  TORCH_CHECK(factor.scalar_type() == (grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "skd_kernels: the factor must be float32 (float64 for a float64 gradient)");
  const c10::cuda::CUDAGuard guard(grad.device());
  skd::cuda::scale_in_place(skd::dtype_of(grad), grad.data_ptr(), grad.numel(), factor.data_ptr(),
                            at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "skd_kernels: this build has no CUDA kernels");
#endif
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("pixelwise_loss_and_grad", &pixelwise_loss_and_grad,
        "Fused pixel-wise distillation: per-pixel loss (CPU) or its sum (CUDA) and, optionally, gradients");
  m.def("pixelwise_scale_in_place", &pixelwise_scale_in_place,
        "grad *= factor on the device, skipped on the device when factor is 1 (CUDA)");
});

}  // namespace
