// The pixel-wise distillation problem as every backend sees it: plain pointers, sizes and strides.
// Shared by the C++ (OpenMP) and CUDA kernels; includes nothing from torch so both compile fast.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace skd {

// How a pixel's loss is formed from q_t = softmax(T/tau) and p_s = softmax(S/tau).
enum class PixelLoss : int {
  CrossEntropy = 0,  // -sum_c q_t log p_s        (the official CriterionPixelWise)
  KL = 1,            //  sum_c q_t (log q_t - log p_s)
};

struct PixelwiseProblem {
  DType dtype;
  PixelLoss loss;
  int64_t batch, classes, height, width;
  // Strides in elements, (batch, class, row, column); any layout, no copies needed.
  const void* student; int64_t student_strides[4];
  const void* teacher; int64_t teacher_strides[4];
  // Optional int64 label map (batch, row, column); pixels equal to ignore_index are left out.
  const int64_t* labels; int64_t label_strides[3]; int64_t ignore_index;
  double inv_tau;
  // The form's constant (1/(H*W), tau^2/valid pixels, ...), applied to the gradients. One double on
  // the logits' device: it may depend on a count of labels that is never brought to the host.
  const double* scale;
  // Outputs: per-pixel loss, contiguous (batch, row, column), before `scale`. Double, so that the
  // float64 path is exact and the sum over millions of pixels loses nothing.
  double* pixel_loss;
  // Gradients with respect to the logits (nullptr when not wanted), in their own strides.
  void* grad_student; int64_t grad_student_strides[4];
  void* grad_teacher; int64_t grad_teacher_strides[4];
};

}  // namespace skd
