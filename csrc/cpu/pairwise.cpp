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

// The normaliser of the node whose pooled feature has squared norm `sumsq`.
inline double inverse_norm(const PairwiseNodesProblem& p, double sumsq) {
  const double norm = std::sqrt(sumsq);
  return p.norm == NodeNorm::Official ? 1.0 / (norm + 1e-8) : 1.0 / std::max(norm, 1e-12);
}

// Max or mean of every window of one channel over a row of nodes, into out[0, nw) and arg[0, nw).
// Vectorised by columns: the window rows are folded into per-column maxima (and the row that gave
// each) or sums with elementwise selects along contiguous input rows, then each node reduces its
// columns. Ties go to the smallest flat index, as max_pool2d's scan; a window holding a NaN is
// redone by the scalar scan (NaN wins there, as in max_pool2d).
template <bool kUnitStride, bool kArgmax, typename Scalar, typename Acc>
void pool_channel(const PairwiseNodesProblem& p, const Scalar* plane, int64_t i, double* out, int32_t* arg,
                  Acc* col, int32_t* col_row) {
  const int64_t* st = p.feature_strides;
  const int64_t sw = kUnitStride ? 1 : st[3];  // a compile-time 1 lets the row loops vectorise
  const int64_t width = p.width, h0 = i * p.window_h, h1 = std::min(h0 + p.window_h, p.height);
  const bool max = p.pooling == NodePooling::Max;
  int32_t nans = 0;
  for (int64_t h = h0; h < h1; ++h) {
    const Scalar* row = plane + h * st[2];
    const int32_t hh = int32_t(h);
    if (h == h0) {
      for (int64_t w = 0; w < width; ++w) {
        col[w] = to_acc(row[w * sw]);
        col_row[w] = hh;
        nans += col[w] != col[w];
      }
    } else if (max) {  // same-width lanes (float values, int32 rows) so that the selects vectorise
      for (int64_t w = 0; w < width; ++w) {
        const Acc v = to_acc(row[w * sw]);
        nans += v != v;
        const bool take = v > col[w];
        col[w] = take ? v : col[w];
        if (kArgmax) col_row[w] = take ? hh : col_row[w];
      }
    } else {
      for (int64_t w = 0; w < width; ++w) col[w] += to_acc(row[w * sw]);
    }
  }
  for (int64_t j = 0; j < p.nodes_w; ++j) {
    const int64_t w0 = j * p.window_w, w1 = std::min(w0 + p.window_w, width);
    double acc = col[w0];
    int32_t best = int32_t(col_row[w0] * width + w0);
    for (int64_t w = w0 + 1; w < w1; ++w) {
      if (!max) { acc += col[w]; continue; }
      const int32_t flat = int32_t(col_row[w] * width + w);
      if (col[w] > acc || (col[w] == acc && flat < best)) { acc = col[w]; best = flat; }
    }
    if (max && nans) {  // rare: the exact scan of max_pool2d for this window
      acc = -INFINITY;
      best = int32_t(h0 * width + w0);
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const double v = to_acc(plane[h * st[2] + w * st[3]]);
          if ((v > acc || std::isnan(v)) && !std::isnan(acc)) { acc = v; best = int32_t(h * width + w); }
        }
      }
    }
    out[j] = max ? acc : acc / double((h1 - h0) * (w1 - w0));
    if (arg) arg[j] = best;
  }
}

