// The two fused passes of pair-wise distillation on the CPU: features -> normalised nodes, and the
// gradient back from nodes to features.
//
// Work unit: one image and one row of nodes, all channels. Its windows cover whole input rows, so
// the inner loops run along a row (contiguous in NCHW) and every input element is read, and every
// gradient element written, exactly once. The row's C x nodes_w pooled values stay in L2 between
// the pooling and the scaling by the node norms.
#include "cpu/pairwise.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/numeric.h"

namespace skd::cpu {
namespace {

struct Window {
  int64_t h0, h1, w0, w1;  // [h0, h1) x [w0, w1), clipped to the map (ceil mode)
};

inline Window window(const PairwiseNodesProblem& p, int64_t i, int64_t j) {
  return {i * p.kernel_h, std::min((i + 1) * p.kernel_h, p.height), j * p.kernel_w,
          std::min((j + 1) * p.kernel_w, p.width)};
}

// The normaliser of the node whose pooled feature has squared norm `sumsq`.
inline double inverse_norm(const PairwiseNodesProblem& p, double sumsq) {
  const double norm = std::sqrt(sumsq);
  return p.norm == NodeNorm::Official ? 1.0 / (norm + 1e-8) : 1.0 / std::max(norm, 1e-12);
}

template <typename Scalar>
void nodes_forward_row(const PairwiseNodesProblem& p, int64_t b, int64_t i) {
  const int64_t nw = p.nodes_w, m = p.nodes_h * nw, first = i * nw;
  const int64_t* st = p.feature_strides;
  const Scalar* base = static_cast<const Scalar*>(p.features) + b * st[0];
  std::vector<double> sumsq(nw, 0.0);
  for (int64_t c = 0; c < p.channels; ++c) {
    double* out = p.nodes + (b * p.channels + c) * m + first;
    int32_t* arg = p.argmax ? p.argmax + (b * p.channels + c) * m + first : nullptr;
    const Scalar* plane = base + c * st[1];
    if (p.pooling == NodePooling::None) {
      const Scalar* row = plane + i * st[2];
      for (int64_t j = 0; j < nw; ++j) out[j] = to_acc(row[j * st[3]]);
    } else {
      for (int64_t j = 0; j < nw; ++j) {
        const Window win = window(p, i, j);
        double acc = p.pooling == NodePooling::Max ? -INFINITY : 0.0;
        int32_t best = int32_t(win.h0 * p.width + win.w0);
        for (int64_t h = win.h0; h < win.h1; ++h) {
          const Scalar* row = plane + h * st[2];
          for (int64_t w = win.w0; w < win.w1; ++w) {
            const double v = to_acc(row[w * st[3]]);
            if (p.pooling == NodePooling::Avg) {
              acc += v;
            } else if (v > acc || std::isnan(v)) {  // the first maximum, and NaN wins: as max_pool2d
              if (!std::isnan(acc)) { acc = v; best = int32_t(h * p.width + w); }
            }
          }
        }
        if (p.pooling == NodePooling::Avg) acc /= double((win.h1 - win.h0) * (win.w1 - win.w0));
        out[j] = acc;
        if (arg) arg[j] = best;
      }
    }
    for (int64_t j = 0; j < nw; ++j) sumsq[j] += out[j] * out[j];
  }
  double* inv = p.inv_norm + b * m + first;
  for (int64_t j = 0; j < nw; ++j) inv[j] = inverse_norm(p, sumsq[j]);
  for (int64_t c = 0; c < p.channels; ++c) {
    double* out = p.nodes + (b * p.channels + c) * m + first;
    for (int64_t j = 0; j < nw; ++j) out[j] *= inv[j];
  }
}

template <typename Scalar>
void nodes_backward_row(const PairwiseNodesProblem& p, int64_t b, int64_t i) {
  const int64_t nw = p.nodes_w, m = p.nodes_h * nw, first = i * nw;
  const double* inv = p.inv_norm + b * m + first;
  // Paper form: d p = (d u - u (u . d u)) / ||p||, the projection that the gradient through the norm
  // adds; below the 1e-12 clamp the norm is a constant and only d u / 1e-12 remains (F.normalize).
  std::vector<double> radial(nw, 0.0);
  if (p.norm == NodeNorm::Paper) {
    for (int64_t c = 0; c < p.channels; ++c) {
      const double* u = p.nodes + (b * p.channels + c) * m + first;
      const double* du = p.grad_nodes + (b * p.channels + c) * m + first;
      for (int64_t j = 0; j < nw; ++j) radial[j] += u[j] * du[j];
    }
    for (int64_t j = 0; j < nw; ++j) if (inv[j] >= 1e12) radial[j] = 0.0;
  }
  const int64_t* gs = p.grad_strides;
  Scalar* base = static_cast<Scalar*>(p.grad_features) + b * gs[0];
  for (int64_t c = 0; c < p.channels; ++c) {
    const double* u = p.nodes + (b * p.channels + c) * m + first;
    const double* du = p.grad_nodes + (b * p.channels + c) * m + first;
    const int32_t* arg = p.argmax ? p.argmax + (b * p.channels + c) * m + first : nullptr;
    Scalar* plane = base + c * gs[1];
    for (int64_t j = 0; j < nw; ++j) {
      const double dp = (du[j] - u[j] * radial[j]) * inv[j];
      if (p.pooling == NodePooling::None) {
        store(plane + i * gs[2] + j * gs[3], dp);
        continue;
      }
      const Window win = window(p, i, j);
      const double share = p.pooling == NodePooling::Avg ? dp / double((win.h1 - win.h0) * (win.w1 - win.w0)) : 0.0;
      for (int64_t h = win.h0; h < win.h1; ++h) {
        Scalar* row = plane + h * gs[2];
        for (int64_t w = win.w0; w < win.w1; ++w) {
          const double g = arg ? (arg[j] == h * p.width + w ? dp : 0.0) : share;
          store(row + w * gs[3], g);
        }
      }
    }
  }
}

template <typename Scalar>
void over_rows(const PairwiseNodesProblem& p, void (*row)(const PairwiseNodesProblem&, int64_t, int64_t)) {
  const int64_t rows = p.batch * p.nodes_h;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < rows; ++r) row(p, r / p.nodes_h, r % p.nodes_h);
}

template <template <typename> class Pass>
void dispatch(const PairwiseNodesProblem& p) {
  switch (p.dtype) {
    case DType::Float32: return Pass<float>::run(p);
    case DType::Float64: return Pass<double>::run(p);
    case DType::Float16: return Pass<Half>::run(p);
    case DType::BFloat16: return Pass<BFloat16>::run(p);
  }
}

template <typename Scalar> struct Forward { static void run(const PairwiseNodesProblem& p) { over_rows<Scalar>(p, nodes_forward_row<Scalar>); } };
template <typename Scalar> struct Backward { static void run(const PairwiseNodesProblem& p) { over_rows<Scalar>(p, nodes_backward_row<Scalar>); } };

}  // namespace

void pairwise_nodes_forward(const PairwiseNodesProblem& p) { dispatch<Forward>(p); }
void pairwise_nodes_backward(const PairwiseNodesProblem& p) { dispatch<Backward>(p); }

}  // namespace skd::cpu
