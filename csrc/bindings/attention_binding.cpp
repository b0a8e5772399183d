// Binding of the fused attention passes: tensors in, AttentionProblem out, CPU or CUDA kernel.
// The Python side passes contiguous tensors in the accumulation dtype (float32 or float64).
#include <initializer_list>
#include <optional>

#include "../common/attention_problem.h"
#include "../cpu/attention.h"
#include "registry.h"
#include "tensor_views.h"

#ifdef SKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "../cuda/attention.h"
#endif

namespace {

enum class Pass { Forward, Backward, DoubleBackward };

void check_array(const at::Tensor& t, const at::Tensor& q, int64_t d, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == q.scalar_type() && t.device() == q.device(),
              "skd_kernels: ", name, " must be contiguous, on q's device, in q's dtype");
  TORCH_CHECK(t.numel() == q.size(0) * q.size(1) * d, "skd_kernels: ", name, " has the wrong size");
}

skd::AttentionProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "skd_kernels: attention expects q, k (B, N, Dk) and v (B, N, Dv)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "skd_kernels: attention kernels take float32 or float64");
  skd::AttentionProblem p{};
  p.dtype = skd::dtype_of(q);
  p.batch = q.size(0); p.n = q.size(1); p.dk = q.size(2); p.dv = v.size(2);
  check_array(q, q, p.dk, "q"); check_array(k, q, p.dk, "k"); check_array(v, q, p.dv, "v");
  check_array(lse, q, 1, "lse");
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.lse = lse.data_ptr();
  return p;
}

void run(const skd::AttentionProblem& p, const at::Tensor& q, Pass pass) {
  if (q.is_cpu()) {
    if (pass == Pass::Forward) skd::cpu::attention_forward(p);
    else if (pass == Pass::Backward) skd::cpu::attention_backward(p);
    else skd::cpu::attention_double_backward(p);
    return;
  }
#ifdef SKD_WITH_CUDA
  TORCH_CHECK(q.is_cuda(), "skd_kernels: tensors must be on CPU or CUDA");
  const c10::cuda::CUDAGuard guard(q.device());
  // The row pass leaves its statistics here for the column pass (the CPU keeps them in std::vector).
  const at::Tensor row_stats = at::empty({3, p.batch, p.n}, q.options());
  skd::AttentionProblem with_stats = p;
  with_stats.row_stats = row_stats.data_ptr();
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  if (pass == Pass::Forward) skd::cuda::attention_forward(with_stats, stream);
  else if (pass == Pass::Backward) skd::cuda::attention_backward(with_stats, stream);
  else skd::cuda::attention_double_backward(with_stats, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "skd_kernels: this build has no CUDA kernels");
#endif
}

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       at::Tensor& lse) {
  skd::AttentionProblem p = make_problem(q, k, v, lse);
  check_array(out, q, p.dv, "out");
  p.out = out.data_ptr();
  run(p, q, Pass::Forward);
}

void attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                        const at::Tensor& dout, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  skd::AttentionProblem p = make_problem(q, k, v, lse);
  check_array(dout, q, p.dv, "dout");
  check_array(grad_q, q, p.dk, "grad_q"); check_array(grad_k, q, p.dk, "grad_k");
  check_array(grad_v, q, p.dv, "grad_v");
  p.dout = dout.data_ptr();
  p.grad_q = grad_q.data_ptr(); p.grad_k = grad_k.data_ptr(); p.grad_v = grad_v.data_ptr();
  run(p, q, Pass::Backward);
}

void attention_double_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& lse, const at::Tensor& dout,
                               const std::optional<at::Tensor>& gq, const std::optional<at::Tensor>& gk,
                               const std::optional<at::Tensor>& gv, at::Tensor& grad_q, at::Tensor& grad_k,
                               at::Tensor& grad_v, at::Tensor& grad_dout) {
  skd::AttentionProblem p = make_problem(q, k, v, lse);
  check_array(dout, q, p.dv, "dout");
  check_array(grad_q, q, p.dk, "grad_q"); check_array(grad_k, q, p.dk, "grad_k");
  check_array(grad_v, q, p.dv, "grad_v"); check_array(grad_dout, q, p.dv, "grad_dout");
  if (gq) { check_array(*gq, q, p.dk, "gq"); p.gq = gq->data_ptr(); }
  if (gk) { check_array(*gk, q, p.dk, "gk"); p.gk = gk->data_ptr(); }
  if (gv) { check_array(*gv, q, p.dv, "gv"); p.gv = gv->data_ptr(); }
  p.dout = dout.data_ptr();
  p.grad_q = grad_q.data_ptr(); p.grad_k = grad_k.data_ptr(); p.grad_v = grad_v.data_ptr();
  p.grad_dout = grad_dout.data_ptr();
  run(p, q, Pass::DoubleBackward);
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("attention_forward", &attention_forward, "Fused attention forward: out and row log-sum-exp, in place");
  m.def("attention_backward", &attention_backward, "Fused attention backward: dq, dk, dv, in place");
  m.def("attention_double_backward", &attention_double_backward,
        "Fused attention double backward: gradients of q, k, v, dout, in place");
});

}  // namespace