// The hot loops are compiled twice, for AVX2 (x86-64-v3) and the baseline, and picked at load time.
template <typename Scalar, bool kUnitStride>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void nodes_forward_row(const PairwiseNodesProblem& p, int64_t b, int64_t i) {
  using Acc = decltype(to_acc(Scalar{}));
  const int64_t sw = kUnitStride ? 1 : p.feature_strides[3];
  const int64_t nw = p.nodes_w, m = p.nodes_h * nw, first = i * nw;
  const int64_t* st = p.feature_strides;
  const Scalar* base = static_cast<const Scalar*>(p.features) + b * st[0];
  std::vector<double> sumsq(nw, 0.0), sums(p.pooling == NodePooling::Avg ? p.width : 0);
  std::vector<Acc> maxima(p.pooling == NodePooling::Max ? p.width : 0);
  std::vector<int32_t> col_row(p.width);
  for (int64_t c = 0; c < p.channels; ++c) {
    double* out = p.nodes + (b * p.channels + c) * m + first;
    int32_t* arg = p.argmax ? p.argmax + (b * p.channels + c) * m + first : nullptr;
    const Scalar* plane = base + c * st[1];
    if (p.pooling == NodePooling::None) {
      const Scalar* row = plane + i * st[2];
      for (int64_t j = 0; j < nw; ++j) out[j] = to_acc(row[j * sw]);
    } else {
      // "No gradient wanted, no argmax" is common (the teacher): its own loop.
      if (p.pooling == NodePooling::Max && arg) {
        pool_channel<kUnitStride, true>(p, plane, i, out, arg, maxima.data(), col_row.data());
      } else if (p.pooling == NodePooling::Max) {
        pool_channel<kUnitStride, false>(p, plane, i, out, arg, maxima.data(), col_row.data());
      } else {  // sums in double
        pool_channel<kUnitStride, false>(p, plane, i, out, arg, sums.data(), col_row.data());
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
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
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
    for (int64_t j = 0; j < nw; ++j) du[j] = (du[j] - u[j] * radial[j]) * inv[j];  // now d p
    if (p.pooling == NodePooling::None) {
      Scalar* row = plane + i * gs[2];
      for (int64_t j = 0; j < nw; ++j) store(row + j * gs[3], du[j]);
      continue;
    }
    // Every position of the node row's windows is written: d p / count (avg), or d p at the
    // window's maximum and 0 elsewhere (max); row by row, contiguous runs per window.
    const int64_t h0 = i * p.window_h, h1 = std::min(h0 + p.window_h, p.height);
    for (int64_t h = h0; h < h1; ++h) {
      Scalar* row = plane + h * gs[2];
      for (int64_t j = 0; j < nw; ++j) {
        const int64_t w0 = j * p.window_w, w1 = std::min(w0 + p.window_w, p.width);
        const double share = arg ? du[j] : du[j] / double((h1 - h0) * (w1 - w0));
        const int64_t target = arg ? arg[j] - h * p.width : -1;  // column of the maximum in this row, if any
        if (gs[3] == 1) {
          for (int64_t w = w0; w < w1; ++w) store(row + w, (!arg || w == target) ? share : 0.0);
        } else {
          for (int64_t w = w0; w < w1; ++w) store(row + w * gs[3], (!arg || w == target) ? share : 0.0);
        }
      }
    }
  }
}

// Node size 1 on maps whose rows are contiguous: nodes are flat positions, so the work unit is a
// chunk of kFlatChunk positions of one image, all channels. Each channel step then moves kFlatChunk
// contiguous elements (a node-row unit would touch a new page per channel for 65 of them).
constexpr int64_t kFlatChunk = 1024;

inline bool flat_layout(const PairwiseNodesProblem& p, const int64_t* strides) {
  return p.pooling == NodePooling::None && strides[3] == 1 && strides[2] == p.width;
}

template <typename Scalar>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void nodes_forward_flat(const PairwiseNodesProblem& p, int64_t b, int64_t k0) {
  const int64_t m = p.height * p.width, n = std::min(kFlatChunk, m - k0);
  double sumsq[kFlatChunk] = {};
  for (int64_t c = 0; c < p.channels; ++c) {
    const Scalar* in = static_cast<const Scalar*>(p.features) + b * p.feature_strides[0] + c * p.feature_strides[1] + k0;
    double* out = p.nodes + (b * p.channels + c) * m + k0;
    for (int64_t k = 0; k < n; ++k) {
      out[k] = to_acc(in[k]);
      sumsq[k] += out[k] * out[k];
    }
  }
  double* inv = p.inv_norm + b * m + k0;
  for (int64_t k = 0; k < n; ++k) inv[k] = inverse_norm(p, sumsq[k]);
  for (int64_t c = 0; c < p.channels; ++c) {
    double* out = p.nodes + (b * p.channels + c) * m + k0;
    for (int64_t k = 0; k < n; ++k) out[k] *= inv[k];
  }
}

template <typename Scalar>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void nodes_backward_flat(const PairwiseNodesProblem& p, int64_t b, int64_t k0) {
  const int64_t m = p.height * p.width, n = std::min(kFlatChunk, m - k0);
  const double* inv = p.inv_norm + b * m + k0;
  double du[kFlatChunk], radial[kFlatChunk] = {};
  if (p.norm == NodeNorm::Paper) {  // see nodes_backward_row
    for (int64_t c = 0; c < p.channels; ++c) {
      const double* u = p.nodes + (b * p.channels + c) * m + k0;
      load_grad_u(p, b, c, k0, n, du);
      for (int64_t k = 0; k < n; ++k) radial[k] += u[k] * du[k];
    }
    for (int64_t k = 0; k < n; ++k) radial[k] = inv[k] >= 1e12 ? 0.0 : radial[k];
  }
  for (int64_t c = 0; c < p.channels; ++c) {
    const double* u = p.nodes + (b * p.channels + c) * m + k0;
    Scalar* out = static_cast<Scalar*>(p.grad_features) + b * p.grad_strides[0] + c * p.grad_strides[1] + k0;
    load_grad_u(p, b, c, k0, n, du);
    for (int64_t k = 0; k < n; ++k) store(out + k, (du[k] - u[k] * radial[k]) * inv[k]);
  }
}

template <typename Scalar>
void over_chunks(const PairwiseNodesProblem& p, void (*chunk)(const PairwiseNodesProblem&, int64_t, int64_t)) {
  const int64_t m = p.height * p.width, chunks = (m + kFlatChunk - 1) / kFlatChunk;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < p.batch * chunks; ++w) chunk(p, w / chunks, (w % chunks) * kFlatChunk);
}

// Pooled nodes: the work unit is one image and a chunk of kPlaneChunk channels, each channel's
// plane read from top to bottom (a node-row unit would read half planes, jumping between them,
// which the prefetchers follow badly). The node norms need every channel: per-chunk partial sums of
// squares, added up in a second pass that also scales the nodes.
constexpr int64_t kPlaneChunk = 32;

template <typename Scalar, bool kUnitStride>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void pool_planes(const PairwiseNodesProblem& p, int64_t b, int64_t c0, int64_t c1, double* partial) {
  using Acc = decltype(to_acc(Scalar{}));
  const int64_t nw = p.nodes_w, m = p.nodes_h * nw;
  std::vector<double> sums(p.pooling == NodePooling::Avg ? p.width : 0);
  std::vector<Acc> maxima(p.pooling == NodePooling::Max ? p.width : 0);
  std::vector<int32_t> col_row(p.width);
  for (int64_t c = c0; c < c1; ++c) {
    const Scalar* plane = static_cast<const Scalar*>(p.features) + b * p.feature_strides[0] + c * p.feature_strides[1];
    for (int64_t i = 0; i < p.nodes_h; ++i) {
      double* out = p.nodes + (b * p.channels + c) * m + i * nw;
      int32_t* arg = p.argmax ? p.argmax + (b * p.channels + c) * m + i * nw : nullptr;
      if (p.pooling == NodePooling::Max && arg) {
        pool_channel<kUnitStride, true>(p, plane, i, out, arg, maxima.data(), col_row.data());
      } else if (p.pooling == NodePooling::Max) {  // no gradient wanted (the teacher): no argmax
        pool_channel<kUnitStride, false>(p, plane, i, out, arg, maxima.data(), col_row.data());
      } else {  // sums in double
        pool_channel<kUnitStride, false>(p, plane, i, out, arg, sums.data(), col_row.data());
      }
      for (int64_t j = 0; j < nw; ++j) partial[i * nw + j] += out[j] * out[j];
    }
  }
}

template <typename Scalar, bool kUnitStride>
void forward_pooled(const PairwiseNodesProblem& p) {
  const int64_t m = p.nodes_h * p.nodes_w, chunks = (p.channels + kPlaneChunk - 1) / kPlaneChunk;
  std::vector<double> partial(p.batch * chunks * m, 0.0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t w = 0; w < p.batch * chunks; ++w) {
    const int64_t b = w / chunks, c0 = (w % chunks) * kPlaneChunk;
    pool_planes<Scalar, kUnitStride>(p, b, c0, std::min(c0 + kPlaneChunk, p.channels), &partial[w * m]);
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t k = 0; k < m; ++k) {
      double sumsq = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sumsq += partial[(b * chunks + chunk) * m + k];
      p.inv_norm[b * m + k] = inverse_norm(p, sumsq);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t bc = 0; bc < p.batch * p.channels; ++bc) {
    const double* inv = p.inv_norm + (bc / p.channels) * m;
    double* out = p.nodes + bc * m;
    for (int64_t k = 0; k < m; ++k) out[k] *= inv[k];
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

template <typename Scalar> struct Forward {
  static void run(const PairwiseNodesProblem& p) {
    // Unit stride along rows (NCHW) is the common case: a compile-time stride lets the loops vectorise.
    const bool unit = p.feature_strides[3] == 1;
    if (flat_layout(p, p.feature_strides)) over_chunks<Scalar>(p, nodes_forward_flat<Scalar>);
    else if (p.pooling != NodePooling::None && unit) forward_pooled<Scalar, true>(p);
    else if (p.pooling != NodePooling::None) forward_pooled<Scalar, false>(p);
    else if (unit) over_rows<Scalar>(p, nodes_forward_row<Scalar, true>);
    else over_rows<Scalar>(p, nodes_forward_row<Scalar, false>);
  }
};
template <typename Scalar> struct Backward {
  static void run(const PairwiseNodesProblem& p) {
    if (flat_layout(p, p.grad_strides)) over_chunks<Scalar>(p, nodes_backward_flat<Scalar>);
    else over_rows<Scalar>(p, nodes_backward_row<Scalar>);
  }
};

}  // namespace

void pairwise_nodes_forward(const PairwiseNodesProblem& p) { dispatch<Forward>(p); }
void pairwise_nodes_backward(const PairwiseNodesProblem& p) { dispatch<Backward>(p); }

}  // namespace skd::cpu
