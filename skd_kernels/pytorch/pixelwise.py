"""Pixel-wise distillation's pass in stock PyTorch ops: the `torch` backend.

Same contract and the same cancellation-free formulas as the C++/CUDA and Triton kernels (see
`ops/pixelwise.py`): per-pixel loss into `pixel_loss`, and the gradients of constant * sum(pixel_loss)
into the gradient buffers. The formulas and their derivation: docs/ops/pixelwise.md.
"""
from __future__ import annotations

import math

import torch

from ..reference import accumulation_dtype

# Below these KL values (as the standard form computes them) a pixel takes the close form; see the
# math page and csrc/cpu/pixelwise.cpp, which uses the same values.
CLOSE_FOR_LOSS = 0.25
CLOSE_FOR_GRADIENT = 0.1


def _phi(v: torch.Tensor) -> torch.Tensor:
    """e^v - 1 - v: v^2 times its Taylor series up to v^13 where |v| <= 1/4 (float64) or 1 (float32),
    where e^v - 1 - v would cancel; directly beyond."""
    limit = 0.25 if v.dtype == torch.float64 else 1.0
    series = torch.full_like(v, 1.0 / math.factorial(13))
    for k in range(12, 1, -1):
        series = series * v + 1.0 / math.factorial(k)
    return torch.where(v.abs() <= limit, v * v * series, torch.expm1(v) - v)


def _rest(e: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """sum_c e_c without the maximum's exact 1 (added as e - 1 = 0, so that a NaN still propagates)."""
    return torch.where(top, e - 1, e).sum(1)


def loss_and_grad(student, teacher, labels, ignore_index, inv_tau, kl, constant, pixel_loss,
                  grad_student, grad_teacher) -> None:
    """student, teacher (B, K, H, W); labels (B, H, W) int64 or None; constant: the form's 0-d float64 factor;
    pixel_loss (B, H, W) float64; grad_student / grad_teacher: logits-shaped buffers or None."""
    acc = accumulation_dtype(student)
    s, t = student.to(acc), teacher.to(acc)
    ms, arg_s = s.max(1, keepdim=True)
    mt, arg_t = t.max(1, keepdim=True)
    ds, dt = s - ms, t - mt  # <= 0
    # The products with 1/tau and the differences s - t, ms - mt in float64: exact, or nearly, before
    # the one rounding to the accumulation type (the kernels use FMAs and two-sums for this).
    es = (ds.double() * inv_tau).exp().to(acc)
    et = (dt.double() * inv_tau).exp().to(acc)
    u = (((s.double() - t.double()) - (ms.double() - mt.double())) * inv_tau).to(acc)
    classes = torch.arange(s.shape[1], device=s.device).view(1, -1, 1, 1)
    top_s, top_t = classes == arg_s, classes == arg_t
    zs_rest, zt_rest = _rest(es, top_s), _rest(et, top_t)
    zs, zt = (1 + zs_rest)[:, None], (1 + zt_rest)[:, None]
    q = et / zt
    no_weight = et == 0  # a class of teacher weight 0 adds nothing, even where its term is infinite
    mean_u = torch.where(no_weight, 0, q * u).sum(1, keepdim=True)
    kl_standard = torch.log(zs / zt) - mean_u
    # The close form: v = u - mean u, B = sum q phi(v), KL = log1p(B), p_s - q_t = (q (e^v - 1) - q B) / (1 + B).
    v = u - mean_u
    q_exp = es * torch.exp(-mean_u) / zt  # q e^v, right where q underflows and p_s does not
    phi = _phi(v)
    series = v.abs() <= (0.25 if acc == torch.float64 else 1.0)
    close_sum = torch.where(no_weight, q_exp, torch.where(series, q * phi, (q_exp - q) - q * v)).sum(1, keepdim=True)
    r = torch.where(no_weight, q_exp, torch.where(series, q * (v + phi), q_exp - q))
    valid = torch.ones_like(zs, dtype=torch.bool) if labels is None else (labels != ignore_index)[:, None]
    close = valid & (((kl_standard <= CLOSE_FOR_LOSS) & kl) |
                     ((kl_standard <= CLOSE_FOR_GRADIENT) & (grad_student is not None)))
    if kl:
        loss_map = torch.where(close, torch.log1p(close_sum), kl_standard)
    else:  # cross-entropy log zs - mean x: non-negative terms
        mean_x = torch.where(no_weight, 0, q * ds * inv_tau).sum(1, keepdim=True)
        loss_map = torch.log1p(zs_rest)[:, None] - mean_x
    pixel_loss.copy_(torch.where(valid, loss_map, 0)[:, 0])
    # Ignored pixels get exactly 0, selected rather than multiplied: their gradient may be inf or NaN.
    weight = (constant * inv_tau).to(acc)
    if grad_student is not None:
        direct = es / zs - q
        near = (r - q * close_sum) / (1 + close_sum)
        # The top class of both: (zt_rest - zs_rest) / (zs zt), unless the rests nearly cancel.
        zs_r, zt_r = zs_rest[:, None], zt_rest[:, None]
        shared = (arg_s == arg_t) & ((zt_r - zs_r).abs() >= 0.5 * torch.maximum(zs_r, zt_r))
        top = (zt_r - zs_r) / (zs * zt)
        grad = torch.where(shared & top_s, top, torch.where(close, near, direct))
        grad_student.copy_(torch.where(valid, grad * weight, 0))
    if grad_teacher is not None:
        # q (l_c - loss): mean u - u for the KL, mean x - x for the cross-entropy.
        excess = mean_u - u if kl else torch.where(no_weight, 0, q * ds * inv_tau).sum(1, keepdim=True) - ds * inv_tau
        # 1/zt outside the select: NaN when the teacher has a +inf logit, as in the reference.
        grad_teacher.copy_(torch.where(valid, torch.where(no_weight, 0, et * excess) / zt * weight, 0))
