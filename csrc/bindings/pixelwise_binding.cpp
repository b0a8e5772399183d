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
                       const std::optional<at::Tensor>& grad_teacher) {
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

  skd::run_on_device(student, p, skd::cpu::pixelwise_loss_and_grad, SKD_CUDA_PASS(pixelwise_loss_and_grad));
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("pixelwise_loss_and_grad", &pixelwise_loss_and_grad,
        "Fused pixel-wise distillation: per-pixel loss and (optionally) gradients, in place into outputs");
});

}  // namespace
