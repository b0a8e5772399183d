// Fused SAGAN attention on the CPU: forward, backward and double backward without the N x N map.
//
// Work unit: one strip of an image's attention map, either `rows` query rows by all n keys (row
// passes) or `rows` key columns by all n queries (column passes), held transposed so that both
// kinds are the same code: a (rows x n) block of dot products, then weighted sums of vectors.
// A strip has about kStripElements entries per buffer and stays in L2. Row passes produce what is
// a sum over keys (out, lse, dq, grad dout, the row statistics); column passes produce what is a
// sum over queries (dk, dv), recomputing P_ij = exp(S_ij - lse_i) instead of reducing partial
// sums across threads, so no thread-private copies of dk/dv exist and the result is deterministic.
// The math of each pass is derived in docs/ops/attention.md; its "Precision at large energies" says
// why lse is float64, P is formed from lse's two halves, row statistics are P-weighted means
// accumulated in double, and the double backward's products are centred.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/numeric.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace skd::cpu {
namespace {

constexpr int64_t kStripElements = 65536;  // per buffer: 256 KB in float32
constexpr int64_t kMaxStripRows = 64;

int64_t strip_rows(int64_t n) { return std::clamp<int64_t>(kStripElements / n, 1, kMaxStripRows); }

// out[a * n + b] (+)= x_a . y_b: x (rows, d) row-major, yt = y transposed, (d, n).
template <typename T>
void dots(const T* x, int64_t rows, const T* yt, int64_t n, int64_t d, T* out, bool accumulate) {
  gemm(rows, n, d, x, d, 1, yt, n, out, n, accumulate);
}

// out_a (+)= sum_b m[a * n + b] y_b: m (rows, n), y (n, d), out (rows, d).
template <typename T>
void combine(const T* m, int64_t rows, int64_t n, const T* y, int64_t d, T* out, bool accumulate) {
  gemm(rows, d, n, m, n, 1, y, d, out, d, accumulate);
}

// out_b += sum_a m[a * n + b] y_a: m (rows, n), y (rows, d), out (n, d); the column sums of a strip.
template <typename T>
void combine_transposed(const T* m, int64_t rows, int64_t n, const T* y, int64_t d, T* out) {
  gemm(n, d, rows, m, 1, n, y, d, out, d, true);
}

// Per image, (n, d) -> (d, n): the layout in which dots() reads its right-hand side.
template <typename T>
std::vector<T> transposed(const void* base, int64_t batch, int64_t n, int64_t d) {
  std::vector<T> t(base ? size_t(batch * n * d) : 0);  // empty for an absent (zero) operand
  if (!base) return t;
  const T* x = static_cast<const T*>(base);
#pragma omp parallel for if (batch * n * d > (1 << 16))
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) t[(b * d + c) * n + i] = x[(b * n + i) * d + c];
  return t;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// With at least as many images as threads, a thread owns whole images, so the row pass can also add
// each strip's column sums (dk, dv) into its image's rows: no race, no column pass recomputing
// S and dP. With fewer images (B = 1 at large N) the strips of one image spread over the threads and
// a column pass computes the column sums instead.
bool whole_images_per_thread(const AttentionProblem& p) { return p.batch >= max_threads(); }

// Calls fn(b, first, count, scratch) for every strip of every image, in parallel over strips, or
// over images (each thread walking its images' strips in order) when `whole_images`; `scratch`
// holds `buffers` strips of rows x n entries, private to the thread.
template <typename T, typename Fn>
void for_each_strip(const AttentionProblem& p, int buffers, Fn&& fn, bool whole_images = false) {
  const int64_t rows = strip_rows(p.n), per_image = (p.n + rows - 1) / rows;
  const int64_t units = whole_images ? p.batch : p.batch * per_image;
  const double work = double(p.batch) * p.n * p.n * (p.dk + p.dv);
#pragma omp parallel if (units > 1 && work > 2e5)
  {
    std::vector<T> scratch(size_t(buffers) * rows * p.n);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = whole_images ? u : u / per_image;
      const int64_t first = whole_images ? 0 : (u % per_image) * rows;
      const int64_t last = whole_images ? p.n : first + 1;
      for (int64_t i0 = first; i0 < last; i0 += rows) fn(b, i0, std::min(rows, p.n - i0), scratch.data());
    }
  }
}

