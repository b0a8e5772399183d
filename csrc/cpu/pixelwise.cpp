// Fused pixel-wise distillation on the CPU.
//
// Work unit: one image row segment of up to kBlock pixels, all K classes. In NCHW the pixels of a
// segment are contiguous for every class, so each inner loop runs over pixels and vectorises. The
// segment's K x kBlock logits are read from memory once, converted to the accumulation type and
// kept, with their exponentials, in a per-thread scratch that stays in L2; the three passes over it
// (maxima, sums, gradients) cost cache traffic only.
#include "cpu/pixelwise.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/numeric.h"

namespace skd::cpu {
namespace {

constexpr int64_t kBlock = 64;

template <typename Acc>
struct Scratch {
  std::vector<Acc> s, t, es, et;  // (K, kBlock): scaled logits and exp(x - max)
  Acc ms[kBlock], mt[kBlock], zs[kBlock], zt[kBlock], e[kBlock];
  explicit Scratch(int64_t classes)
      : s(classes * kBlock), t(classes * kBlock), es(classes * kBlock), et(classes * kBlock) {}
};

template <typename Scalar>
inline const Scalar* at(const void* base, const int64_t* st, int64_t b, int64_t c, int64_t h, int64_t w) {
  return static_cast<const Scalar*>(base) + b * st[0] + c * st[1] + h * st[2] + w * st[3];
}

template <typename Scalar, typename Acc>
void load_block(const PixelwiseProblem& p, int64_t b, int64_t h, int64_t w0, int64_t n, Scratch<Acc>& sc) {
  const Acc inv_tau = static_cast<Acc>(p.inv_tau);
  const int64_t sws = p.student_strides[3], swt = p.teacher_strides[3];
  for (int64_t c = 0; c < p.classes; ++c) {
    const Scalar* sp = at<Scalar>(p.student, p.student_strides, b, c, h, w0);
    const Scalar* tp = at<Scalar>(p.teacher, p.teacher_strides, b, c, h, w0);
    Acc* s = &sc.s[c * kBlock];
    Acc* t = &sc.t[c * kBlock];
    for (int64_t j = 0; j < n; ++j) {
      s[j] = to_acc(sp[j * sws]) * inv_tau;
      t[j] = to_acc(tp[j * swt]) * inv_tau;
    }
  }
}

// The per-class term l_c whose q_t-weighted mean is the pixel's loss (up to log-partition terms):
// cross-entropy l_c = -(s - ms) >= 0; KL l_c = (t - mt) - (s - ms), ~0 when S ~ T, so neither
// form subtracts large numbers. Unclamped: a -inf student logit under a positive teacher weight
// makes the loss +inf, as in the official loss.
template <typename Acc, PixelLoss kLoss>
inline Acc class_term(Acc xs, Acc xt) {
  return kLoss == PixelLoss::KL ? xt - xs : -xs;
}

// weight * value, where a class of teacher weight exactly 0 (a -inf teacher logit) adds 0 even when
// `value` is infinite: the 0 log 0 = 0 of the KL. A NaN weight fails the test and stays NaN.
template <typename Acc>
inline Acc weighted(Acc weight, Acc value) {
  return weight == Acc(0) ? Acc(0) : weight * value;
}

// Per-pixel statistics: maxima, partition sums, and e = sum_c q_t * l_c with the stable per-class
// term l_c (see below), from which the loss and the teacher's gradient follow without cancellation.
template <typename Acc, PixelLoss kLoss>
void block_statistics(int64_t classes, int64_t n, Scratch<Acc>& sc) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < n; ++j) { sc.ms[j] = neg_inf; sc.mt[j] = neg_inf; }
  for (int64_t c = 0; c < classes; ++c) {
    const Acc* s = &sc.s[c * kBlock];
    const Acc* t = &sc.t[c * kBlock];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      sc.ms[j] = std::max(sc.ms[j], s[j]);
      sc.mt[j] = std::max(sc.mt[j], t[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) { sc.zs[j] = 0; sc.zt[j] = 0; sc.e[j] = 0; }
  for (int64_t c = 0; c < classes; ++c) {
    const Acc* s = &sc.s[c * kBlock];
    const Acc* t = &sc.t[c * kBlock];
    Acc* es = &sc.es[c * kBlock];
    Acc* et = &sc.et[c * kBlock];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc xs = s[j] - sc.ms[j], xt = t[j] - sc.mt[j];
      es[j] = exp_nonpositive(xs);
      et[j] = exp_nonpositive(xt);
      sc.zs[j] += es[j];
      sc.zt[j] += et[j];
      sc.e[j] += weighted(et[j], class_term<Acc, kLoss>(xs, xt));
    }
  }
  for (int64_t j = 0; j < n; ++j) sc.e[j] /= sc.zt[j];
}

template <typename Scalar, typename Acc, PixelLoss kLoss>
void store_gradients(const PixelwiseProblem& p, int64_t b, int64_t h, int64_t w0, int64_t n,
                     const bool* valid, Scratch<Acc>& sc) {
  const Acc g = static_cast<Acc>(*p.scale) * static_cast<Acc>(p.inv_tau);
  // Ignored pixels get exactly 0, selected rather than multiplied: their gradient may be inf or NaN.
  Acc rzs[kBlock], rzt[kBlock];
  for (int64_t j = 0; j < n; ++j) {
    rzs[j] = Acc(1) / sc.zs[j];
    rzt[j] = Acc(1) / sc.zt[j];
  }
  for (int64_t c = 0; c < p.classes; ++c) {
    const Acc* es = &sc.es[c * kBlock];
    const Acc* et = &sc.et[c * kBlock];
    if (p.grad_student) {
      Scalar* out = static_cast<Scalar*>(p.grad_student) + b * p.grad_student_strides[0] +
                    c * p.grad_student_strides[1] + h * p.grad_student_strides[2] + w0 * p.grad_student_strides[3];
      const int64_t sw = p.grad_student_strides[3];
      for (int64_t j = 0; j < n; ++j)
        store(out + j * sw, valid[j] ? g * (es[j] * rzs[j] - et[j] * rzt[j]) : Acc(0));
    }
    if (p.grad_teacher) {
      // d loss / d t_c = q_t,c (l_c - e): the teacher's weight times its class's excess over the mean.
      const Acc* s = &sc.s[c * kBlock];
      const Acc* t = &sc.t[c * kBlock];
      Scalar* out = static_cast<Scalar*>(p.grad_teacher) + b * p.grad_teacher_strides[0] +
                    c * p.grad_teacher_strides[1] + h * p.grad_teacher_strides[2] + w0 * p.grad_teacher_strides[3];
      const int64_t sw = p.grad_teacher_strides[3];
      for (int64_t j = 0; j < n; ++j) {
        const Acc l = class_term<Acc, kLoss>(s[j] - sc.ms[j], t[j] - sc.mt[j]);
        store(out + j * sw, valid[j] ? g * rzt[j] * weighted(et[j], l - sc.e[j]) : Acc(0));
      }
    }
  }
}

// One row segment end to end. Compiled for AVX2+FMA as well as the baseline and picked at load
// time (the exponentials dominate and double in throughput with 8-wide vectors); `flatten` inlines
// the helpers into each clone, which otherwise keep the baseline's 4-wide code.
template <typename Scalar, typename Acc, PixelLoss kLoss>
__attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
void process_segment(const PixelwiseProblem& p, int64_t b, int64_t h, int64_t w0, Scratch<Acc>& sc) {
      const int64_t n = std::min(kBlock, p.width - w0);
      bool valid[kBlock];
      for (int64_t j = 0; j < n; ++j)
        valid[j] = !p.labels || p.labels[b * p.label_strides[0] + h * p.label_strides[1] +
                                         (w0 + j) * p.label_strides[2]] != p.ignore_index;
      load_block<Scalar, Acc>(p, b, h, w0, n, sc);
      block_statistics<Acc, kLoss>(p.classes, n, sc);
      double* loss = p.pixel_loss + (b * p.height + h) * p.width + w0;
      for (int64_t j = 0; j < n; ++j) {
        // Cross-entropy: e + log zs.  KL: e + log zs - log zt.
        Acc value = sc.e[j] + std::log(sc.zs[j]);
        if (kLoss == PixelLoss::KL) value -= std::log(sc.zt[j]);
        loss[j] = valid[j] ? static_cast<double>(value) : 0.0;
      }
      if (p.grad_student || p.grad_teacher) store_gradients<Scalar, Acc, kLoss>(p, b, h, w0, n, valid, sc);
}

template <typename Scalar, typename Acc, PixelLoss kLoss>
void run(const PixelwiseProblem& p) {
  const int64_t blocks_per_row = (p.width + kBlock - 1) / kBlock;
  const int64_t units = p.batch * p.height * blocks_per_row;
#pragma omp parallel
  {
    Scratch<Acc> sc(p.classes);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t wb = u % blocks_per_row, bh = u / blocks_per_row;
      process_segment<Scalar, Acc, kLoss>(p, bh / p.height, bh % p.height, wb * kBlock, sc);
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
