// Fused pixel-wise distillation on the CPU. The math, including the cancellation-free form taken
// where the student is close to the teacher: docs/ops/pixelwise.md ("How the kernels compute it").
//
// Work unit: a segment of up to kSegment pixels of one image and all K classes. In NCHW the pixels
// of an image are one contiguous range for every class, so a segment runs along it across rows
// (along one row for other layouts) and each inner loop runs over pixels and vectorises. The
// segment's K x kSegment logits are read from memory once, converted to the accumulation type and
// kept, with their exponentials, in a per-thread scratch that stays in L2; the passes over it
// (maxima, sums, the close-distribution sums, gradients) cost cache traffic only.
#include "cpu/pixelwise.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/numeric.h"

namespace skd::cpu {
namespace {

constexpr int64_t kSegment = 64;
constexpr int64_t kCompensateAbove = 32;  // classes; see segment_sums

// Below these KL values (as the standard form computes them) a pixel takes the close-distribution
// form: for the KL itself where the standard form's log-partition terms (about log K) cancel to
// it, for the student's gradient where p_s - q_t becomes a difference of nearly equal
// probabilities. Random logits of scale 1 (the benchmark) have KL > 0.3 almost everywhere.
#ifndef SKD_CLOSE_LOSS
#define SKD_CLOSE_LOSS 0.25
#endif
template <typename Acc> constexpr Acc kCloseForLoss = Acc(SKD_CLOSE_LOSS);
template <typename Acc> constexpr Acc kCloseForGradient = Acc(0.1);

// phi(v) = e^v - 1 - v is v^2 times a series for |v| <= kSeries (e^v - 1 - v would lose log2(2/|v|)
// bits) and computed directly beyond (losing at most 2 bits at |v| = 1 in float, 5 at 1/4 in double).
template <typename Acc> constexpr Acc kSeries = Acc(1);
template <> constexpr double kSeries<double> = 0.25;

// (e^v - 1 - v) / v^2 = sum_{k>=2} v^(k-2) / k!, truncated where the next term is below the type's
// rounding on |v| <= kSeries: float up to v^11 (2/12! = 4e-9), double up to v^13 (2/4^12/14! = 1e-19).
inline float phi_over_square(float v) {
  float p = 1.0f / 39916800;
  for (float k : {3628800.0f, 362880.0f, 40320.0f, 5040.0f, 720.0f, 120.0f, 24.0f, 6.0f, 2.0f}) p = p * v + 1.0f / k;
  return p;
}
inline double phi_over_square(double v) {
  double p = 1.0 / 6227020800;
  for (double k : {479001600.0, 39916800.0, 3628800.0, 362880.0, 40320.0, 5040.0, 720.0, 120.0, 24.0, 6.0, 2.0})
    p = p * v + 1.0 / k;
  return p;
}

// exp(d * inv_tau + d * inv_tau_lo) for d <= 0, inv_tau_lo the part of 1/tau that float rounds off.
// The product enters the range reduction's FMA unrounded: rounding x = d / tau to float first
// would cost a relative error of |x| 2^-24 in the probability (2e-6 at x = -35), the largest error
// left where every pixel is nearly one-hot. Otherwise as exp_nonpositive (cpu/numeric.h): exactly
// 0 below about -86.6, NaN stays NaN, about 2 ulp.
inline float exp_scaled(float d, float inv_tau, float inv_tau_lo) {
  const float y = d * (inv_tau * 1.44269504088896341f);
  const bool underflow = y < -125.0f;  // also -inf; the value computed below is then discarded
  const int n = static_cast<int>((underflow ? -125.0f : y) - 0.5f);  // round to nearest for y <= 0
  const float nf = static_cast<float>(n);
  float r = std::fma(d, inv_tau, nf * -0.693359375f);  // Cody-Waite ln 2 split; nf * hi is exact
  r = std::fma(nf, 2.12194440e-4f, std::fma(d, inv_tau_lo, r));
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return underflow ? 0.0f : p * bits_to_float(uint32_t(n + 127) << 23);
}
inline double exp_scaled(double d, double inv_tau, double) { return std::exp(d * inv_tau); }

// The per-pixel logarithms and exponential, written to vectorise like exp_scaled: each pixel needs
// two or three, and libm's scalar calls cost as much as the class loop for K = 19.
// log(x) for x > 0 (finite, normal), Cephes' single-precision polynomial, about 1 ulp; NaN stays NaN.
inline float log_positive(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int>(bits >> 23) - 127);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // x = m 2^e, m in [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1.0f : e;
  const float f = m - 1.0f, z = f * f;  // f in [-0.29, 0.41], exact
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z + e * -2.12194440e-4f - 0.5f * z;
  const float result = (f + y) + e * 0.693359375f;
  return x == x ? result : x;
}
inline double log_positive(double x) { return std::log(x); }

// log1p(x) for x >= 0: log(1 + x) x / ((1 + x) - 1) corrects the rounding of 1 + x (Goldberg).
inline float log1p_nonnegative(float x) {
  const float u = 1.0f + x;
  return u == 1.0f ? x : log_positive(u) * (x / (u - 1.0f));
}
inline double log1p_nonnegative(double x) { return std::log1p(x); }

// exp(x) for |x| <= 87 (here -mean u, within log K + 1 of 0 for a close pixel), as exp_scaled.
inline float exp_moderate(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  const float y = x * 1.44269504088896341f;
  const int n = static_cast<int>(y + (y < 0.0f ? -0.5f : 0.5f));
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(uint32_t(n + 127) << 23);
}
inline double exp_moderate(double x) { return std::exp(x); }

// a - b as hi + lo exactly (Knuth's two-sum); lo is 0 where hi is infinite or NaN.
template <typename Acc>
inline void two_diff(Acc a, Acc b, Acc& hi, Acc& lo) {
  hi = a - b;
  const Acc bb = hi - a;
  lo = (a - (hi - bb)) - (b + bb);
  lo = hi - hi == Acc(0) ? lo : Acc(0);
}

// weight * value, where a class of teacher weight exactly 0 (a -inf teacher logit) adds 0 even when
// `value` is infinite: the 0 log 0 = 0 of the KL. A NaN weight fails the test and stays NaN.
template <typename Acc>
inline Acc weighted(Acc weight, Acc value) {
  return weight == Acc(0) ? Acc(0) : weight * value;
}

template <typename Acc>
struct Scratch {
  // Each (K, kSegment). s, t: the logits converted to Acc, where they cannot be read in place;
  // es, et = exp(x), exp(y) with x, y the max-shifted scaled logits; u = x - y (close segments);
  // r = q_t (e^v - 1) of the close form.
  std::vector<Acc> s, t, es, et, u, r;
  // Where each class's logits are read: the input itself when it is Acc and contiguous along the
  // segment (NCHW float/double), else s and t. Unscaled: s - t must be formed before rounding by 1/tau.
  std::vector<const Acc*> s_row, t_row;
  // Per pixel: maxima and the class holding each (the first; -1 if none), partition sums and the
  // same without the maximum's exact 1 (zs = 1 + zs_rest), sum_c q_t u_c (unscaled, unnormalised,
  // then the mean), sum_c q_t x_c (cross-entropy), the close form's B and exp(-mean u) / zt, and
  // 0/1 masks. All Acc, so that the loops over them vectorise.
  Acc ms[kSegment], mt[kSegment], arg_s[kSegment], arg_t[kSegment], zs[kSegment], zt[kSegment],
      zs_rest[kSegment], zt_rest[kSegment], mean_u[kSegment], mean_x[kSegment], close_sum[kSegment],
      shift[kSegment], valid[kSegment], close[kSegment];
  explicit Scratch(int64_t classes)
      : s(classes * kSegment), t(classes * kSegment), es(classes * kSegment), et(classes * kSegment),
        u(classes * kSegment), r(classes * kSegment), s_row(classes), t_row(classes) {}
};

// A segment: image b, its pixels first.. first + n - 1, counted flat (h * W + w).
struct Segment {
  int64_t b, first, n;
};

// Element offset of (b, c, flat pixel f) for strides st.
inline int64_t offset(const int64_t* st, int64_t width, int64_t b, int64_t c, int64_t f) {
  return b * st[0] + c * st[1] + (f / width) * st[2] + (f % width) * st[3];
}

// Pass 1: where each class's logits are (converted where needed), and the per-pixel maxima.
template <typename Scalar, typename Acc>
void load_segment(const PixelwiseProblem& p, const Segment& g, Scratch<Acc>& sc) {
  const int64_t n = g.n, sws = p.student_strides[3], tws = p.teacher_strides[3];
  Acc* __restrict ms = sc.ms;
  Acc* __restrict mt = sc.mt;
  Acc* __restrict arg_s = sc.arg_s;
  Acc* __restrict arg_t = sc.arg_t;
  for (int64_t j = 0; j < n; ++j) {
    ms[j] = -std::numeric_limits<Acc>::infinity();
    mt[j] = -std::numeric_limits<Acc>::infinity();
    arg_s[j] = Acc(-1);
    arg_t[j] = Acc(-1);
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const Scalar* sp = static_cast<const Scalar*>(p.student) + offset(p.student_strides, p.width, g.b, c, g.first);
    const Scalar* tp = static_cast<const Scalar*>(p.teacher) + offset(p.teacher_strides, p.width, g.b, c, g.first);
    if (std::is_same_v<Scalar, Acc> && sws == 1 && tws == 1) {
      sc.s_row[c] = reinterpret_cast<const Acc*>(sp);
      sc.t_row[c] = reinterpret_cast<const Acc*>(tp);
    } else {
      Acc* __restrict s_copy = &sc.s[c * kSegment];
      Acc* __restrict t_copy = &sc.t[c * kSegment];
      for (int64_t j = 0; j < n; ++j) { s_copy[j] = to_acc(sp[j * sws]); t_copy[j] = to_acc(tp[j * tws]); }
      sc.s_row[c] = s_copy;
      sc.t_row[c] = t_copy;
    }
    const Acc* __restrict s = sc.s_row[c];
    const Acc* __restrict t = sc.t_row[c];
    const Acc class_index = static_cast<Acc>(c);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      arg_s[j] = s[j] > ms[j] ? class_index : arg_s[j];
      arg_t[j] = t[j] > mt[j] ? class_index : arg_t[j];
      ms[j] = std::max(ms[j], s[j]);
      mt[j] = std::max(mt[j], t[j]);
    }
  }
}

