// Fused pixel-wise distillation on CUDA.
//
// One thread per pixel. In NCHW neighbouring threads read neighbouring pixels of the same class, so
// every class step is a coalesced load. Pass 1 reads S and T once with an online softmax (running
// max and rescaled sum); pass 2 re-reads them (hitting L2) to accumulate the loss term and write the
// student's gradient; pass 3 runs only when the teacher's gradient is wanted, since it needs the
// pixel's loss first. Only plain CUDA headers, so this file compiles in seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/numeric.cuh"
#include "cuda/pixelwise.h"

namespace skd::cuda {
namespace {

template <typename Acc> __device__ __forceinline__ Acc stable_exp(Acc x) { return exp(x); }
template <> __device__ __forceinline__ float stable_exp<float>(float x) { return expf(x); }

// See the CPU kernel: l_c whose q_t-weighted mean gives the loss without cancellation; unclamped,
// so a -inf student logit under a positive teacher weight gives +inf, as in the official loss.
template <typename Acc, bool kKL>
__device__ __forceinline__ Acc class_term(Acc xs, Acc xt) {
  return kKL ? xt - xs : -xs;
}

// weight * value, where a class of teacher weight exactly 0 (a -inf teacher logit) adds 0 even when
// `value` is infinite (0 log 0 = 0); a NaN weight stays NaN.
template <typename Acc>
__device__ __forceinline__ Acc weighted(Acc weight, Acc value) {
  return weight == Acc(0) ? Acc(0) : weight * value;
}

template <typename Scalar, typename Acc, bool kKL>
__global__ void pixelwise_kernel(PixelwiseProblem p) {
  const int64_t hw = p.height * p.width;
  const int64_t pixel = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pixel >= p.batch * hw) return;
  const int64_t b = pixel / hw, h = (pixel % hw) / p.width, w = pixel % p.width;
  const Scalar* s_ptr = static_cast<const Scalar*>(p.student) + b * p.student_strides[0] + h * p.student_strides[2] + w * p.student_strides[3];
  const Scalar* t_ptr = static_cast<const Scalar*>(p.teacher) + b * p.teacher_strides[0] + h * p.teacher_strides[2] + w * p.teacher_strides[3];
  const int64_t ss = p.student_strides[1], ts = p.teacher_strides[1];
  const Acc inv_tau = static_cast<Acc>(p.inv_tau);

  bool valid = true;
  if (p.labels) valid = p.labels[b * p.label_strides[0] + h * p.label_strides[1] + w * p.label_strides[2]] != p.ignore_index;

  // Pass 1: online max and partition sum for both distributions. The maxima are of the raw logits
  // and every exponent is (x - max) * inv_tau: nvcc contracts x * inv_tau - max into one FMA, whose
  // unrounded product would differ from the rounded one taken for the max (by up to an ulp of the
  // logit, 1e-3 at 1e4), so the max class would not get exactly exp(0) and the passes would disagree.
  Acc ms = -INFINITY, mt = -INFINITY, zs = 0, zt = 0;
  for (int64_t c = 0; c < p.classes; ++c) {
    const Acc s = to_float(s_ptr[c * ss]), t = to_float(t_ptr[c * ts]);
    // A -inf logit adds exp(-inf) = 0: skipped, since while the max is still -inf, s - max is NaN.
    if (s > ms) { zs = zs * stable_exp((ms - s) * inv_tau) + 1; ms = s; } else if (s != -INFINITY) { zs += stable_exp((s - ms) * inv_tau); }
    if (t > mt) { zt = zt * stable_exp((mt - t) * inv_tau) + 1; mt = t; } else if (t != -INFINITY) { zt += stable_exp((t - mt) * inv_tau); }
  }
  const Acc rzs = Acc(1) / zs, rzt = Acc(1) / zt;
  // Ignored pixels get exactly 0, selected rather than multiplied: their gradient may be inf or NaN.
  const Acc g = static_cast<Acc>(*p.scale) * inv_tau;

  // Pass 2: loss term and the student's gradient.
  Acc e = 0;
  for (int64_t c = 0; c < p.classes; ++c) {
    const Acc xs = (to_float(s_ptr[c * ss]) - ms) * inv_tau, xt = (to_float(t_ptr[c * ts]) - mt) * inv_tau;
    const Acc es = stable_exp(xs), et = stable_exp(xt);
    e += weighted(et, class_term<Acc, kKL>(xs, xt));
    if (p.grad_student) {
      Scalar* out = static_cast<Scalar*>(p.grad_student) + b * p.grad_student_strides[0] + c * p.grad_student_strides[1] +
                    h * p.grad_student_strides[2] + w * p.grad_student_strides[3];
      store(out, valid ? g * (es * rzs - et * rzt) : Acc(0));
    }
  }
  e *= rzt;
  Acc value = e + log(zs);
  if (kKL) value -= log(zt);
  p.pixel_loss[pixel] = valid ? static_cast<double>(value) : 0.0;

  // Pass 3: the teacher's gradient q_t,c (l_c - e), only when asked.
  if (p.grad_teacher) {
    for (int64_t c = 0; c < p.classes; ++c) {
      const Acc xs = (to_float(s_ptr[c * ss]) - ms) * inv_tau, xt = (to_float(t_ptr[c * ts]) - mt) * inv_tau;
      Scalar* out = static_cast<Scalar*>(p.grad_teacher) + b * p.grad_teacher_strides[0] + c * p.grad_teacher_strides[1] +
                    h * p.grad_teacher_strides[2] + w * p.grad_teacher_strides[3];
      store(out, valid ? g * rzt * weighted(stable_exp(xt), class_term<Acc, kKL>(xs, xt) - e) : Acc(0));
    }
  }
}

template <typename Scalar, typename Acc>
void launch(const PixelwiseProblem& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t pixels = p.batch * p.height * p.width;
  const unsigned blocks = static_cast<unsigned>((pixels + kThreads - 1) / kThreads);
  if (blocks == 0) return;
  if (p.loss == PixelLoss::KL) pixelwise_kernel<Scalar, Acc, true><<<blocks, kThreads, 0, stream>>>(p);
  else pixelwise_kernel<Scalar, Acc, false><<<blocks, kThreads, 0, stream>>>(p);
}

}  // namespace

void pixelwise_loss_and_grad(const PixelwiseProblem& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::Float32: return launch<float, float>(p, s);
    case DType::Float64: return launch<double, double>(p, s);
    case DType::Float16: return launch<__half, float>(p, s);
    case DType::BFloat16: return launch<__nv_bfloat16, float>(p, s);
  }
}

}  // namespace skd::cuda