template <typename T>
struct View {  // per-image pointers into the contiguous (batch, n, d) arrays
  const AttentionProblem& p;
  const T* in(const void* base, int64_t b, int64_t d) const { return static_cast<const T*>(base) + b * p.n * d; }
  T* at(void* base, int64_t b, int64_t row, int64_t d) const { return static_cast<T*>(base) + (b * p.n + row) * d; }
  const T* row(const void* base, int64_t b, int64_t row, int64_t d) const {  // nullptr for an absent operand
    return base ? static_cast<const T*>(base) + (b * p.n + row) * d : nullptr;
  }
  // Image b of an operand transposed by transposed(): (d, n).
  const T* image_t(const std::vector<T>& t, int64_t b, int64_t d) const {
    return t.empty() ? nullptr : t.data() + b * p.n * d;
  }
};

// The saved lse (float64, B x N) as two T halves, lse = hi + lo. P = exp((S - hi) - lo): near the
// row maximum S - hi is exact, so P keeps lse's precision, where exp(S - T(lse)) would carry T(lse)'s
// rounding (~|lse| eps: 5e-4 at |S| ~ 1e4 in float32) as a relative error of every P of the row.
// Two subtractions in T cost less than converting S to double and back.
template <typename T>
struct LseHalves {
  std::vector<T> hi, lo;
  explicit LseHalves(const AttentionProblem& p) : hi(size_t(p.batch * p.n)), lo(size_t(p.batch * p.n)) {
    const double* lse = static_cast<const double*>(p.lse);
    for (int64_t r = 0; r < p.batch * p.n; ++r) {
      hi[r] = T(lse[r]);
      lo[r] = T(lse[r] - double(hi[r]));
    }
  }
  // Image b from row `first` on.
  const T* hi_at(const AttentionProblem& p, int64_t b, int64_t first) const { return hi.data() + b * p.n + first; }
  const T* lo_at(const AttentionProblem& p, int64_t b, int64_t first) const { return lo.data() + b * p.n + first; }
};

// P = exp((S - hi) - lo) for a strip, in place. Row strips subtract one lse per strip row; column
// strips (transposed) subtract lse_i along each strip row.
template <typename T>
void probabilities(T* s, int64_t rows, int64_t n, const T* hi, const T* lo, bool transposed) {
  for (int64_t a = 0; a < rows; ++a) {
    T* sa = s + a * n;
    if (transposed) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) sa[i] = exp_nonpositive((sa[i] - hi[i]) - lo[i]);
    } else {
      const T h = hi[a], l = lo[a];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) sa[j] = exp_nonpositive((sa[j] - h) - l);
    }
  }
}

// Row statistics are P-weighted means sum_j P_ij x_ij / sum_j P_ij, accumulated in double: a float32
// simd sum of n = 1024 terms keeps ~n/8 roundings, and D_i's error enters dq_i multiplied by |k|
// (large at large energies). Dividing by the computed sum of P makes sum_j P_ij (x_ij - mean_i)
// vanish up to rounding, so each row of dS sums to 0 (the key-bias gradient) where P is rounded.
// The means of x and, unless nullptr, of y, in one loop.
template <typename T>
void weighted_means(const T* prob, int64_t n, const T* x, T& mean_x, const T* y = nullptr, T* mean_y = nullptr) {
  double total = 0, sx = 0, sy = 0;
  if (y) {
#pragma omp simd reduction(+ : total, sx, sy)
    for (int64_t j = 0; j < n; ++j) {
      const double pj = prob[j];
      total += pj;
      sx += pj * x[j];
      sy += pj * y[j];
    }
    *mean_y = T(sy / total);
  } else {
#pragma omp simd reduction(+ : total, sx)
    for (int64_t j = 0; j < n; ++j) {
      const double pj = prob[j];
      total += pj;
      sx += pj * x[j];
    }
  }
  mean_x = T(sx / total);
}