// Pass 2: partition sums and the q_t-weighted sums of x - y (and of x for the cross-entropy), in
// units of the logits (1/tau applied per pixel). Every exponent is <= 0, so nothing overflows.
// The partition sums are accumulated without the maximum's term, exactly 1: then log zs =
// log1p(zs_rest) keeps the cross-entropy of a confident student that agrees (about zs_rest) and
// p_s - q_t of the shared top class, (zt_rest - zs_rest) / (zs zt), exact. (The maximum's term is
// added as e - 1 = 0, so that a NaN there still propagates.) With many classes the sums are
// compensated (Kahan): a sum of K terms in float loses up to K/2 ulp, and its error scales every
// probability of the pixel alike (2e-7 at K = 150, 3 eps).
template <typename Acc, PixelLoss kLoss, bool kCompensated>
void segment_sums(int64_t classes, int64_t n, Acc inv_tau, Acc inv_tau_lo, Scratch<Acc>& sc) {
  const Acc* __restrict ms = sc.ms;
  const Acc* __restrict mt = sc.mt;
  const Acc* __restrict arg_s = sc.arg_s;
  const Acc* __restrict arg_t = sc.arg_t;
  Acc* __restrict zs = sc.zs_rest;
  Acc* __restrict zt = sc.zt_rest;
  Acc* __restrict mean_u = sc.mean_u;
  Acc* __restrict mean_x = sc.mean_x;
  Acc zs_error[kSegment], zt_error[kSegment];  // the compensations' running errors
  for (int64_t j = 0; j < n; ++j) {
    zs[j] = 0; zt[j] = 0; mean_u[j] = 0; mean_x[j] = 0; zs_error[j] = 0; zt_error[j] = 0;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const Acc* __restrict s = sc.s_row[c];
    const Acc* __restrict t = sc.t_row[c];
    Acc* __restrict es = &sc.es[c * kSegment];
    Acc* __restrict et = &sc.et[c * kSegment];
    const Acc class_index = static_cast<Acc>(c);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc ds = s[j] - ms[j], dt = t[j] - mt[j];
      const Acc e_s = exp_scaled(ds, inv_tau, inv_tau_lo), e_t = exp_scaled(dt, inv_tau, inv_tau_lo);
      es[j] = e_s;
      et[j] = e_t;
      const Acc rest_s = arg_s[j] == class_index ? e_s - Acc(1) : e_s;
      const Acc rest_t = arg_t[j] == class_index ? e_t - Acc(1) : e_t;
      if (kCompensated) {
        const Acc ys = rest_s - zs_error[j], yt = rest_t - zt_error[j];
        const Acc new_zs = zs[j] + ys, new_zt = zt[j] + yt;
        zs_error[j] = (new_zs - zs[j]) - ys;
        zt_error[j] = (new_zt - zt[j]) - yt;
        zs[j] = new_zs;
        zt[j] = new_zt;
      } else {
        zs[j] += rest_s;
        zt[j] += rest_t;
      }
      // Unclamped: a -inf student logit under a positive teacher weight makes the loss +inf, as in
      // the official loss; a class of teacher weight 0 adds nothing (0 log 0 = 0).
      mean_u[j] += weighted(e_t, ds - dt);
      if (kLoss == PixelLoss::CrossEntropy) mean_x[j] += weighted(e_t, ds);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    sc.zs[j] = Acc(1) + zs[j];
    sc.zt[j] = Acc(1) + zt[j];
  }
}

