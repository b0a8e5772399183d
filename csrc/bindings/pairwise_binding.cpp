// Binding of the pair-wise node passes: tensors in, PairwiseNodesProblem out, CPU or CUDA kernel.
#include "../common/pairwise_problem.h"
#include "../cpu/pairwise.h"
#include "common.h"
#include "registry.h"
#include "tensor_views.h"

#ifdef SKD_WITH_CUDA
#include "../cuda/pairwise.h"
#endif

namespace {

// Shared by both directions: sizes, pooling and the node buffers.
skd::PairwiseNodesProblem make_problem(const at::Tensor& features, int64_t window_h, int64_t window_w,
                                       int64_t pooling, int64_t norm, const at::Tensor& nodes,
                                       const at::Tensor& inv_norm, const std::optional<at::Tensor>& argmax) {
  skd::PairwiseNodesProblem p{};
  p.dtype = skd::dtype_of(features);
  p.pooling = static_cast<skd::NodePooling>(pooling);
  p.norm = static_cast<skd::NodeNorm>(norm);
  p.batch = features.size(0); p.channels = features.size(1);
  p.height = features.size(2); p.width = features.size(3);
  TORCH_CHECK(window_h >= 1 && window_w >= 1, "skd_kernels: the node window must be at least 1x1, got ", window_h,
              "x", window_w);
  p.window_h = window_h; p.window_w = window_w;
  p.nodes_h = (p.height + window_h - 1) / window_h; p.nodes_w = (p.width + window_w - 1) / window_w;
  TORCH_CHECK(p.pooling != skd::NodePooling::None || (window_h == 1 && window_w == 1),
              "skd_kernels: pooling 'none' needs a 1x1 window");
  p.features = features.data_ptr(); skd::copy_strides(features, p.feature_strides);
  const int64_t m = p.nodes_h * p.nodes_w;
  skd::check_buffer(nodes, "nodes", at::kDouble, p.batch * p.channels * m, features.device());
  skd::check_buffer(inv_norm, "inv_norm", at::kDouble, p.batch * m, features.device());
  p.nodes = nodes.data_ptr<double>();
  p.inv_norm = inv_norm.data_ptr<double>();
  TORCH_CHECK(!argmax.has_value() || p.pooling == skd::NodePooling::Max,
              "skd_kernels: argmax is for max pooling only");
  p.argmax = static_cast<int32_t*>(
      skd::optional_buffer(argmax, "argmax", at::kInt, p.batch * p.channels * m, features.device()));
  return p;
}

void pairwise_nodes_forward(const at::Tensor& features, int64_t window_h, int64_t window_w, int64_t pooling,
                            int64_t norm, at::Tensor& nodes, at::Tensor& inv_norm,
                            const std::optional<at::Tensor>& argmax) {
  const auto p = make_problem(features, window_h, window_w, pooling, norm, nodes, inv_norm, argmax);
  skd::run_on_device(features, p, skd::cpu::pairwise_nodes_forward, SKD_CUDA_PASS(pairwise_nodes_forward));
}

const double* optional_vector(const std::optional<at::Tensor>& t, const char* name, int64_t numel,
                              const at::Tensor& features) {
  return static_cast<const double*>(skd::optional_buffer(t, name, at::kDouble, numel, features.device()));
}

void pairwise_nodes_backward(const at::Tensor& features, int64_t window_h, int64_t window_w, int64_t pooling,
                             int64_t norm, const at::Tensor& nodes, const at::Tensor& inv_norm,
                             const std::optional<at::Tensor>& argmax, const at::Tensor& grad_residual,
                             const std::optional<at::Tensor>& grad_bias, const std::optional<at::Tensor>& grad_outer_c,
                             const std::optional<at::Tensor>& grad_outer_q, double grad_scale,
                             at::Tensor& grad_features) {
  auto p = make_problem(features, window_h, window_w, pooling, norm, nodes, inv_norm, argmax);
  TORCH_CHECK(argmax.has_value() == (p.pooling == skd::NodePooling::Max),
              "skd_kernels: the max-pooling backward needs the forward's argmax");
  skd::check_accumulation_dtype(grad_residual, "grad_residual");
  skd::check_buffer(grad_residual, "grad_residual", grad_residual.scalar_type(), nodes.numel(), features.device());
  TORCH_CHECK(grad_features.sizes() == features.sizes() && grad_features.dtype() == features.dtype() &&
                  grad_features.device() == features.device(),
              "skd_kernels: grad_features must match the features");
  TORCH_CHECK(grad_outer_c.has_value() == grad_outer_q.has_value(), "skd_kernels: outer terms come in pairs");
  const int64_t m = p.nodes_h * p.nodes_w;
  p.grad_residual = grad_residual.data_ptr();
  p.grad_dtype = skd::dtype_of(grad_residual);
  p.grad_bias = optional_vector(grad_bias, "grad_bias", p.batch * p.channels, features);
  p.grad_outer_c = optional_vector(grad_outer_c, "grad_outer_c", p.batch * p.channels, features);
  p.grad_outer_q = optional_vector(grad_outer_q, "grad_outer_q", p.batch * m, features);
  p.grad_scale = grad_scale;
  p.grad_features = grad_features.data_ptr(); skd::copy_strides(grad_features, p.grad_strides);
  skd::run_on_device(features, p, skd::cpu::pairwise_nodes_backward, SKD_CUDA_PASS(pairwise_nodes_backward));
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("pairwise_nodes_forward", &pairwise_nodes_forward,
        "Pool, normalise and transpose features (B, C, H, W) into float64 nodes (B, C, M)");
  m.def("pairwise_nodes_backward", &pairwise_nodes_backward,
        "Gradient of the node pass: d loss / d nodes (B, C, M) -> d loss / d features (B, C, H, W)");
});

}  // namespace
