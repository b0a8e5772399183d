// Fused pixel-wise distillation on CUDA. The math, including the cancellation-free close form:
// docs/ops/pixelwise.md; the CPU kernel (csrc/cpu/pixelwise.cpp) computes the same, pass by pass.
//
// A thread owns kVec consecutive pixels of one image. For the common class counts 11, 19, 21
// (float accumulation) it owns one, issues all its loads first and keeps the logits in registers for
// every later pass (ptxas: 96-168 registers, no spills). For 150 (a fixed trip count) and any other
// count it owns two where every tensor's image is one aligned contiguous run (each class is one
// vector load per thread, a warp's loads one coalesced span), else one, and the passes reread the
// logits, from L1/L2 after the first. The pixel losses are
// summed in the kernel: a block sums its pixels in a fixed tree, writes one partial, and the last
// block to finish (atomic ticket after a fence) sums the partials in a fixed order and resets the
// ticket: deterministic, no second launch. Only plain CUDA headers, so this file compiles in seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/numeric.cuh"
#include "cuda/pixelwise.h"

namespace skd::cuda {
namespace {

constexpr int kThreads = 128;
constexpr float kCloseForLoss = 0.25f;      // as the CPU kernel: the KL forms' threshold
constexpr float kCloseForGradient = 0.1f;   // the cross-entropy's (its loss needs no close form)

// exp(d * inv_tau + d * inv_tau_lo) for d <= 0 with the product unrounded (FMA in the range
// reduction); 0 below about -86.6; NaN stays NaN. See exp_scaled in the CPU kernel.
__device__ __forceinline__ float exp_scaled(float d, float inv_tau, float inv_tau_lo) {
  const float y = d * (inv_tau * 1.44269504088896341f);
  const bool underflow = y < -125.0f;
  const float nf = rintf(underflow ? -125.0f : y);
  float r = __fmaf_rn(d, inv_tau, nf * -0.693359375f);
  r = __fmaf_rn(nf, 2.12194440e-4f, __fmaf_rn(d, inv_tau_lo, r));
  float p = 1.9875691500e-4f;
  p = __fmaf_rn(p, r, 1.3981999507e-3f);
  p = __fmaf_rn(p, r, 8.3334519073e-3f);
  p = __fmaf_rn(p, r, 4.1665795894e-2f);
  p = __fmaf_rn(p, r, 1.6666665459e-1f);
  p = __fmaf_rn(p, r, 5.0000001201e-1f);
  p = __fmaf_rn(p * r, r, r) + 1.0f;
  return underflow ? 0.0f : p * __int_as_float((static_cast<int>(nf) + 127) << 23);
}
__device__ __forceinline__ double exp_scaled(double d, double inv_tau, double) { return exp(d * inv_tau); }

// (e^v - 1 - v) / v^2 up to v^13: exact to rounding for |v| <= kSeries (1 in float, 1/4 in double).
template <typename Acc>
__device__ __forceinline__ Acc phi_over_square(Acc v) {
  Acc p = Acc(1.0 / 6227020800.0);
  p = p * v + Acc(1.0 / 479001600.0);
  p = p * v + Acc(1.0 / 39916800.0);
  p = p * v + Acc(1.0 / 3628800.0);
  p = p * v + Acc(1.0 / 362880.0);
  p = p * v + Acc(1.0 / 40320.0);
  p = p * v + Acc(1.0 / 5040.0);
  p = p * v + Acc(1.0 / 720.0);
  p = p * v + Acc(1.0 / 120.0);
  p = p * v + Acc(1.0 / 24.0);
  p = p * v + Acc(1.0 / 6.0);
  return p * v + Acc(0.5);
}
template <typename Acc> __device__ __forceinline__ Acc series_limit() { return Acc(1); }
template <> __device__ __forceinline__ double series_limit<double>() { return 0.25; }

// a - b = hi + lo exactly (two-sum); lo is 0 where hi is infinite or NaN. __fsub_rn/__dsub_rn keep
// the compiler from contracting or reassociating.
__device__ __forceinline__ void two_diff(float a, float b, float& hi, float& lo) {
  hi = __fsub_rn(a, b);
  const float bb = __fsub_rn(hi, a);
  lo = __fsub_rn(__fsub_rn(a, __fsub_rn(hi, bb)), __fadd_rn(b, bb));
  lo = isfinite(hi) ? lo : 0.0f;
}
__device__ __forceinline__ void two_diff(double a, double b, double& hi, double& lo) {
  hi = __dsub_rn(a, b);
  const double bb = __dsub_rn(hi, a);
  lo = __dsub_rn(__dsub_rn(a, __dsub_rn(hi, bb)), __dadd_rn(b, bb));
  lo = isfinite(hi) ? lo : 0.0;
}

// log1p(x) for x >= 0 from log (Goldberg's correction of the rounding of 1 + x).
template <typename Acc>
__device__ __forceinline__ Acc log1p_nonnegative(Acc x) {
  const Acc one_x = Acc(1) + x;
  return one_x == Acc(1) ? x : log(one_x) * (x / (one_x - Acc(1)));
}

// weight * value; a class of teacher weight exactly 0 adds 0 even where value is infinite.
template <typename Acc>
__device__ __forceinline__ Acc weighted(Acc weight, Acc value) {
  return weight == Acc(0) ? Acc(0) : weight * value;
}

// kVec consecutive elements, aligned for one vector load or store.
template <typename Scalar, int kVec>
struct alignas(sizeof(Scalar) * kVec) Vec {
  Scalar v[kVec];
};

// The logits of a thread's pixels: for a class count known at compile time and small enough, all
// of them in registers, loaded once up front; else read again at each pass (L1/L2 hits after the first).
template <typename Scalar, typename Acc, int kClasses, int kVec>
struct Logits {
  // In registers while they fit without spilling (ptxas -v: float up to 21 classes at one pixel a
  // thread, 10 at two; double none): 2 x 19 x 2 floats plus the per-pixel state would spill.
  static constexpr bool kRegisters = kClasses > 0 && kClasses * kVec * int(sizeof(Acc) / 4) <= 21;
  static constexpr int kStored = kRegisters ? kClasses : 1;
  Acc s[kStored][kVec], t[kStored][kVec];
  const Scalar* __restrict__ sp;
  const Scalar* __restrict__ tp;
  int64_t ss, ts, sw, tw;
  __device__ void load_all(int classes) {
    if constexpr (kRegisters) {
#pragma unroll
      for (int c = 0; c < kStored; ++c) load(c, s[c], t[c]);
    }
  }
  __device__ __forceinline__ void load(int c, Acc (&s_out)[kVec], Acc (&t_out)[kVec]) const {
    if (kVec > 1) {  // contiguous and aligned: checked by the launcher
      const Vec<Scalar, kVec> a = *reinterpret_cast<const Vec<Scalar, kVec>*>(sp + c * ss);
      const Vec<Scalar, kVec> b = *reinterpret_cast<const Vec<Scalar, kVec>*>(tp + c * ts);
#pragma unroll
      for (int i = 0; i < kVec; ++i) { s_out[i] = to_float(a.v[i]); t_out[i] = to_float(b.v[i]); }
    } else {
      s_out[0] = to_float(sp[c * ss]);
      t_out[0] = to_float(tp[c * ts]);
    }
  }
  __device__ __forceinline__ void get(int c, Acc (&s_out)[kVec], Acc (&t_out)[kVec]) const {
    if constexpr (kRegisters) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) { s_out[i] = s[c][i]; t_out[i] = t[c][i]; }
    } else {
      load(c, s_out, t_out);
    }
  }
};

