// Binding of the CPU centring of the pair-wise nodes: tensors in, PairwiseCentre(Pair)Problem out.
#include "../cpu/pairwise_centre.h"
#include "common.h"
#include "registry.h"
#include "tensor_views.h"

namespace {

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
  skd::cpu::PairwiseCentreProblem p{b, c, m, nodes.data_ptr<double>(), residual.data_ptr(), skd::dtype_of(residual),
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
  skd::cpu::PairwiseCentrePairProblem p{b, c, m, nodes_s.data_ptr<double>(), nodes_t.data_ptr<double>(),
                                   stacked.data_ptr(), skd::dtype_of(stacked), mean_s.data_ptr<double>(),
                                   mean_t.data_ptr<double>(), q_s.data_ptr<double>(), q_t.data_ptr<double>(),
                                   sumsq.data_ptr<double>()};
  skd::cpu::pairwise_centre_pair(p);
}

const skd::BindingRegistration registration([](pybind11::module_& m) {
  m.def("pairwise_centre", &pairwise_centre,
        "Centre float64 nodes (B, C, M) over the nodes: residual, mean, q = r . mean, per-channel sum of r^2");
  m.def("pairwise_centre_pair", &pairwise_centre_pair,
        "Centre student and teacher float64 nodes (B, C, M) into S = (rs + rt) / 2 and E = rs - rt, stacked "
        "(B, 2C, M); means, q's, per-row sums of squares of S and E");
});

}  // namespace
