"""Fused pixel-wise distillation in Triton. The math, including the cancellation-free close form:
docs/ops/pixelwise.md.

One program owns BLOCK_P pixels of one image and all K classes: it loads the (BLOCK_K, BLOCK_P)
tiles of S and T once and from registers computes both softmaxes, the pixel losses and the
gradients. In NCHW an image's pixels are one contiguous range for every class, so the program's
pixels are a flat range (FLAT: offsets p * stride, which the compiler can turn into vector loads;
no h = p // W, w = p % W); other layouts address (h, w). BLOCK_K is K rounded up to a power of two;
BLOCK_P shrinks as K grows to keep the tile within the register budget. Arithmetic is float32
(float64 for float64 input): the interpreter cannot do bf16 arithmetic, and fp32 accumulation is
the contract anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device

MAX_CLASSES = 16384
_TILE_ELEMENTS = 4096
# Below these KL values (the standard form's) a pixel takes the close form (as csrc/cpu/pixelwise.cpp):
# the KL's threshold for the KL forms, the gradient's for the cross-entropy.
CLOSE_FOR_LOSS = tl.constexpr(0.25)
CLOSE_FOR_GRADIENT = tl.constexpr(0.1)


@triton.jit
def _exp_scaled(d, inv_tau, inv_tau_lo, IS_F64: tl.constexpr):
    """exp(d * inv_tau + d * inv_tau_lo) for d <= 0 with the product unrounded (FMA in the range
    reduction): rounding x = d / tau first costs a relative error |x| 2^-24. 0 below about -86.6."""
    if IS_F64:
        return tl.exp(d * inv_tau)
    y = d * (inv_tau * 1.4426950408889634)
    underflow = y < -125.0
    n = tl.floor(tl.where(underflow, -125.0, y) + 0.5)
    r = tl.fma(d, inv_tau, n * -0.693359375)  # Cody-Waite ln 2 split; n * hi is exact
    r = tl.fma(n, 2.12194440e-4, tl.fma(d, inv_tau_lo, r))
    p = 1.9875691500e-4
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    p = p * r * r + r + 1.0
    two_n = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(underflow, 0.0, p * two_n)


@triton.jit
def _phi_series(v):
    """(e^v - 1 - v) / v^2 up to v^13: exact to rounding for |v| <= 1 (float32), 1/4 (float64)."""
    p = 1.0 / 6227020800.0
    p = p * v + 1.0 / 479001600.0
    p = p * v + 1.0 / 39916800.0
    p = p * v + 1.0 / 3628800.0
    p = p * v + 1.0 / 362880.0
    p = p * v + 1.0 / 40320.0
    p = p * v + 1.0 / 5040.0
    p = p * v + 1.0 / 720.0
    p = p * v + 1.0 / 120.0
    p = p * v + 1.0 / 24.0
    p = p * v + 1.0 / 6.0
    return p * v + 0.5


@triton.jit
def _pixelwise_kernel(
    s_ptr, t_ptr, labels_ptr, scale_ptr, loss_ptr, gs_ptr, gt_ptr,
    K, H, W, ignore_index, inv_tau, inv_tau_lo,
    s_sb, s_sk, s_sh, s_sw, t_sb, t_sk, t_sh, t_sw, l_sb, l_sh, l_sw,
    gs_sb, gs_sk, gs_sh, gs_sw, gt_sb, gt_sk, gt_sh, gt_sw,
    KL: tl.constexpr, FLAT: tl.constexpr, INV_TAU_IN_MEMORY: tl.constexpr, HAS_LABELS: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    classes = tl.arange(0, BLOCK_K)
    p_mask = pixels < H * W
    k_mask = classes < K
    mask = k_mask[:, None] & p_mask[None, :]
    if FLAT:  # every tensor addresses the image's pixels as one run: stride_h == W * stride_w
        s_pix, t_pix, gs_pix, gt_pix = pixels * s_sw, pixels * t_sw, pixels * gs_sw, pixels * gt_sw
    else:
        h = pixels // W
        w = pixels % W
        s_pix, t_pix = h * s_sh + w * s_sw, h * t_sh + w * t_sw
        gs_pix, gt_pix = h * gs_sh + w * gs_sw, h * gt_sh + w * gt_sw

    s = tl.load(s_ptr + b * s_sb + classes[:, None] * s_sk + s_pix[None, :], mask=mask, other=0.0)
    t = tl.load(t_ptr + b * t_sb + classes[:, None] * t_sk + t_pix[None, :], mask=mask, other=0.0)
    IS_F64: tl.constexpr = s.dtype == tl.float64
    acc = tl.float64 if IS_F64 else tl.float32
    if INV_TAU_IN_MEMORY:  # float64 input: a scalar argument would round 1/tau to float32
        inv_tau = tl.load(inv_tau)
    # Padded classes get -inf: weight 0 in both softmaxes. Padded pixels keep finite zeros (no NaN).
    s = tl.where(k_mask[:, None], s.to(acc), float("-inf"))
    t = tl.where(k_mask[:, None], t.to(acc), float("-inf"))
    ms = tl.max(s, axis=0)
    mt = tl.max(t, axis=0)
    arg_s = tl.argmax(s, axis=0)
    arg_t = tl.argmax(t, axis=0)
    ds = s - ms[None, :]  # <= 0; the maxima are of the raw logits, 1/tau enters the exponentials
    dt = t - mt[None, :]
    es = _exp_scaled(ds, inv_tau, inv_tau_lo, IS_F64)
    et = _exp_scaled(dt, inv_tau, inv_tau_lo, IS_F64)
    # Partition sums without the maximum's exact 1 (added as e - 1 = 0: a NaN there propagates).
    top_s = classes[:, None] == arg_s[None, :]
    top_t = classes[:, None] == arg_t[None, :]
    zs_rest = tl.sum(tl.where(top_s, es - 1.0, es), axis=0)
    zt_rest = tl.sum(tl.where(top_t, et - 1.0, et), axis=0)
    zs = 1.0 + zs_rest
    zt = 1.0 + zt_rest
    # u = x - y = ((s - t) - (ms - mt)) / tau with both differences exact (two-sums): small and
    # exact where the student is close to the teacher, up to any per-pixel offset.
    d_hi = s - t
    bb = d_hi - s
    d_lo = (s - (d_hi - bb)) - (t + bb)
    d_lo = tl.where(d_hi - d_hi == 0.0, d_lo, 0.0)
    dm_hi = ms - mt
    bm = dm_hi - ms
    dm_lo = (ms - (dm_hi - bm)) - (mt + bm)
    dm_lo = tl.where(dm_hi - dm_hi == 0.0, dm_lo, 0.0)
    u = ((d_hi - dm_hi[None, :]) + (d_lo - dm_lo[None, :])) * inv_tau
    # A class of teacher weight exactly 0 (padded, or a -inf teacher logit) adds 0 even where its
    # term is infinite (0 log 0 = 0); a NaN weight stays NaN.
    no_weight = et == 0.0
    q = et / zt[None, :]
    mean_u = tl.sum(tl.where(no_weight, 0.0, q * u), axis=0)
    kl_standard = tl.log(zs / zt) - mean_u
    # Close form: v = u - mean u, B = sum q phi(v), KL = log1p(B), p_s - q = (q (e^v - 1) - q B) / (1 + B).
    v = u - mean_u[None, :]
    phi = v * v * _phi_series(v)
    if IS_F64:
        series = tl.abs(v) <= 0.25
    else:
        series = tl.abs(v) <= 1.0
    shift = tl.exp(-tl.minimum(tl.maximum(mean_u, -80.0), 80.0)) / zt  # exp(-mean u) / zt; used where close
    q_exp = es * shift[None, :]  # q e^v: right where q underflows and p_s does not
    close_sum = tl.sum(tl.where(no_weight, q_exp, tl.where(series, q * phi, (q_exp - q) - q * v)), axis=0)
    valid = p_mask
    if HAS_LABELS:
        if FLAT:
            l_pix = (pixels // W) * l_sh + (pixels % W) * l_sw
        else:
            l_pix = h * l_sh + w * l_sw
        label = tl.load(labels_ptr + b * l_sb + l_pix, mask=p_mask, other=ignore_index)
        valid = valid & (label != ignore_index)
    if KL:
        close = valid & (kl_standard <= CLOSE_FOR_LOSS)
    else:
        close = valid & (kl_standard <= CLOSE_FOR_GRADIENT)
    if KL:
        # log1p(B) = log(1 + B) * B / ((1 + B) - 1), exact where 1 + B rounds (Goldberg).
        one_b = 1.0 + close_sum
        log1p_b = tl.where(one_b == 1.0, close_sum, tl.log(one_b) * (close_sum / (one_b - 1.0)))
        loss = tl.where(close, log1p_b, kl_standard)
    else:  # cross-entropy log zs - mean x: non-negative terms; log zs = log1p(zs_rest)
        mean_x = tl.sum(tl.where(no_weight, 0.0, q * ds), axis=0) * inv_tau
        log1p_zs = tl.where(zs == 1.0, zs_rest, tl.log(zs) * (zs_rest / (zs - 1.0)))
        loss = log1p_zs - mean_x
    tl.store(loss_ptr + b * H * W + pixels, tl.where(valid, loss, 0.0).to(tl.float64), mask=p_mask)

    # Ignored pixels get exactly 0, selected rather than multiplied: their gradient may be inf or NaN.
    g = tl.load(scale_ptr).to(acc) * inv_tau
    if GRAD_S:
        direct = es / zs[None, :] - q
        r = tl.where(no_weight, q_exp, tl.where(series, q * (v + phi), q_exp - q))
        near = (r - q * close_sum[None, :]) / (1.0 + close_sum[None, :])
        # The top class of both: (zt_rest - zs_rest) / (zs zt), unless the two rests nearly cancel.
        shared = (arg_s == arg_t) & (tl.abs(zt_rest - zs_rest) >= 0.5 * tl.maximum(zs_rest, zt_rest))
        top = (zt_rest - zs_rest) / (zs * zt)
        grad = tl.where(shared[None, :] & top_s, top[None, :], tl.where(close[None, :], near, direct))
        grad = tl.where(valid[None, :], g * grad, 0.0)
        tl.store(gs_ptr + b * gs_sb + classes[:, None] * gs_sk + gs_pix[None, :],
                 grad.to(gs_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        # q (l_c - loss): mean u - u for the KL, mean x - x for the cross-entropy. 1 / zt outside the
        # select: NaN when the teacher has a +inf logit, as in the reference.
        if KL:
            excess = mean_u[None, :] - u
        else:
            excess = mean_x[None, :] - ds * inv_tau
        grad = (g / zt[None, :]) * tl.where(no_weight, 0.0, et * excess)
        grad = tl.where(valid[None, :], grad, 0.0)
        tl.store(gt_ptr + b * gt_sb + classes[:, None] * gt_sk + gt_pix[None, :],
                 grad.to(gt_ptr.dtype.element_ty), mask=mask)


def _flat(strides, w):
    return strides[2] == w * strides[3]


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
    gs_strides = grad_student.stride() if grad_student is not None else (0, 0, w, 1)
    gt_strides = grad_teacher.stride() if grad_teacher is not None else (0, 0, w, 1)
    flat = all(_flat(st, w) for st in (student.stride(), teacher.stride(), gs_strides, gt_strides))
    inv_tau_lo = 0.0
    if student.dtype == torch.float64:
        inv_tau = torch.full((1,), inv_tau, dtype=torch.float64, device=student.device)
    else:  # the part of 1/tau that float32 rounds off, folded into the exponentials' FMA
        inv_tau_lo = float(inv_tau - float(torch.tensor(inv_tau, dtype=torch.float32)))
    grid = (triton.cdiv(h * w, block_p), b)
    with on_device(student):
        _pixelwise_kernel[grid](
            student, teacher, labels if labels is not None else dummy, scale, pixel_loss,
            grad_student if grad_student is not None else dummy,
            grad_teacher if grad_teacher is not None else dummy,
            k, h, w, ignore_index, inv_tau, inv_tau_lo,
            *student.stride(), *teacher.stride(), *label_strides, *gs_strides, *gt_strides,
            KL=kl, FLAT=flat, INV_TAU_IN_MEMORY=student.dtype == torch.float64, HAS_LABELS=labels is not None,
            GRAD_S=grad_student is not None, GRAD_T=grad_teacher is not None, BLOCK_K=block_k, BLOCK_P=block_p,
            num_warps=4 if block_k * block_p <= 2048 else 8,
        )