template <typename Acc>
struct PixelStats {
  Acc ms, mt, arg_s, arg_t, zs_rest, zt_rest, mean_u, mean_x, dm_hi, dm_lo, close_sum, shift;
  bool valid, close;
};

template <typename Scalar, typename Acc, bool kKL, int kClasses, int kVec>
__global__ void __launch_bounds__(kThreads)
pixelwise_kernel(PixelwiseProblem p, PixelwiseReduction red, Acc inv_tau, Acc inv_tau_lo) {
  const int classes = kClasses > 0 ? kClasses : static_cast<int>(p.classes);
  // Register-resident logits need every class loop unrolled (constant indices), others not.
  constexpr int kUnroll = Logits<Scalar, Acc, kClasses, kVec>::kRegisters ? kClasses : 1;
  const int64_t hw = p.height * p.width;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;  // flat over B*H*W
  const bool active = first < p.batch * hw;
  const int64_t b = active ? first / hw : 0, f0 = active ? first % hw : 0;  // kVec pixels stay in one image
  auto offset = [&](const int64_t* st, int64_t f) { return b * st[0] + (f / p.width) * st[2] + (f % p.width) * st[3]; };

  Logits<Scalar, Acc, kClasses, kVec> x;
  x.sp = static_cast<const Scalar*>(p.student) + offset(p.student_strides, f0);
  x.tp = static_cast<const Scalar*>(p.teacher) + offset(p.teacher_strides, f0);
  x.ss = p.student_strides[1]; x.ts = p.teacher_strides[1];
  if (active) x.load_all(classes);  // every load issued before any arithmetic

  PixelStats<Acc> st[kVec];
  double pixel_loss[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int64_t f = f0 + i;
    st[i].valid = active && (!p.labels || p.labels[b * p.label_strides[0] + (f / p.width) * p.label_strides[1] +
                                                   (f % p.width) * p.label_strides[2]] != p.ignore_index);
    st[i].ms = st[i].mt = -INFINITY;
    st[i].arg_s = st[i].arg_t = Acc(-1);
    st[i].zs_rest = st[i].zt_rest = st[i].mean_u = st[i].mean_x = st[i].close_sum = Acc(0);
    pixel_loss[i] = 0.0;
  }
  Acc s[kVec], t[kVec];
  if (active) {
    // Pass 1: maxima and the (first) class holding each.
    #pragma unroll kUnroll
    for (int c = 0; c < classes; ++c) {
      x.get(c, s, t);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (s[i] > st[i].ms) { st[i].ms = s[i]; st[i].arg_s = Acc(c); }
        if (t[i] > st[i].mt) { st[i].mt = t[i]; st[i].arg_t = Acc(c); }
      }
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) two_diff(st[i].ms, st[i].mt, st[i].dm_hi, st[i].dm_lo);
    // Pass 2: partition sums without the maximum's exact 1, q-weighted sums of u (exact: two-sums)
    // and of x. Compensated (Kahan) for many classes, as on the CPU.
    Acc zs_err[kVec] = {}, zt_err[kVec] = {};
    #pragma unroll kUnroll
    for (int c = 0; c < classes; ++c) {
      x.get(c, s, t);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const Acc ds = s[i] - st[i].ms, dt = t[i] - st[i].mt;
        const Acc es = exp_scaled(ds, inv_tau, inv_tau_lo), et = exp_scaled(dt, inv_tau, inv_tau_lo);
        const Acc rest_s = st[i].arg_s == Acc(c) ? es - Acc(1) : es;
        const Acc rest_t = st[i].arg_t == Acc(c) ? et - Acc(1) : et;
        const Acc ys = rest_s - zs_err[i], yt = rest_t - zt_err[i];
        const Acc new_s = st[i].zs_rest + ys, new_t = st[i].zt_rest + yt;
        zs_err[i] = (new_s - st[i].zs_rest) - ys;
        zt_err[i] = (new_t - st[i].zt_rest) - yt;
        st[i].zs_rest = new_s;
        st[i].zt_rest = new_t;
        Acc d_hi, d_lo;
        two_diff(s[i], t[i], d_hi, d_lo);
        const Acc u = ((d_hi - st[i].dm_hi) + (d_lo - st[i].dm_lo)) * inv_tau;
        st[i].mean_u += weighted(et, u);
        if (!kKL) st[i].mean_x += weighted(et, ds * inv_tau);
      }
    }
    // Per pixel: the standard form, and whether the pixel takes the close form.
    bool any_close = false;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const Acc zs = Acc(1) + st[i].zs_rest, zt = Acc(1) + st[i].zt_rest;
      st[i].mean_u /= zt;
      const Acc kl = log(zs / zt) - st[i].mean_u;
      pixel_loss[i] = kKL ? static_cast<double>(kl)
                          : static_cast<double>(log1p_nonnegative(st[i].zs_rest) - st[i].mean_x / zt);
      st[i].close = st[i].valid && kl <= Acc(kKL ? kCloseForLoss : kCloseForGradient) && (kKL || p.grad_student);
      st[i].shift = st[i].close ? exp(-st[i].mean_u) / zt : Acc(0);  // mean u >= -log K - 1 when close
      any_close |= st[i].close;
    }
    // Pass 3 (a close pixel only): B = sum_c q phi(v), v = u - mean u; KL = log1p(B).
    if (any_close) {
      #pragma unroll kUnroll
    for (int c = 0; c < classes; ++c) {
        x.get(c, s, t);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          if (!st[i].close) continue;
          const Acc zt = Acc(1) + st[i].zt_rest;
          const Acc es = exp_scaled(s[i] - st[i].ms, inv_tau, inv_tau_lo);
          const Acc et = exp_scaled(t[i] - st[i].mt, inv_tau, inv_tau_lo);
          Acc d_hi, d_lo;
          two_diff(s[i], t[i], d_hi, d_lo);
          const Acc v = ((d_hi - st[i].dm_hi) + (d_lo - st[i].dm_lo)) * inv_tau - st[i].mean_u;
          const Acc q = et / zt, q_exp = es * st[i].shift;
          const Acc phi = v * v * phi_over_square(v);
          st[i].close_sum += q == Acc(0) ? q_exp : fabs(v) <= series_limit<Acc>() ? q * phi : (q_exp - q) - q * v;
        }
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (kKL && st[i].close) pixel_loss[i] = static_cast<double>(log1p_nonnegative(st[i].close_sum));
    }
    // Pass 4: the gradients, already multiplied by the form's constant / tau.
    if (p.grad_student || p.grad_teacher) {
      const Acc g = static_cast<Acc>(*p.scale) * inv_tau;
      #pragma unroll kUnroll
    for (int c = 0; c < classes; ++c) {
        x.get(c, s, t);
        Acc gs[kVec], gt[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const Acc zs = Acc(1) + st[i].zs_rest, zt = Acc(1) + st[i].zt_rest;
          const Acc ds = s[i] - st[i].ms;
          const Acc es = exp_scaled(ds, inv_tau, inv_tau_lo);
          const Acc et = exp_scaled(t[i] - st[i].mt, inv_tau, inv_tau_lo);
          Acc d_hi, d_lo;
          two_diff(s[i], t[i], d_hi, d_lo);
          const Acc u = ((d_hi - st[i].dm_hi) + (d_lo - st[i].dm_lo)) * inv_tau;
          const Acc q = et / zt;
          Acc value = es / zs - q;  // direct
          if (st[i].close) {
            const Acc v = u - st[i].mean_u, q_exp = es * st[i].shift;
            const Acc phi = v * v * phi_over_square(v);
            const Acc r = q == Acc(0) ? q_exp : fabs(v) <= series_limit<Acc>() ? q * (v + phi) : q_exp - q;
            value = (r - q * st[i].close_sum) / (Acc(1) + st[i].close_sum);
          }
          // The top class of both: (zt_rest - zs_rest) / (zs zt), unless the rests nearly cancel.
          const Acc diff = st[i].zt_rest - st[i].zs_rest;
          if (st[i].arg_s == Acc(c) && st[i].arg_t == Acc(c) &&
              fabs(diff) >= Acc(0.5) * fmax(st[i].zs_rest, st[i].zt_rest))
            value = diff / (zs * zt);
          // Ignored pixels get exactly 0, selected rather than multiplied: theirs may be inf or NaN.
          gs[i] = st[i].valid ? g * value : Acc(0);
          const Acc excess = kKL ? st[i].mean_u - u : st[i].mean_x / zt - ds * inv_tau;
          gt[i] = st[i].valid ? (g / zt) * weighted(et, excess) : Acc(0);
        }
        if (p.grad_student) {
          Scalar* out = static_cast<Scalar*>(p.grad_student) + offset(p.grad_student_strides, f0) +
                        c * p.grad_student_strides[1];
          if (kVec > 1) {
            Vec<Scalar, kVec> vec;
#pragma unroll
            for (int i = 0; i < kVec; ++i) store(&vec.v[i], gs[i]);
            *reinterpret_cast<Vec<Scalar, kVec>*>(out) = vec;
          } else {
            store(out, gs[0]);
          }
        }
        if (p.grad_teacher) {
          Scalar* out = static_cast<Scalar*>(p.grad_teacher) + offset(p.grad_teacher_strides, f0) +
                        c * p.grad_teacher_strides[1];
          if (kVec > 1) {
            Vec<Scalar, kVec> vec;
#pragma unroll
            for (int i = 0; i < kVec; ++i) store(&vec.v[i], gt[i]);
            *reinterpret_cast<Vec<Scalar, kVec>*>(out) = vec;
          } else {
            store(out, gt[0]);
          }
        }
      }
    }
  }

  // The loss: this thread's pixels, then the block in a fixed tree, then the last block.
  double mine = 0.0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) mine += st[i].valid ? pixel_loss[i] : 0.0;
  __shared__ double tree[kThreads];
  __shared__ bool last_block;
  tree[threadIdx.x] = mine;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) tree[threadIdx.x] += tree[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    red.partials[blockIdx.x] = tree[0];
    __threadfence();  // the partial is visible device-wide before the ticket is taken
    const unsigned ticket = atomicAdd(red.ticket, 1u);
    last_block = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();  // order the partials' reads after observing the final ticket
  double sum = 0.0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += kThreads) sum += __ldcg(red.partials + i);  // fixed order
  tree[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) tree[threadIdx.x] += tree[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *red.loss_sum = tree[0];
    *red.ticket = 0u;  // ready for the next launch on this stream
  }
}

