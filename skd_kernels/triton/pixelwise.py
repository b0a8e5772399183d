"""Fused pixel-wise distillation in Triton.

One program owns BLOCK_P pixels of one image and all K classes: it loads the (BLOCK_K, BLOCK_P)
tiles of S and T once (pixels are contiguous in NCHW, so each class row is a coalesced load), and
from registers computes both softmaxes, the pixel losses and the gradients. BLOCK_K is K rounded
up to a power of two; BLOCK_P shrinks as K grows to keep the tile within the register budget.
Arithmetic is float32 (float64 for float64 input): the interpreter cannot do bf16 arithmetic, and
fp32 accumulation is the contract anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device

MAX_CLASSES = 16384
_TILE_ELEMENTS = 4096


@triton.jit
def _pixelwise_kernel(
    s_ptr, t_ptr, labels_ptr, scale_ptr, loss_ptr, gs_ptr, gt_ptr,
    K, H, W, ignore_index, inv_tau,
    s_sb, s_sk, s_sh, s_sw, t_sb, t_sk, t_sh, t_sw, l_sb, l_sh, l_sw,
    gs_sb, gs_sk, gs_sh, gs_sw, gt_sb, gt_sk, gt_sh, gt_sw,
    KL: tl.constexpr, INV_TAU_IN_MEMORY: tl.constexpr, HAS_LABELS: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    classes = tl.arange(0, BLOCK_K)
    p_mask = pixels < H * W
    k_mask = classes < K
    h = pixels // W
    w = pixels % W
    mask = k_mask[:, None] & p_mask[None, :]

    s_off = b * s_sb + classes[:, None] * s_sk + (h * s_sh + w * s_sw)[None, :]
    t_off = b * t_sb + classes[:, None] * t_sk + (h * t_sh + w * t_sw)[None, :]
    s = tl.load(s_ptr + s_off, mask=mask, other=0.0)
    t = tl.load(t_ptr + t_off, mask=mask, other=0.0)
    acc = tl.float64 if s.dtype == tl.float64 else tl.float32
    if INV_TAU_IN_MEMORY:  # float64 input: a scalar argument would round 1/tau to float32
        inv_tau = tl.load(inv_tau)
    # Padded classes get -inf: weight 0 in both softmaxes. Padded pixels keep finite zeros (no NaN).
    s = tl.where(k_mask[:, None], s.to(acc), float("-inf"))
    t = tl.where(k_mask[:, None], t.to(acc), float("-inf"))
    # Scaled after subtracting the raw max: the GPU compiler contracts x * inv_tau - max into one FMA,
    # whose unrounded product would leave the max class a rounding error instead of exactly 0.
    xs = (s - tl.max(s, axis=0)[None, :]) * inv_tau
    xt = (t - tl.max(t, axis=0)[None, :]) * inv_tau
    es = tl.exp(xs)
    et = tl.exp(xt)
    zs = tl.sum(es, axis=0)
    zt = tl.sum(et, axis=0)
    # The per-class term whose q_t-weighted mean is the loss (see csrc/cpu/pixelwise.cpp), unclamped:
    # a -inf student logit under a positive teacher weight gives +inf, as in the official loss.
    if KL:
        term = xt - xs
    else:
        term = -xs
    # A class of teacher weight exactly 0 (padded, or a -inf teacher logit) adds 0 even where its
    # term is infinite (0 log 0 = 0); a NaN weight stays NaN.
    no_weight = et == 0.0
    e = tl.sum(tl.where(no_weight, 0.0, et * term), axis=0) / zt
    loss = e + tl.log(zs)
    if KL:
        loss -= tl.log(zt)

    valid = p_mask
    if HAS_LABELS:
        label = tl.load(labels_ptr + b * l_sb + h * l_sh + w * l_sw, mask=p_mask, other=ignore_index)
        valid = valid & (label != ignore_index)
    tl.store(loss_ptr + b * H * W + pixels, tl.where(valid, loss, 0.0).to(tl.float64), mask=p_mask)

    # Ignored pixels get exactly 0, selected rather than multiplied: their gradient may be inf or NaN.
    g = tl.load(scale_ptr).to(acc) * inv_tau
    if GRAD_S:
        grad = tl.where(valid[None, :], g * (es / zs[None, :] - et / zt[None, :]), 0.0)
        off = b * gs_sb + classes[:, None] * gs_sk + (h * gs_sh + w * gs_sw)[None, :]
        tl.store(gs_ptr + off, grad.to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        # 1 / zt outside the select: NaN when the teacher has a +inf logit, as in the reference.
        grad = (g / zt[None, :]) * tl.where(no_weight, 0.0, et * (term - e[None, :]))
        grad = tl.where(valid[None, :], grad, 0.0)
        off = b * gt_sb + classes[:, None] * gt_sk + (h * gt_sh + w * gt_sw)[None, :]
        tl.store(gt_ptr + off, grad.to(gt_ptr.dtype.element_ty), mask=mask)


def loss_and_grad(student, teacher, labels, ignore_index, inv_tau, kl, scale, pixel_loss,
                      grad_student, grad_teacher) -> None:
    """Launch on validated input; same contract as the C++/CUDA `pixelwise_loss_and_grad` and
    `pytorch/pixelwise.py`."""
    b, k, h, w = student.shape
    if k > MAX_CLASSES:
        raise ValueError(f"the triton backend handles up to {MAX_CLASSES} classes, got {k}; use backend='cuda'")
    block_k = triton.next_power_of_2(k)
    block_p = max(1, min(256, _TILE_ELEMENTS // block_k, triton.next_power_of_2(h * w)))
    dummy = pixel_loss  # stands in for absent optional pointers; never dereferenced
    label_strides = labels.stride() if labels is not None else (0, 0, 0)
    gs_strides = grad_student.stride() if grad_student is not None else (0, 0, 0, 0)
    gt_strides = grad_teacher.stride() if grad_teacher is not None else (0, 0, 0, 0)
    if student.dtype == torch.float64:
        inv_tau = torch.full((1,), inv_tau, dtype=torch.float64, device=student.device)
    grid = (triton.cdiv(h * w, block_p), b)
    with on_device(student):
        _pixelwise_kernel[grid](
            student, teacher, labels if labels is not None else dummy, scale, pixel_loss,
            grad_student if grad_student is not None else dummy,
            grad_teacher if grad_teacher is not None else dummy,
            k, h, w, ignore_index, inv_tau,
            *student.stride(), *teacher.stride(), *label_strides, *gs_strides, *gt_strides,
            KL=kl, INV_TAU_IN_MEMORY=student.dtype == torch.float64, HAS_LABELS=labels is not None, GRAD_S=grad_student is not None,
            GRAD_T=grad_teacher is not None, BLOCK_K=block_k, BLOCK_P=block_p,
            num_warps=4 if block_k * block_p <= 2048 else 8,
        )
