#pragma once
#include "common/attention_problem.h"

namespace skd::cpu {
// Each fills the outputs named in AttentionProblem; OpenMP over (image, block of rows or columns).
void attention_forward(const AttentionProblem& p);          // out, lse
void attention_backward(const AttentionProblem& p);         // grad_q, grad_k, grad_v
void attention_double_backward(const AttentionProblem& p);  // grad_q, grad_k, grad_v, grad_dout
}