template <typename Scalar, typename Acc, bool kKL, int kVec>
void launch_classes(const PixelwiseProblem& p, const PixelwiseReduction& red, unsigned blocks, cudaStream_t stream) {
  const Acc inv_tau = static_cast<Acc>(p.inv_tau);
  const Acc inv_tau_lo = static_cast<Acc>(p.inv_tau - static_cast<double>(inv_tau));
  switch (p.classes) {  // the common class counts: 11, 19, 21 in registers, 150 with a fixed trip count
    case 11: return pixelwise_kernel<Scalar, Acc, kKL, 11, kVec><<<blocks, kThreads, 0, stream>>>(p, red, inv_tau, inv_tau_lo);
    case 19: return pixelwise_kernel<Scalar, Acc, kKL, 19, kVec><<<blocks, kThreads, 0, stream>>>(p, red, inv_tau, inv_tau_lo);
    case 150: return pixelwise_kernel<Scalar, Acc, kKL, 150, kVec><<<blocks, kThreads, 0, stream>>>(p, red, inv_tau, inv_tau_lo);
    case 21: return pixelwise_kernel<Scalar, Acc, kKL, 21, kVec><<<blocks, kThreads, 0, stream>>>(p, red, inv_tau, inv_tau_lo);
    default: return pixelwise_kernel<Scalar, Acc, kKL, 0, kVec><<<blocks, kThreads, 0, stream>>>(p, red, inv_tau, inv_tau_lo);
  }
}

