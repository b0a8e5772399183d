#pragma once
#include "common/pixelwise_problem.h"

namespace skd::cpu {
// Fills p.pixel_loss and, when asked, the gradients; OpenMP over blocks of pixels.
void pixelwise_loss_and_grad(const PixelwiseProblem& p);
}
