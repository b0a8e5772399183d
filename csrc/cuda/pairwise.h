#pragma once
#include "common/pairwise_problem.h"

namespace skd::cuda {
// Launch the node passes on `stream` (a cudaStream_t); asynchronous, no host sync.
void pairwise_nodes_forward(const PairwiseNodesProblem& p, void* stream);
void pairwise_nodes_backward(const PairwiseNodesProblem& p, void* stream);
}
