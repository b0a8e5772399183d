// Binding of the pair-wise node passes: tensors in, PairwiseNodesProblem out, CPU or CUDA kernel.
#include "../common/pairwise_problem.h"
#include "../cpu/pairwise.h"
#include "registry.h"
#include "tensor_views.h"

#ifdef SKD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "../cuda/pairwise.h"
#endif

namespace {

void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel, "skd_kernels: ", name,
              " must be a contiguous ", dtype, " tensor of ", numel, " elements");
}

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
  check_buffer(nodes, at::kDouble, p.batch * p.channels * m, "nodes");
  check_buffer(inv_norm, at::kDouble, p.batch * m, "inv_norm");
  p.nodes = nodes.data_ptr<double>();
  p.inv_norm = inv_norm.data_ptr<double>();
  TORCH_CHECK(!argmax.has_value() || p.pooling == skd::NodePooling::Max,
              "skd_kernels: argmax is for max pooling only");
  if (argmax) {
    check_buffer(*argmax, at::kInt, p.batch * p.channels * m, "argmax");
    p.argmax = argmax->data_ptr<int32_t>();
  }
  TORCH_CHECK(nodes.device() == features.device() && inv_norm.device() == features.device() &&
                  (!argmax || argmax->device() == features.device()),
              "skd_kernels: node buffers must be on the features' device");
  return p;
}

