// Binding of the fused attention passes: tensors in, AttentionProblem out, CPU kernel. (On a GPU the
// Triton kernels run attention; skd_kernels/backends.py gives the cuda backend the torch passes.)
// The Python side passes contiguous tensors in the accumulation dtype (float32 or float64); lse as
// attention_problem.h says.
#include "../common/attention_problem.h"
#include "../cpu/attention.h"
#include "common.h"
#include "registry.h"
#include "tensor_views.h"

namespace {

// Every array of the problem is (B, N, d) in q's dtype, on q's device.
void check_array(const at::Tensor& t, const at::Tensor& q, int64_t d, const char* name) {
  skd::check_buffer(t, name, q.scalar_type(), q.size(0) * q.size(1) * d, q.device());
}

skd::AttentionProblem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "skd_kernels: attention expects q, k (B, N, Dk) and v (B, N, Dv)");
  skd::check_accumulation_dtype(q, "q");
  skd::AttentionProblem p{};
  p.dtype = skd::dtype_of(q);
  p.batch = q.size(0); p.n = q.size(1); p.dk = q.size(2); p.dv = v.size(2);
  check_array(q, q, p.dk, "q"); check_array(k, q, p.dk, "k"); check_array(v, q, p.dv, "v");
  TORCH_CHECK(q.is_cpu(), "skd_kernels: the compiled attention kernels take CPU tensors (got ", q.device(), ")");
  skd::check_buffer(lse, "lse", at::kDouble, q.size(0) * q.size(1), q.device());
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.lse = lse.data_ptr();
  return p;
}

const void* optional_array(const std::optional<at::Tensor>& t, const at::Tensor& q, int64_t d, const char* name) {
  return skd::optional_buffer(t, name, q.scalar_type(), q.size(0) * q.size(1) * d, q.device());
}

void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       at::Tensor& lse) {
  skd::AttentionProblem p = make_problem(q, k, v, lse);
  check_array(out, q, p.dv, "out");
  p.out = out.data_ptr();
  skd::cpu::attention_forward(p);
}

void attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                        const at::Tensor& dout, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  skd::AttentionProblem p = make_problem(q, k, v, lse);
  check_array(dout, q, p.dv, "dout");
  check_array(grad_q, q, p.dk, "grad_q"); check_array(grad_k, q, p.dk, "grad_k");
  check_array(grad_v, q, p.dv, "grad_v");
  p.dout = dout.data_ptr();
  p.grad_q = grad_q.data_ptr(); p.grad_k = grad_k.data_ptr(); p.grad_v = grad_v.data_ptr();
  skd::cpu::attention_backward(p);
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
  p.gq = optional_array(gq, q, p.dk, "gq");
  p.gk = optional_array(gk, q, p.dk, "gk");
  p.gv = optional_array(gv, q, p.dv, "gv");
  p.dout = dout.data_ptr();
  p.grad_q = grad_q.data_ptr(); p.grad_k = grad_k.data_ptr(); p.grad_v = grad_v.data_ptr();
  p.grad_dout = grad_dout.data_ptr();
  skd::cpu::attention_double_backward(p);
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("attention_forward", &attention_forward, "Fused attention forward: out and row log-sum-exp, in place");
  m.def("attention_backward", &attention_backward, "Fused attention backward: dq, dk, dv, in place");
  m.def("attention_double_backward", &attention_double_backward,
        "Fused attention double backward: gradients of q, k, v, dout, in place");
});

}  // namespace
