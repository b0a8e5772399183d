"""Pixel-wise distillation's pass in stock PyTorch ops: the `torch` backend.

Same contract as the C++/CUDA and Triton kernels (see `ops/pixelwise.py`): per-pixel loss into
`pixel_loss`, and the gradients of constant * sum(pixel_loss) into the gradient buffers. The formulas
and their derivation: docs/ops/pixelwise.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import accumulation_dtype


def loss_and_grad(student, teacher, labels, ignore_index, inv_tau, kl, constant, pixel_loss,
                  grad_student, grad_teacher) -> None:
    """student, teacher (B, K, H, W); labels (B, H, W) int64 or None; constant: the form's 0-d float64 factor;
    pixel_loss (B, H, W) float64; grad_student / grad_teacher: logits-shaped buffers or None."""
    dtype = accumulation_dtype(student)
    log_q_s = F.log_softmax(student.to(dtype) * inv_tau, dim=1)
    log_q_t = F.log_softmax(teacher.to(dtype) * inv_tau, dim=1)
    q_t = log_q_t.exp()
    # Per class: q_t (log q_t - log q_s) for the KL, -q_t log q_s for the official soft
    # cross-entropy; a class of zero teacher probability adds 0 (0 log 0 = 0), not NaN.
    inner = log_q_t - log_q_s if kl else -log_q_s
    loss_map = torch.where(q_t == 0, 0, q_t * inner).sum(1)  # NaN (a +inf logit) propagates
    valid = None if labels is None else (labels != ignore_index)
    if valid is not None:
        loss_map = torch.where(valid, loss_map, 0)
    pixel_loss.copy_(loss_map)
    weight = (constant * inv_tau).to(dtype)
    if valid is not None:
        weight = weight * valid[:, None]
    if grad_student is not None:
        grad_student.copy_((log_q_s.exp() - q_t) * weight)
    if grad_teacher is not None:
        # d/dt of sum_c q_t,c inner_c: the terms through log q_t sum to 0, leaving q_t (inner - loss).
        grad_teacher.copy_(torch.where(q_t == 0, 0, q_t * (inner - loss_map[:, None])) * weight)