// Pass 3 (segments with a close pixel): u = ((s - t) - (ms - mt)) / tau with both differences
// exact (two-sums) and its q_t-weighted mean. Where the student is close to the teacher, up to any
// per-pixel offset, u is small, and ds - dt of pass 2 would carry the rounding of ds and dt, as
// large as the logits.
template <typename Acc>
void segment_differences(int64_t classes, int64_t n, Acc inv_tau, Scratch<Acc>& sc) {
  Acc dm_hi[kSegment], dm_lo[kSegment], sum[kSegment];
  for (int64_t j = 0; j < n; ++j) {
    two_diff(sc.ms[j], sc.mt[j], dm_hi[j], dm_lo[j]);
    sum[j] = 0;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const Acc* __restrict s = sc.s_row[c];
    const Acc* __restrict t = sc.t_row[c];
    const Acc* __restrict et = &sc.et[c * kSegment];
    Acc* __restrict u = &sc.u[c * kSegment];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      Acc d_hi, d_lo;
      two_diff(s[j], t[j], d_hi, d_lo);
      // d_hi - dm_hi is exact where it matters (both near the same offset: Sterbenz).
      const Acc uj = ((d_hi - dm_hi[j]) + (d_lo - dm_lo[j])) * inv_tau;
      u[j] = uj;
      sum[j] += weighted(et[j], uj);
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc rzt = Acc(1) / sc.zt[j];
    const bool close = sc.close[j] != Acc(0);
    sc.mean_u[j] = close ? sum[j] * rzt : sc.mean_u[j];
    sc.shift[j] = close ? exp_moderate(-sc.mean_u[j]) * rzt : Acc(0);  // mean u >= -log K - 1 here
  }
}

