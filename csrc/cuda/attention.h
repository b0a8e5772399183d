#pragma once
#include "common/attention_problem.h"

namespace skd::cuda {
// Launch the attention passes on `stream` (a cudaStream_t); asynchronous, no host sync.
void attention_forward(const AttentionProblem& p, void* stream);
void attention_backward(const AttentionProblem& p, void* stream);
void attention_double_backward(const AttentionProblem& p, void* stream);
}