template <typename T>
void forward(const AttentionProblem& p) {
  const View<T> at{p};
  const std::vector<T> k_t = transposed<T>(p.k, p.batch, p.n, p.dk);
  for_each_strip<T>(p, 1, [&](int64_t b, int64_t i0, int64_t r, T* s) {
    const int64_t n = p.n;
    dots(at.row(p.q, b, i0, p.dk), r, k_t.data() + b * n * p.dk, n, p.dk, s, false);
    double* lse = static_cast<double*>(p.lse) + b * n + i0;
    for (int64_t a = 0; a < r; ++a) {
      T* sa = s + a * n;
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, sa[j]);
      double z = 0;
#pragma omp simd reduction(+ : z)
      for (int64_t j = 0; j < n; ++j) {
        sa[j] = exp_nonpositive(sa[j] - m);
        z += double(sa[j]);
      }
      const T inv = T(1.0 / z);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) sa[j] *= inv;
      lse[a] = double(m) + std::log(z);  // m is exact: lse keeps log z's precision at any |S|
    }
    combine(s, r, n, at.in(p.v, b, p.dv), p.dv, at.at(p.out, b, i0, p.dv), false);
  });
}

// Row statistic D_i = sum_j P_ij dP_ij / sum_j P_ij and dS = P (dP - D), in place in dp.
template <typename T>
void softmax_gradient(const T* prob, T* dp, int64_t rows, int64_t n, T* d_out) {
  for (int64_t a = 0; a < rows; ++a) {
    const T* pa = prob + a * n;
    T* ga = dp + a * n;
    T d;
    weighted_means(pa, n, ga, d);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ga[j] = pa[j] * (ga[j] - d);
    d_out[a] = d;
  }
}

template <typename T>
void backward(const AttentionProblem& p) {
  const View<T> at{p};
  std::vector<T> row_d(size_t(p.batch * p.n));
  const bool one_pass = whole_images_per_thread(p);
  if (one_pass) {
    std::fill_n(static_cast<T*>(p.grad_k), p.batch * p.n * p.dk, T(0));
    std::fill_n(static_cast<T*>(p.grad_v), p.batch * p.n * p.dv, T(0));
  }
  // Rows: dq_i = sum_j dS_ij k_j, and D_i for the column pass (or, in one pass, the column sums
  // dk_j += dS_ij q_i, dv_j += P_ij dout_i of the strip). Each pass frees its transposed operands
  // before the next allocates its own.
  const LseHalves<T> lse(p);
  {
    const std::vector<T> k_t = transposed<T>(p.k, p.batch, p.n, p.dk), v_t = transposed<T>(p.v, p.batch, p.n, p.dv);
    for_each_strip<T>(p, 2, [&](int64_t b, int64_t i0, int64_t r, T* s) {
      const int64_t n = p.n;
      T* dp = s + r * n;
      dots(at.row(p.q, b, i0, p.dk), r, k_t.data() + b * n * p.dk, n, p.dk, s, false);
      probabilities(s, r, n, lse.hi_at(p, b, i0), lse.lo_at(p, b, i0), false);
      dots(at.row(p.dout, b, i0, p.dv), r, v_t.data() + b * n * p.dv, n, p.dv, dp, false);
      softmax_gradient(s, dp, r, n, &row_d[b * n + i0]);
      combine(dp, r, n, at.in(p.k, b, p.dk), p.dk, at.at(p.grad_q, b, i0, p.dk), false);
      if (one_pass) {
        combine_transposed(s, r, n, at.row(p.dout, b, i0, p.dv), p.dv, at.at(p.grad_v, b, 0, p.dv));
        combine_transposed(dp, r, n, at.row(p.q, b, i0, p.dk), p.dk, at.at(p.grad_k, b, 0, p.dk));
      }
    }, one_pass);
  }
  if (one_pass) return;
  // Columns: dk_j = sum_i dS_ij q_i, dv_j = sum_i P_ij dout_i.
  const std::vector<T> q_t = transposed<T>(p.q, p.batch, p.n, p.dk), dout_t = transposed<T>(p.dout, p.batch, p.n, p.dv);
  for_each_strip<T>(p, 2, [&](int64_t b, int64_t j0, int64_t r, T* st) {
    const int64_t n = p.n;
    T* dpt = st + r * n;
    const T* d = &row_d[b * n];
    dots(at.row(p.k, b, j0, p.dk), r, q_t.data() + b * n * p.dk, n, p.dk, st, false);
    probabilities(st, r, n, lse.hi_at(p, b, 0), lse.lo_at(p, b, 0), true);
    combine(st, r, n, at.in(p.dout, b, p.dv), p.dv, at.at(p.grad_v, b, j0, p.dv), false);
    dots(at.row(p.v, b, j0, p.dv), r, dout_t.data() + b * n * p.dv, n, p.dv, dpt, false);
    for (int64_t a = 0; a < r; ++a) {
      const T* pa = st + a * n;
      T* ga = dpt + a * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) ga[i] = pa[i] * (ga[i] - d[i]);
    }
    combine(dpt, r, n, at.in(p.q, b, p.dk), p.dk, at.at(p.grad_k, b, j0, p.dk), false);
  });
}

