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
skd::PairwiseNodesProblem make_problem(const at::Tensor& features, int64_t kernel_h, int64_t kernel_w,
                                       int64_t pooling, int64_t norm, const at::Tensor& nodes,
                                       const at::Tensor& inv_norm, const std::optional<at::Tensor>& argmax) {
  skd::PairwiseNodesProblem p{};
  p.dtype = skd::dtype_of(features);
  p.pooling = static_cast<skd::NodePooling>(pooling);
  p.norm = static_cast<skd::NodeNorm>(norm);
  p.batch = features.size(0); p.channels = features.size(1);
  p.height = features.size(2); p.width = features.size(3);
  TORCH_CHECK(kernel_h >= 1 && kernel_w >= 1, "skd_kernels: node kernel must be positive");
  p.kernel_h = kernel_h; p.kernel_w = kernel_w;
  p.nodes_h = (p.height + kernel_h - 1) / kernel_h; p.nodes_w = (p.width + kernel_w - 1) / kernel_w;
  TORCH_CHECK(p.pooling != skd::NodePooling::None || (kernel_h == 1 && kernel_w == 1),
              "skd_kernels: pooling 'none' needs a 1x1 kernel");
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

void pairwise_nodes_forward(const at::Tensor& features, int64_t kernel_h, int64_t kernel_w, int64_t pooling,
                            int64_t norm, at::Tensor& nodes, at::Tensor& inv_norm,
                            const std::optional<at::Tensor>& argmax) {
  const auto p = make_problem(features, kernel_h, kernel_w, pooling, norm, nodes, inv_norm, argmax);
  skd::run_on_device(features, p, skd::cpu::pairwise_nodes_forward, SKD_CUDA_PASS(pairwise_nodes_forward));
}

const double* optional_vector(const std::optional<at::Tensor>& t, const char* name, int64_t numel,
                              const at::Tensor& features) {
  return static_cast<const double*>(skd::optional_buffer(t, name, at::kDouble, numel, features.device()));
}

void pairwise_nodes_backward(const at::Tensor& features, int64_t kernel_h, int64_t kernel_w, int64_t pooling,
                             int64_t norm, const at::Tensor& nodes, const at::Tensor& inv_norm,
                             const std::optional<at::Tensor>& argmax, const at::Tensor& grad_residual,
                             const std::optional<at::Tensor>& grad_bias, const std::optional<at::Tensor>& grad_outer_c,
                             const std::optional<at::Tensor>& grad_outer_q, double grad_scale,
                             at::Tensor& grad_features) {
  auto p = make_problem(features, kernel_h, kernel_w, pooling, norm, nodes, inv_norm, argmax);
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

// The centring kernels exist for the CPU only: every buffer must be there.
const at::Device kCpu(at::kCPU);

void pairwise_centre(const at::Tensor& nodes, at::Tensor& residual, at::Tensor& mean, at::Tensor& q,
                     at::Tensor& sumsq) {
  TORCH_CHECK(nodes.dim() == 3, "skd_kernels: pairwise_centre takes CPU nodes (B, C, M), got ", nodes.sizes());
  const int64_t b = nodes.size(0), c = nodes.size(1), m = nodes.size(2);
  skd::check_buffer(nodes, "nodes", at::kDouble, b * c * m, kCpu);
  skd::check_accumulation_dtype(residual, "residual");
  // The residual may be one half of the core's stacked buffer: rows contiguous, images strided.
  TORCH_CHECK(residual.is_cpu() && residual.dim() == 3 && residual.size(0) == b && residual.size(1) == c &&
                  residual.size(2) == m && (m == 1 || residual.stride(2) == 1) &&
                  (c == 1 || residual.stride(1) == m) && (b == 1 || residual.stride(0) >= c * m),
              "skd_kernels: residual must be a CPU (B, C, M) tensor with contiguous rows, got sizes ",
              residual.sizes(), " strides ", residual.strides(), " on ", residual.device());
  skd::check_buffer(mean, "mean", at::kDouble, b * c, kCpu);
  skd::check_buffer(q, "q", at::kDouble, b * m, kCpu);
  skd::check_buffer(sumsq, "sumsq", at::kDouble, b * c, kCpu);
  skd::PairwiseCentreProblem p{b, c, m, nodes.data_ptr<double>(), residual.data_ptr(), skd::dtype_of(residual),
                               mean.data_ptr<double>(), q.data_ptr<double>(), sumsq.data_ptr<double>(),
                               b == 1 ? c * m : residual.stride(0)};
  skd::cpu::pairwise_centre(p);
}

void pairwise_centre_pair(const at::Tensor& nodes_s, const at::Tensor& nodes_t, at::Tensor& stacked,
                          at::Tensor& mean_s, at::Tensor& mean_t, at::Tensor& q_s, at::Tensor& q_t,
                          at::Tensor& sumsq) {
  TORCH_CHECK(nodes_s.dim() == 3 && nodes_t.sizes() == nodes_s.sizes(),
              "skd_kernels: pairwise_centre_pair takes two CPU node tensors (B, C, M) of one shape, got ",
              nodes_s.sizes(), " and ", nodes_t.sizes());
  const int64_t b = nodes_s.size(0), c = nodes_s.size(1), m = nodes_s.size(2);
  skd::check_buffer(nodes_s, "nodes_s", at::kDouble, b * c * m, kCpu);
  skd::check_buffer(nodes_t, "nodes_t", at::kDouble, b * c * m, kCpu);
  skd::check_accumulation_dtype(stacked, "stacked");
  skd::check_buffer(stacked, "stacked", stacked.scalar_type(), b * 2 * c * m, kCpu);
  skd::check_buffer(mean_s, "mean_s", at::kDouble, b * c, kCpu);
  skd::check_buffer(mean_t, "mean_t", at::kDouble, b * c, kCpu);
  skd::check_buffer(q_s, "q_s", at::kDouble, b * m, kCpu);
  skd::check_buffer(q_t, "q_t", at::kDouble, b * m, kCpu);
  skd::check_buffer(sumsq, "sumsq", at::kDouble, b * 2 * c, kCpu);
  skd::PairwiseCentrePairProblem p{b, c, m, nodes_s.data_ptr<double>(), nodes_t.data_ptr<double>(),
                                   stacked.data_ptr(), skd::dtype_of(stacked), mean_s.data_ptr<double>(),
                                   mean_t.data_ptr<double>(), q_s.data_ptr<double>(), q_t.data_ptr<double>(),
                                   sumsq.data_ptr<double>()};
  skd::cpu::pairwise_centre_pair(p);
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("pairwise_nodes_forward", &pairwise_nodes_forward,
        "Pool, normalise and transpose features (B, C, H, W) into float64 nodes (B, C, M)");
  m.def("pairwise_nodes_backward", &pairwise_nodes_backward,
        "Gradient of the node pass: d loss / d nodes (B, C, M) -> d loss / d features (B, C, H, W)");
  m.def("pairwise_centre", &pairwise_centre,
        "Centre float64 nodes (B, C, M) over the nodes: residual, mean, q = r . mean, per-channel sum of r^2");
  m.def("pairwise_centre_pair", &pairwise_centre_pair,
        "Centre student and teacher float64 nodes (B, C, M) into S = (rs + rt) / 2 and E = rs - rt, stacked "
        "(B, 2C, M); means, q's, per-row sums of squares of S and E");
});

}  // namespace
