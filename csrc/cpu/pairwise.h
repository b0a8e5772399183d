#pragma once
#include "common/pairwise_problem.h"

namespace skd::cpu {
// Pools, normalises and transposes into p.nodes / p.inv_norm / p.argmax; OpenMP over (image, node row).
void pairwise_nodes_forward(const PairwiseNodesProblem& p);
// The gradient of the node pass: through the normalisation and the pooling into p.grad_features.
void pairwise_nodes_backward(const PairwiseNodesProblem& p);
}