// One product x y^T of a strip: x (r, d) the strip's rows of one operand, y_t (d, n) the other
// operand transposed; x == nullptr when either operand is absent (a zero cotangent).
template <typename T>
struct Product { const T* x; const T* y_t; int64_t d; };

template <typename T>
void product(const Product<T>& t, int64_t r, int64_t n, T* out, bool accumulate) {
  if (t.x) dots(t.x, r, t.y_t, n, t.d, out, accumulate);
  else if (!accumulate) std::fill(out, out + r * n, T(0));
}

// The products a double-backward strip starts from: the scores, dP, A = a1 + a2 and B (see
// double_backward). The row pass takes its queries' products with all keys, the column pass its
// keys' products with all queries: the same maps, transposed, so one routine fills both.
template <typename T>
struct StripProducts { Product<T> scores, dprob, a1, a2, b; };

// The strip's four (r, n) buffers: P = exp(S - lse) (lse as hi + lo, see LseHalves), dP, A, B.
template <typename T>
void fill_strip(const StripProducts<T>& s, int64_t r, int64_t n, const T* hi, const T* lo, bool transposed,
                T* prob, T* dp, T* a, T* h) {
  product(s.scores, r, n, prob, false);
  probabilities(prob, r, n, hi, lo, transposed);
  product(s.dprob, r, n, dp, false);
  product(s.a1, r, n, a, false);
  product(s.a2, r, n, a, true);
  product(s.b, r, n, h, false);
}