// Pass 4 (segments with a close pixel), over all their pixels; only close ones use the result.
// With v = u - mean u (so that sum_c q_t v = 0) and phi(v) = e^v - 1 - v:
//   B = sum_c q_t phi(v) >= 0,  KL = log1p(B),  p_s - q_t = (q_t (e^v - 1) - q_t B) / (1 + B).
// Beyond the series' range q_t e^v is taken as exp(x) exp(-mean u) / zt, equal in real numbers: it
// stays right where the teacher's weight underflows and the student's does not.
template <typename Acc>
void segment_close_sums(int64_t classes, int64_t n, Scratch<Acc>& sc) {
  const Acc* __restrict mean_u = sc.mean_u;
  const Acc* __restrict shift = sc.shift;
  Acc* __restrict close_sum = sc.close_sum;
  Acc rzt[kSegment];
  for (int64_t j = 0; j < n; ++j) {
    rzt[j] = Acc(1) / sc.zt[j];
    close_sum[j] = 0;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const Acc* __restrict u = &sc.u[c * kSegment];
    const Acc* __restrict es = &sc.es[c * kSegment];
    const Acc* __restrict et = &sc.et[c * kSegment];
    Acc* __restrict r = &sc.r[c * kSegment];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc v = u[j] - mean_u[j], q = et[j] * rzt[j];
      const Acc phi = v * v * phi_over_square(v);
      const Acc q_exp = es[j] * shift[j];  // q_t e^v
      const bool series = std::fabs(v) <= kSeries<Acc>;
      // A teacher weight of 0 leaves q_t e^v: 0 too when the student's is (a class absent from both).
      close_sum[j] += q == Acc(0) ? q_exp : series ? q * phi : (q_exp - q) - q * v;
      r[j] = q == Acc(0) ? q_exp : series ? q * (v + phi) : q_exp - q;
    }
  }
}