// Whether a tensor's pixels form one run per image (row stride = W * column stride) of unit stride
// and its base, class stride and image stride keep every kVec-pixel group aligned.
bool vector_ready(const void* base, const int64_t* st, int64_t width, int64_t hw, int64_t element, int vec) {
  if (st[3] != 1 || st[2] != width || hw % vec != 0) return false;
  return reinterpret_cast<uintptr_t>(base) % (element * vec) == 0 && st[0] % vec == 0 && st[1] % vec == 0;
}

template <typename Scalar, typename Acc>
void launch(const PixelwiseProblem& p, const PixelwiseReduction& red, cudaStream_t stream) {
  const int64_t pixels = p.batch * p.height * p.width, hw = p.height * p.width;
  const int64_t e = sizeof(Scalar);
  bool vec2 = vector_ready(p.student, p.student_strides, p.width, hw, e, 2) &&
              vector_ready(p.teacher, p.teacher_strides, p.width, hw, e, 2);
  if (p.grad_student) vec2 = vec2 && vector_ready(p.grad_student, p.grad_student_strides, p.width, hw, e, 2);
  if (p.grad_teacher) vec2 = vec2 && vector_ready(p.grad_teacher, p.grad_teacher_strides, p.width, hw, e, 2);
  // The class counts kept in registers take one pixel a thread (two would spill): their loads all go
  // out first and DRAM is read once; the others take vector loads and reread L1/L2.
  const bool in_registers = sizeof(Acc) == 4 && (p.classes == 11 || p.classes == 19 || p.classes == 21);
  vec2 = vec2 && !in_registers;
  const int vec = vec2 ? 2 : 1;
  const unsigned blocks = static_cast<unsigned>((pixels / vec + kThreads - 1) / kThreads);
  if (blocks == 0) {  // no pixels (the op rejects that; kept for the pass's contract)
    cudaMemsetAsync(red.loss_sum, 0, sizeof(double), stream);
    return;
  }
  const bool kl = p.loss == PixelLoss::KL;
  if (vec2) {
    if (kl) launch_classes<Scalar, Acc, true, 2>(p, red, blocks, stream);
    else launch_classes<Scalar, Acc, false, 2>(p, red, blocks, stream);
  } else {
    if (kl) launch_classes<Scalar, Acc, true, 1>(p, red, blocks, stream);
    else launch_classes<Scalar, Acc, false, 1>(p, red, blocks, stream);
  }
}

