#pragma once
#include "common/pixelwise_problem.h"

namespace skd::cuda {
// Launches the fused pixel-wise kernel on `stream` (a cudaStream_t); asynchronous, no host sync.
void pixelwise_loss_and_grad(const PixelwiseProblem& p, void* stream);
}
