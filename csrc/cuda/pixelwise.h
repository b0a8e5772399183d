#pragma once
#include <cstdint>

#include "common/pixelwise_problem.h"

namespace skd::cuda {

// Where the kernel sums the pixel losses (all on the device): one partial per block, the total,
// and the ticket the last block takes (0 before the launch; the kernel leaves it 0 again).
struct PixelwiseReduction {
  double* partials;   // pixelwise_reduction_blocks(p) doubles, no initialisation needed
  double* loss_sum;   // one double: the sum of the pixel losses, before the form's constant
  unsigned* ticket;   // one unsigned, 0
};

// How many partials the launch for `p` writes.
int64_t pixelwise_reduction_blocks(const PixelwiseProblem& p);

// Launches the fused pixel-wise kernel on `stream` (a cudaStream_t); asynchronous, no host sync.
// Fills the gradients asked for and red.loss_sum; p.pixel_loss is not written.
void pixelwise_loss_and_grad(const PixelwiseProblem& p, const PixelwiseReduction& red, void* stream);

// grad[i] *= *factor for n contiguous elements of `dtype`; factor on the device, float32 (float64
// for float64 gradients). Returns at once on the device when the factor is 1.
void scale_in_place(DType dtype, void* grad, int64_t n, const void* factor, void* stream);

}  // namespace skd::cuda