// Multiplies a gradient by the incoming gradient of the loss (of the accumulation type Acc), read on
// the device: when it is 1 (loss.backward()) every thread returns at once, with no host sync.
template <typename Scalar, typename Acc>
__global__ void scale_kernel(Scalar* __restrict__ grad, int64_t n, const Acc* __restrict__ factor) {
  const Acc f = *factor;
  if (f == Acc(1)) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    store(grad + i, to_float(grad[i]) * f);
}

template <typename Scalar, typename Acc>
void launch_scale(void* grad, int64_t n, const void* factor, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
  scale_kernel<Scalar, Acc><<<blocks, 256, 0, stream>>>(static_cast<Scalar*>(grad), n, static_cast<const Acc*>(factor));
}

}  // namespace

int64_t pixelwise_reduction_blocks(const PixelwiseProblem& p) {
  return (p.batch * p.height * p.width + kThreads - 1) / kThreads;  // enough for either vector width
}

void pixelwise_loss_and_grad(const PixelwiseProblem& p, const PixelwiseReduction& red, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::Float32: return launch<float, float>(p, red, s);
    case DType::Float64: return launch<double, double>(p, red, s);
    case DType::Float16: return launch<__half, float>(p, red, s);
    case DType::BFloat16: return launch<__nv_bfloat16, float>(p, red, s);
  }
}

void scale_in_place(DType dtype, void* grad, int64_t n, const void* factor, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: return launch_scale<float, float>(grad, n, factor, s);
    case DType::Float64: return launch_scale<double, double>(grad, n, factor, s);
    case DType::Float16: return launch_scale<__half, float>(grad, n, factor, s);
    case DType::BFloat16: return launch_scale<__nv_bfloat16, float>(grad, n, factor, s);
  }
}

}  // namespace skd::cuda