// Pass 5: the gradients, one class at a time, written straight into the output where it is Acc
// and contiguous along the segment.
template <typename Scalar, typename Acc>
struct OutputRow {
  Scalar* out;
  int64_t stride;
  Acc buffer[kSegment];
  Acc* values;
  OutputRow(void* base, const int64_t* st, int64_t width, const Segment& g, int64_t c)
      : out(static_cast<Scalar*>(base) + offset(st, width, g.b, c, g.first)), stride(st[3]) {
    values = std::is_same_v<Scalar, Acc> && stride == 1 ? reinterpret_cast<Acc*>(out) : buffer;
  }
  void flush(int64_t n) {
    if (values == buffer)
      for (int64_t j = 0; j < n; ++j) store(out + j * stride, buffer[j]);
  }
};

template <typename Scalar, typename Acc, PixelLoss kLoss>
void store_gradients(const PixelwiseProblem& p, const Segment& g, Acc inv_tau, bool any_close, Scratch<Acc>& sc) {
  const int64_t n = g.n;
  const Acc scale = static_cast<Acc>(*p.scale) * inv_tau;
  const Acc* __restrict valid = sc.valid;
  const Acc* __restrict close = sc.close;
  const Acc* __restrict close_sum = sc.close_sum;
  const Acc* __restrict mean_u = sc.mean_u;
  const Acc* __restrict ms = sc.ms;
  const Acc* __restrict mt = sc.mt;
  Acc rzs[kSegment], rzt[kSegment], close_scale[kSegment], mean_x[kSegment], top[kSegment], top_grad[kSegment];
  for (int64_t j = 0; j < n; ++j) {
    rzs[j] = Acc(1) / sc.zs[j];
    rzt[j] = Acc(1) / sc.zt[j];
    close_scale[j] = Acc(1) / (Acc(1) + close_sum[j]);
    mean_x[j] = sc.mean_x[j] * inv_tau * rzt[j];
    // The top class of both: p_s - q_t = (zt_rest - zs_rest) / (zs zt), free of the cancellation of
    // 1/zs - 1/zt, unless the two rests nearly cancel themselves (a close pixel: the close form).
    const Acc zs_rest = sc.zs_rest[j], zt_rest = sc.zt_rest[j];
    const bool shared = sc.arg_s[j] == sc.arg_t[j] &&
                        std::fabs(zt_rest - zs_rest) >= Acc(0.5) * std::max(zs_rest, zt_rest);
    top[j] = shared ? sc.arg_s[j] : Acc(-1);
    top_grad[j] = scale * ((zt_rest - zs_rest) * rzs[j] * rzt[j]);
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const Acc* __restrict es = &sc.es[c * kSegment];
    const Acc* __restrict et = &sc.et[c * kSegment];
    const Acc class_index = static_cast<Acc>(c);
    // Ignored pixels get exactly 0, selected rather than multiplied: their gradient may be inf or NaN.
    if (p.grad_student) {
      OutputRow<Scalar, Acc> row(p.grad_student, p.grad_student_strides, p.width, g, c);
      Acc* __restrict grad = row.values;
      const Acc* __restrict r = &sc.r[c * kSegment];
      if (any_close) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const Acc direct = es[j] * rzs[j] - et[j] * rzt[j];
          const Acc near = (r[j] - et[j] * rzt[j] * close_sum[j]) * close_scale[j];
          const Acc value = top[j] == class_index ? top_grad[j] : scale * (close[j] != Acc(0) ? near : direct);
          grad[j] = valid[j] != Acc(0) ? value : Acc(0);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const Acc value = top[j] == class_index ? top_grad[j] : scale * (es[j] * rzs[j] - et[j] * rzt[j]);
          grad[j] = valid[j] != Acc(0) ? value : Acc(0);
        }
      }
      row.flush(n);
    }
    if (p.grad_teacher) {
      // d loss / d t_c = q_t,c (l_c - loss), l_c the class's term: for the KL l_c - loss = mean u - u_c,
      // for the cross-entropy mean x - x_c. Neither subtracts the log-partition terms.
      OutputRow<Scalar, Acc> row(p.grad_teacher, p.grad_teacher_strides, p.width, g, c);
      Acc* __restrict grad = row.values;
      const Acc* __restrict s = sc.s_row[c];
      const Acc* __restrict t = sc.t_row[c];
      const Acc* __restrict u = &sc.u[c * kSegment];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const Acc x = (s[j] - ms[j]) * inv_tau;
        const Acc uj = any_close ? u[j] : (x - (t[j] - mt[j]) * inv_tau);
        const Acc excess = kLoss == PixelLoss::KL ? mean_u[j] - uj : mean_x[j] - x;
        grad[j] = valid[j] != Acc(0) ? scale * rzt[j] * weighted(et[j], excess) : Acc(0);
      }
      row.flush(n);
    }
  }
}