// Double backward, two passes as in backward(). Per pair (i, j), with the notation of
// docs/ops/attention.md: A = gq_i.k_j + q_i.gk_j, B = dout_i.gv_j, G = P (A - Abar_i),
// dS2 = P (H - Hbar_i) = P ((dP - D_i)(A - Abar_i) + B - Hc_i), Hc_i = Cov_P(dP, A)_i + Bbar_i (the
// docs' H~_i): the centred form, free of the cancellation of C_i - 2 D_i Abar_i (D_i Abar_i ~
// |dP| |k| |gq| grows with the energies). The row pass stores D, Abar, Hc.
template <typename T>
void double_backward(const AttentionProblem& p) {
  const View<T> at{p};
  const int64_t rows_total = p.batch * p.n;
  std::vector<T> row_d(rows_total), row_abar(rows_total), row_hc(rows_total);
  const LseHalves<T> lse(p);
  const bool one_pass = whole_images_per_thread(p);  // as in backward()
  if (one_pass) {
    std::fill_n(static_cast<T*>(p.grad_k), p.batch * p.n * p.dk, T(0));
    std::fill_n(static_cast<T*>(p.grad_v), p.batch * p.n * p.dv, T(0));
  }
  // Buffers per strip: P, dP (then dS), A (then G), B/H (then dS2). Right-hand sides of dots()
  // transposed once per call (O(N * C)).
  {
    const std::vector<T> k_t = transposed<T>(p.k, p.batch, p.n, p.dk), v_t = transposed<T>(p.v, p.batch, p.n, p.dv);
    const std::vector<T> gk_t = transposed<T>(p.gk, p.batch, p.n, p.dk), gv_t = transposed<T>(p.gv, p.batch, p.n, p.dv);
    for_each_strip<T>(p, 4, [&](int64_t b, int64_t i0, int64_t r, T* s) {
      const int64_t n = p.n;
      T *prob = s, *dp = s + r * n, *a = s + 2 * r * n, *h = s + 3 * r * n;
      T* grad_q = at.at(p.grad_q, b, i0, p.dk);
      T* grad_dout = at.at(p.grad_dout, b, i0, p.dv);
      const T *q = at.row(p.q, b, i0, p.dk), *dout = at.row(p.dout, b, i0, p.dv);
      const T *k = at.image_t(k_t, b, p.dk), *v = at.image_t(v_t, b, p.dv);
      // S = q k^T, dP = dout v^T, A = gq k^T + q gk^T, B = dout gv^T.
      fill_strip<T>({{q, k, p.dk}, {dout, v, p.dv}, {at.row(p.gq, b, i0, p.dk), k, p.dk},
                     {p.gk ? q : nullptr, at.image_t(gk_t, b, p.dk), p.dk},
                     {p.gv ? dout : nullptr, at.image_t(gv_t, b, p.dv), p.dv}},
                    r, n, lse.hi_at(p, b, i0), lse.lo_at(p, b, i0), false, prob, dp, a, h);
      for (int64_t x = 0; x < r; ++x) {
        T *pa = prob + x * n, *dpa = dp + x * n, *aa = a + x * n, *ha = h + x * n;
        T d, abar;
        weighted_means(pa, n, dpa, d, aa, &abar);
        // Hc_i = sum_j P_ij ((dP_ij - D_i)(A_ij - Abar_i) + B_ij) / sum_j P_ij from the centred products:
        // no cancellation (see above). dS and G are final here; ha keeps the bracket until Hc_i is known.
        double total = 0, sum = 0;
#pragma omp simd reduction(+ : total, sum)
        for (int64_t j = 0; j < n; ++j) {
          const T dpc = dpa[j] - d, ac = aa[j] - abar, hj = dpc * ac + ha[j];
          total += double(pa[j]);
          sum += double(pa[j]) * double(hj);
          ha[j] = hj;
          aa[j] = pa[j] * ac;    // G
          dpa[j] = pa[j] * dpc;  // dS
        }
        const T hc = T(sum / total);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ha[j] = pa[j] * (ha[j] - hc);  // dS2
        row_d[b * n + i0 + x] = d;
        row_abar[b * n + i0 + x] = abar;
        row_hc[b * n + i0 + x] = hc;
      }
      // grad q_i = sum_j (dS gk_j + dS2 k_j); grad dout_i = sum_j (G v_j + P gv_j).
      combine(h, r, n, at.in(p.k, b, p.dk), p.dk, grad_q, false);
      if (p.gk) combine(dp, r, n, at.in(p.gk, b, p.dk), p.dk, grad_q, true);
      combine(a, r, n, at.in(p.v, b, p.dv), p.dv, grad_dout, false);
      if (p.gv) combine(prob, r, n, at.in(p.gv, b, p.dv), p.dv, grad_dout, true);
      if (one_pass) {  // grad k_j += sum_i (dS gq_i + dS2 q_i); grad v_j += sum_i G dout_i
        T* grad_k = at.at(p.grad_k, b, 0, p.dk);
        combine_transposed(h, r, n, at.row(p.q, b, i0, p.dk), p.dk, grad_k);
        if (p.gq) combine_transposed(dp, r, n, at.row(p.gq, b, i0, p.dk), p.dk, grad_k);
        combine_transposed(a, r, n, at.row(p.dout, b, i0, p.dv), p.dv, at.at(p.grad_v, b, 0, p.dv));
      }
    }, one_pass);
  }
  if (one_pass) return;
  // Columns: grad k_j = sum_i (dS gq_i + dS2 q_i); grad v_j = sum_i G dout_i.
  const std::vector<T> q_t = transposed<T>(p.q, p.batch, p.n, p.dk), dout_t = transposed<T>(p.dout, p.batch, p.n, p.dv);
  const std::vector<T> gq_t = transposed<T>(p.gq, p.batch, p.n, p.dk);
  for_each_strip<T>(p, 4, [&](int64_t b, int64_t j0, int64_t r, T* s) {
    const int64_t n = p.n;
    T *prob = s, *dp = s + r * n, *a = s + 2 * r * n, *h = s + 3 * r * n;
    const T *d = &row_d[b * n], *abar = &row_abar[b * n], *hc = &row_hc[b * n];
    const T *k = at.row(p.k, b, j0, p.dk), *q = at.image_t(q_t, b, p.dk), *dout = at.image_t(dout_t, b, p.dv);
    // The row pass's maps transposed: S^T = k q^T, dP^T = v dout^T, A^T = k gq^T + gk q^T, B^T = gv dout^T.
    fill_strip<T>({{k, q, p.dk}, {at.row(p.v, b, j0, p.dv), dout, p.dv},
                   {p.gq ? k : nullptr, at.image_t(gq_t, b, p.dk), p.dk}, {at.row(p.gk, b, j0, p.dk), q, p.dk},
                   {at.row(p.gv, b, j0, p.dv), dout, p.dv}},
                  r, n, lse.hi_at(p, b, 0), lse.lo_at(p, b, 0), true, prob, dp, a, h);
    for (int64_t x = 0; x < r; ++x) {
      T *pa = prob + x * n, *dpa = dp + x * n, *aa = a + x * n, *ha = h + x * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T dpc = dpa[i] - d[i], ac = aa[i] - abar[i];
        ha[i] = pa[i] * (dpc * ac + ha[i] - hc[i]);
        aa[i] = pa[i] * ac;
        dpa[i] = pa[i] * dpc;
      }
    }
    T* grad_k = at.at(p.grad_k, b, j0, p.dk);
    combine(h, r, n, at.in(p.q, b, p.dk), p.dk, grad_k, false);
    if (p.gq) combine(dp, r, n, at.in(p.gq, b, p.dk), p.dk, grad_k, true);
    combine(a, r, n, at.in(p.dout, b, p.dv), p.dv, at.at(p.grad_v, b, j0, p.dv), false);
  });
}

template <template <typename> class Pass>
void dispatch(const AttentionProblem& p) {
  if (p.dtype == DType::Float64) Pass<double>::run(p);
  else Pass<float>::run(p);
}

template <typename T> struct Forward { static void run(const AttentionProblem& p) { forward<T>(p); } };
template <typename T> struct Backward { static void run(const AttentionProblem& p) { backward<T>(p); } };
template <typename T> struct DoubleBackward { static void run(const AttentionProblem& p) { double_backward<T>(p); } };

}  // namespace

void attention_forward(const AttentionProblem& p) { dispatch<Forward>(p); }
void attention_backward(const AttentionProblem& p) { dispatch<Backward>(p); }
void attention_double_backward(const AttentionProblem& p) { dispatch<DoubleBackward>(p); }

}  // namespace skd::cpu
