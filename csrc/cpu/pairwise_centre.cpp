// Centring of the pair-wise nodes on the CPU (see cpu/pairwise_centre.h).
//
// Work unit: one image and a chunk of kChunk nodes, all channels. q sums over channels, so a chunk
// owns its q; the per-channel sums of squares sum over nodes, so each chunk leaves partial sums that
// are added up after, in a fixed order (the result does not depend on the thread count).
#include "cpu/pairwise_centre.h"

#include <algorithm>
#include <vector>

namespace skd::cpu {
namespace {

constexpr int64_t kChunk = 256;

int64_t chunks_of(int64_t nodes) { return (nodes + kChunk - 1) / kChunk; }

// mean[r] = the mean of row r of u (rows, nodes).
void row_means(const double* u, int64_t rows, int64_t nodes, double* mean) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t k = 0; k < nodes; ++k) sum += u[r * nodes + k];
    mean[r] = sum / double(nodes);
  }
}

// Calls fn(b, k0, n, partial_row) for every chunk of every image in parallel, then adds the chunks'
// partial rows (`rows` sums each) up into out (batch, rows).
template <typename Fn>
void over_chunks(int64_t batch, int64_t nodes, int64_t rows, double* out, Fn&& fn) {
  const int64_t chunks = chunks_of(nodes);
  std::vector<double> partial(batch * chunks * rows, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t work = 0; work < batch * chunks; ++work) {
    const int64_t k0 = (work % chunks) * kChunk;
    fn(work / chunks, k0, std::min(kChunk, nodes - k0), &partial[work * rows]);
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t row = 0; row < rows; ++row) {
      double sum = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[(b * chunks + chunk) * rows + row];
      out[b * rows + row] = sum;
    }
  }
}

template <typename Residual>
void centre(const PairwiseCentreProblem& p) {
  const int64_t C = p.channels, M = p.nodes;
  row_means(p.nodes_in, p.batch * C, M, p.mean);
  over_chunks(p.batch, M, C, p.sumsq, [&](int64_t b, int64_t k0, int64_t n, double* sumsq) {
    double q[kChunk] = {};
    for (int64_t c = 0; c < C; ++c) {
      const double mean = p.mean[b * C + c];
      const double* u = p.nodes_in + (b * C + c) * M + k0;
      Residual* r = static_cast<Residual*>(p.residual) + b * p.residual_batch_stride + c * M + k0;
      double ss = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        const double v = u[k] - mean;
        r[k] = static_cast<Residual>(v);
        q[k] += v * mean;
        ss += v * v;
      }
      sumsq[c] = ss;
    }
    std::copy(q, q + n, p.q + b * M + k0);
  });
}

template <typename Out>
void centre_pair(const PairwiseCentrePairProblem& p) {
  const int64_t C = p.channels, M = p.nodes;
  row_means(p.nodes_s, p.batch * C, M, p.mean_s);
  row_means(p.nodes_t, p.batch * C, M, p.mean_t);
  over_chunks(p.batch, M, 2 * C, p.sumsq, [&](int64_t b, int64_t k0, int64_t n, double* sumsq) {
    double q_s[kChunk] = {}, q_t[kChunk] = {};
    for (int64_t c = 0; c < C; ++c) {
      const double mean_s = p.mean_s[b * C + c], mean_t = p.mean_t[b * C + c];
      const double* us = p.nodes_s + (b * C + c) * M + k0;
      const double* ut = p.nodes_t + (b * C + c) * M + k0;
      Out* sum_row = static_cast<Out*>(p.stacked) + (b * 2 * C + c) * M + k0;
      Out* diff_row = sum_row + C * M;
      double ss = 0.0, ee = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        const double rs = us[k] - mean_s, rt = ut[k] - mean_t;
        q_s[k] += rs * mean_s;
        q_t[k] += rt * mean_t;
        const double sv = 0.5 * (rs + rt), ev = rs - rt;
        sum_row[k] = static_cast<Out>(sv);
        diff_row[k] = static_cast<Out>(ev);
        ss += sv * sv;
        ee += ev * ev;
      }
      sumsq[c] = ss;
      sumsq[C + c] = ee;
    }
    std::copy(q_s, q_s + n, p.q_s + b * M + k0);
    std::copy(q_t, q_t + n, p.q_t + b * M + k0);
  });
}

}  // namespace

void pairwise_centre(const PairwiseCentreProblem& p) {
  if (p.residual_dtype == DType::Float32) centre<float>(p);
  else centre<double>(p);
}

void pairwise_centre_pair(const PairwiseCentrePairProblem& p) {
  if (p.stacked_dtype == DType::Float32) centre_pair<float>(p);
  else centre_pair<double>(p);
}

}  // namespace skd::cpu