// One segment end to end. Compiled for AVX2+FMA as well as the baseline and picked at load time
// (the exponentials dominate and double in throughput with 8-wide vectors); `flatten` inlines the
// helpers into each clone, which otherwise keep the baseline's 4-wide code.
template <typename Scalar, typename Acc, PixelLoss kLoss>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void process_segment(const PixelwiseProblem& p, const Segment& g, Scratch<Acc>& sc) {
  const int64_t n = g.n;
  const Acc inv_tau = static_cast<Acc>(p.inv_tau);
  const Acc inv_tau_lo = static_cast<Acc>(p.inv_tau - static_cast<double>(inv_tau));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t f = g.first + j;
    const bool valid = !p.labels || p.labels[g.b * p.label_strides[0] + (f / p.width) * p.label_strides[1] +
                                            (f % p.width) * p.label_strides[2]] != p.ignore_index;
    sc.valid[j] = valid ? Acc(1) : Acc(0);
  }
  load_segment<Scalar, Acc>(p, g, sc);
  if (p.classes > kCompensateAbove) segment_sums<Acc, kLoss, true>(p.classes, n, inv_tau, inv_tau_lo, sc);
  else segment_sums<Acc, kLoss, false>(p.classes, n, inv_tau, inv_tau_lo, sc);
  Acc value[kSegment];
  const bool close_for_loss = kLoss == PixelLoss::KL, close_for_gradient = p.grad_student != nullptr;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const Acc rzt = Acc(1) / sc.zt[j];
    const Acc mean_u = sc.mean_u[j] * inv_tau * rzt;
    sc.mean_u[j] = mean_u;
    const Acc kl = log_positive(sc.zs[j] * rzt) - mean_u;  // log zs - log zt - mean u
    // Cross-entropy: log zs - mean x, a sum of non-negative terms.
    value[j] = kLoss == PixelLoss::KL ? kl : log1p_nonnegative(sc.zs_rest[j]) - sc.mean_x[j] * inv_tau * rzt;
    // NaN is not close. The cross-entropy needs the close form only for the student's gradient.
    const bool close = (sc.valid[j] != Acc(0)) & ((close_for_loss & (kl <= kCloseForLoss<Acc>)) |
                                                 (close_for_gradient & (kl <= kCloseForGradient<Acc>)));
    sc.close[j] = close ? Acc(1) : Acc(0);
    sc.close_sum[j] = Acc(0);
  }
  bool any_close = false;
  for (int64_t j = 0; j < n; ++j) any_close |= sc.close[j] != Acc(0);
  if (any_close) {
    segment_differences(p.classes, n, inv_tau, sc);
    segment_close_sums(p.classes, n, sc);
    if (kLoss == PixelLoss::KL) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        value[j] = sc.close[j] != Acc(0) ? log1p_nonnegative(sc.close_sum[j]) : value[j];
    }
  }
  double* loss = p.pixel_loss + g.b * p.height * p.width + g.first;
  for (int64_t j = 0; j < n; ++j) loss[j] = sc.valid[j] != Acc(0) ? static_cast<double>(value[j]) : 0.0;
  if (p.grad_student || p.grad_teacher) store_gradients<Scalar, Acc, kLoss>(p, g, inv_tau, any_close, sc);
}