template <typename CpuPass, typename CudaPass>
void run(const at::Tensor& features, const skd::PairwiseNodesProblem& p, CpuPass cpu_pass, CudaPass cuda_pass) {
  if (features.is_cpu()) {
    cpu_pass(p);
    return;
  }
#ifdef SKD_WITH_CUDA
  TORCH_CHECK(features.is_cuda(), "skd_kernels: tensors must be on CPU or CUDA");
  const c10::cuda::CUDAGuard guard(features.device());
  cuda_pass(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  (void)cuda_pass;
  TORCH_CHECK(false, "skd_kernels: this build has no CUDA kernels");
#endif
}

#ifdef SKD_WITH_CUDA
#define SKD_CUDA_PASS(name) skd::cuda::name
#else
#define SKD_CUDA_PASS(name) nullptr
#endif

void pairwise_nodes_forward(const at::Tensor& features, int64_t kernel_h, int64_t kernel_w, int64_t pooling,
                            int64_t norm, at::Tensor& nodes, at::Tensor& inv_norm,
                            const std::optional<at::Tensor>& argmax) {
  const auto p = make_problem(features, kernel_h, kernel_w, pooling, norm, nodes, inv_norm, argmax);
  run(features, p, skd::cpu::pairwise_nodes_forward, SKD_CUDA_PASS(pairwise_nodes_forward));
}

double* optional_vector(const std::optional<at::Tensor>& t, int64_t numel, const at::Tensor& like, const char* name) {
  if (!t) return nullptr;
  check_buffer(*t, at::kDouble, numel, name);
  TORCH_CHECK(t->device() == like.device(), "skd_kernels: ", name, " must be on the features' device");
  return t->data_ptr<double>();
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
  TORCH_CHECK(grad_residual.scalar_type() == at::kFloat || grad_residual.scalar_type() == at::kDouble,
              "skd_kernels: grad_residual must be float32 or float64");
  check_buffer(grad_residual, grad_residual.scalar_type(), nodes.numel(), "grad_residual");
  TORCH_CHECK(grad_features.sizes() == features.sizes() && grad_features.dtype() == features.dtype() &&
                  grad_features.device() == features.device() && grad_residual.device() == features.device(),
              "skd_kernels: grad_features must match the features");
  TORCH_CHECK(grad_outer_c.has_value() == grad_outer_q.has_value(), "skd_kernels: outer terms come in pairs");
  const int64_t m = p.nodes_h * p.nodes_w;
  p.grad_residual = grad_residual.data_ptr();
  p.grad_dtype = skd::dtype_of(grad_residual);
  p.grad_bias = optional_vector(grad_bias, p.batch * p.channels, features, "grad_bias");
  p.grad_outer_c = optional_vector(grad_outer_c, p.batch * p.channels, features, "grad_outer_c");
  p.grad_outer_q = optional_vector(grad_outer_q, p.batch * m, features, "grad_outer_q");
  p.grad_scale = grad_scale;
  p.grad_features = grad_features.data_ptr(); skd::copy_strides(grad_features, p.grad_strides);
  run(features, p, skd::cpu::pairwise_nodes_backward, SKD_CUDA_PASS(pairwise_nodes_backward));
}

void pairwise_centre(const at::Tensor& nodes, at::Tensor& residual, at::Tensor& mean, at::Tensor& q,
                     at::Tensor& sumsq) {
  TORCH_CHECK(nodes.is_cpu() && nodes.dim() == 3, "skd_kernels: pairwise_centre takes CPU nodes (B, C, M)");
  const int64_t b = nodes.size(0), c = nodes.size(1), m = nodes.size(2);
  check_buffer(nodes, at::kDouble, b * c * m, "nodes");
  TORCH_CHECK(residual.scalar_type() == at::kFloat || residual.scalar_type() == at::kDouble,
              "skd_kernels: residual must be float32 or float64");
  // The residual may be one half of the core's stacked buffer: rows contiguous, images strided.
  TORCH_CHECK(residual.dim() == 3 && residual.size(0) == b && residual.size(1) == c && residual.size(2) == m &&
                  (m == 1 || residual.stride(2) == 1) && (c == 1 || residual.stride(1) == m) &&
                  (b == 1 || residual.stride(0) >= c * m),
              "skd_kernels: residual must be (B, C, M) with contiguous rows, got sizes ", residual.sizes(),
              " strides ", residual.strides());
  check_buffer(mean, at::kDouble, b * c, "mean");
  check_buffer(q, at::kDouble, b * m, "q");
  check_buffer(sumsq, at::kDouble, b * c, "sumsq");
  for (const at::Tensor* t : {&residual, &mean, &q, &sumsq}) TORCH_CHECK(t->is_cpu(), "skd_kernels: CPU buffers only");
  skd::PairwiseCentreProblem p{b, c, m, nodes.data_ptr<double>(), residual.data_ptr(), skd::dtype_of(residual),
                               mean.data_ptr<double>(), q.data_ptr<double>(), sumsq.data_ptr<double>(),
                               b == 1 ? c * m : residual.stride(0)};
  skd::cpu::pairwise_centre(p);
}

void pairwise_centre_pair(const at::Tensor& nodes_s, const at::Tensor& nodes_t, at::Tensor& stacked,
                          at::Tensor& mean_s, at::Tensor& mean_t, at::Tensor& q_s, at::Tensor& q_t,
                          at::Tensor& sumsq) {
  TORCH_CHECK(nodes_s.is_cpu() && nodes_s.dim() == 3 && nodes_t.sizes() == nodes_s.sizes(),
              "skd_kernels: pairwise_centre_pair takes two CPU node tensors (B, C, M) of one shape");
  const int64_t b = nodes_s.size(0), c = nodes_s.size(1), m = nodes_s.size(2);
  check_buffer(nodes_s, at::kDouble, b * c * m, "nodes_s");
  check_buffer(nodes_t, at::kDouble, b * c * m, "nodes_t");
  TORCH_CHECK(stacked.scalar_type() == at::kFloat || stacked.scalar_type() == at::kDouble,
              "skd_kernels: stacked must be float32 or float64");
  check_buffer(stacked, stacked.scalar_type(), b * 2 * c * m, "stacked");
  for (at::Tensor* t : {&mean_s, &mean_t}) check_buffer(*t, at::kDouble, b * c, "mean");
  for (at::Tensor* t : {&q_s, &q_t}) check_buffer(*t, at::kDouble, b * m, "q");
  check_buffer(sumsq, at::kDouble, b * 2 * c, "sumsq");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&nodes_t, &stacked, &mean_s, &mean_t, &q_s, &q_t, &sumsq})
    TORCH_CHECK(t->is_cpu(), "skd_kernels: CPU buffers only");
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
