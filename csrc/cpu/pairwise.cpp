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

// d loss / d u for one channel's nodes [first, first + n) of image b (see PairwiseNodesProblem).
void load_grad_u(const PairwiseNodesProblem& p, int64_t b, int64_t c, int64_t first, int64_t n, double* du) {
  const int64_t m = p.nodes_h * p.nodes_w, row = (b * p.channels + c) * m + first;
  if (p.grad_dtype == DType::Float32) {
    const float* res = static_cast<const float*>(p.grad_residual) + row;
    for (int64_t j = 0; j < n; ++j) du[j] = res[j];
  } else {
    const double* res = static_cast<const double*>(p.grad_residual) + row;
    for (int64_t j = 0; j < n; ++j) du[j] = res[j];
  }
  const double bias = p.grad_bias ? p.grad_bias[b * p.channels + c] : 0.0;
  const double outer = p.grad_outer_c ? p.grad_outer_c[b * p.channels + c] : 0.0;
  const double* q = p.grad_outer_q ? p.grad_outer_q + b * m + first : nullptr;
  for (int64_t j = 0; j < n; ++j) du[j] = p.grad_scale * (du[j] + bias + (q ? outer * q[j] : 0.0));
}

template <typename Scalar>
void nodes_backward_row(const PairwiseNodesProblem& p, int64_t b, int64_t i) {
  const int64_t nw = p.nodes_w, m = p.nodes_h * nw, first = i * nw;
  const double* inv = p.inv_norm + b * m + first;
  std::vector<double> du(nw), radial(nw, 0.0);
  // Paper form: d p = (d u - u (u . d u)) / ||p||, the projection that the gradient through the norm
  // adds; below the 1e-12 clamp the norm is a constant and only d u / 1e-12 remains (F.normalize).
  if (p.norm == NodeNorm::Paper) {
    for (int64_t c = 0; c < p.channels; ++c) {
      const double* u = p.nodes + (b * p.channels + c) * m + first;
      load_grad_u(p, b, c, first, nw, du.data());
      for (int64_t j = 0; j < nw; ++j) radial[j] += u[j] * du[j];
    }
    for (int64_t j = 0; j < nw; ++j) if (inv[j] >= 1e12) radial[j] = 0.0;
  }
  const int64_t* gs = p.grad_strides;
  Scalar* base = static_cast<Scalar*>(p.grad_features) + b * gs[0];
  for (int64_t c = 0; c < p.channels; ++c) {
    const double* u = p.nodes + (b * p.channels + c) * m + first;
    load_grad_u(p, b, c, first, nw, du.data());
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

template <typename Residual>
void centre(const PairwiseCentreProblem& p) {
  const int64_t C = p.channels, M = p.nodes;
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < p.batch * C; ++bc) {
    const double* u = p.nodes_in + bc * M;
    double sum = 0.0;
    for (int64_t k = 0; k < M; ++k) sum += u[k];
    p.mean[bc] = sum / double(M);
  }
  // Over chunks of nodes: q sums over channels, so a chunk owns its q; the per-channel sums of
  // squares are partial per chunk and added up after.
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  std::vector<double> partial(p.batch * chunks * C, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t work = 0; work < p.batch * chunks; ++work) {
    const int64_t b = work / chunks, k0 = (work % chunks) * kChunk, n = std::min(kChunk, M - k0);
    double q[kChunk] = {};
    for (int64_t c = 0; c < C; ++c) {
      const double mean = p.mean[b * C + c];
      const double* u = p.nodes_in + (b * C + c) * M + k0;
      Residual* r = static_cast<Residual*>(p.residual) + (b * C + c) * M + k0;
      double sumsq = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        const double v = u[k] - mean;
        r[k] = static_cast<Residual>(v);
        q[k] += v * mean;
        sumsq += v * v;
      }
      partial[work * C + c] = sumsq;
    }
    for (int64_t k = 0; k < n; ++k) p.q[b * M + k0 + k] = q[k];
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      double sumsq = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sumsq += partial[(b * chunks + chunk) * C + c];
      p.sumsq[b * C + c] = sumsq;
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

void pairwise_centre(const PairwiseCentreProblem& p) {
  if (p.residual_dtype == DType::Float32) centre<float>(p);
  else centre<double>(p);
}

}  // namespace skd::cpu