// Whether the (row, column) strides address an image's pixels as one run: then a segment may
// cross rows.
inline bool flat(const int64_t* st, int64_t width) { return st[2] == width * st[3]; }

template <typename Scalar, typename Acc, PixelLoss kLoss>
void run(const PixelwiseProblem& p) {
  const bool whole_image = flat(p.student_strides, p.width) && flat(p.teacher_strides, p.width) &&
                           (!p.grad_student || flat(p.grad_student_strides, p.width)) &&
                           (!p.grad_teacher || flat(p.grad_teacher_strides, p.width));
  const int64_t run_length = whole_image ? p.height * p.width : p.width;
  const int64_t runs = p.batch * (whole_image ? 1 : p.height);
  const int64_t per_run = (run_length + kSegment - 1) / kSegment;
#pragma omp parallel
  {
    Scratch<Acc> sc(p.classes);
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < runs * per_run; ++unit) {
      const int64_t run_index = unit / per_run, start = (unit % per_run) * kSegment;
      const int64_t b = whole_image ? run_index : run_index / p.height;
      const int64_t row_first = whole_image ? 0 : (run_index % p.height) * p.width;
      const Segment g{b, row_first + start, std::min(kSegment, run_length - start)};
      process_segment<Scalar, Acc, kLoss>(p, g, sc);
    }
  }
}

template <PixelLoss kLoss>
void dispatch_dtype(const PixelwiseProblem& p) {
  switch (p.dtype) {
    case DType::Float32: return run<float, float, kLoss>(p);
    case DType::Float64: return run<double, double, kLoss>(p);
    case DType::Float16: return run<Half, float, kLoss>(p);
    case DType::BFloat16: return run<BFloat16, float, kLoss>(p);
  }
}

}  // namespace

void pixelwise_loss_and_grad(const PixelwiseProblem& p) {
  if (p.loss == PixelLoss::KL) return dispatch_dtype<PixelLoss::KL>(p);
  return dispatch_dtype<PixelLoss::CrossEntropy>(p);
}

}  // namespace skd::cpu
