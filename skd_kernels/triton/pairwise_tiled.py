"""The low-rank core's fallback decided on the device: where its float64 error estimate refused the
low-rank result, the tiled algorithm overwrites it (docs/ops/pairwise.md, "Error estimates and
fallbacks"). Reading the decision on the host would stall the stream every call for a fallback that
almost never serves; here it costs one launch whose programs read one flag and, almost always, stop.

One program owns rows I (BLOCK_R nodes) of D = Us^T Us - Ut^T Ut of one image and one block of
BLOCK_C channels of one side: it forms D_IJ tile by tile over the columns J (float64 `tl.dot`, DMMA
on Hopper), accumulates that side's gradient columns +-4 X_J D_IJ^T and, in channel block 0, the
partial sum of D_I^2. Every channel block forms D_I again: O(M^2 C) work per block, the price of
never storing D, paid only when the fallback serves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device

_BLOCK_R = 32
_BLOCK_C = 32


@triton.jit
def _difference_tile(us_ptr, ut_ptr, b, rows, cols, CS, CT, M, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """D[rows, cols] = Us[:, rows]^T Us[:, cols] - Ut[:, rows]^T Ut[:, cols] of image b, float64."""
    d = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float64)
    for c0 in range(0, CS, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        base = us_ptr + (b * CS + chan[:, None]) * M
        ui = tl.load(base + rows[None, :], mask=(chan < CS)[:, None] & (rows < M)[None, :], other=0.0)
        uj = tl.load(base + cols[None, :], mask=(chan < CS)[:, None] & (cols < M)[None, :], other=0.0)
        d += tl.dot(tl.trans(ui), uj)
    for c0 in range(0, CT, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        base = ut_ptr + (b * CT + chan[:, None]) * M
        ui = tl.load(base + rows[None, :], mask=(chan < CT)[:, None] & (rows < M)[None, :], other=0.0)
        uj = tl.load(base + cols[None, :], mask=(chan < CT)[:, None] & (cols < M)[None, :], other=0.0)
        d -= tl.dot(tl.trans(ui), uj)
    return d


@triton.jit
def _tiled_fallback_kernel(
    within_ptr, us_ptr, ut_ptr, gs_ptr, gt_ptr, partial_ptr, CS, CT, M, BLOCKS_S, BLOCKS_T,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    if tl.load(within_ptr) == 0:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.program_id(1)
        b = tl.program_id(2)
        # Channel blocks 0 .. BLOCKS_S - 1 are the student's, then BLOCKS_T of the teacher's (0 for a
        # side without a gradient); block 0 alone, writing no gradient, when neither has one.
        if k < BLOCKS_S:
            total = _rows_of_side(us_ptr, ut_ptr, us_ptr, gs_ptr, b, rows, k * BLOCK_C + tl.arange(0, BLOCK_C), CS,
                                  CS, CT, M, 4.0, True, BLOCK_R, BLOCK_C)
        else:
            total = _rows_of_side(us_ptr, ut_ptr, ut_ptr, gt_ptr, b, rows,
                                  (k - BLOCKS_S) * BLOCK_C + tl.arange(0, BLOCK_C), CT, CS, CT, M, -4.0,
                                  k < BLOCKS_S + BLOCKS_T, BLOCK_R, BLOCK_C)
        if k == 0:
            tl.store(partial_ptr + b * tl.num_programs(0) + tl.program_id(0), total)


@triton.jit
def _rows_of_side(us_ptr, ut_ptr, x_ptr, g_ptr, b, rows, chan, C, CS, CT, M, sign, write, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """For one side X (x_ptr, C channels): its gradient columns `rows`, sign X D_I^T, at channels
    `chan`, stored when `write`; returns sum D_I^2."""
    grad = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float64)
    total = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for j0 in range(0, M, BLOCK_R):
        cols = j0 + tl.arange(0, BLOCK_R)
        d = _difference_tile(us_ptr, ut_ptr, b, rows, cols, CS, CT, M, BLOCK_R, BLOCK_C)
        total += tl.sum(d * d, axis=1)
        xj = tl.load(x_ptr + (b * C + chan[:, None]) * M + cols[None, :],
                     mask=(chan < C)[:, None] & (cols < M)[None, :], other=0.0)
        grad += tl.dot(xj, tl.trans(d))  # D is symmetric, but D_IJ^T is the tile in hand
    tl.store(g_ptr + (b * C + chan[:, None]) * M + rows[None, :], grad * sign,
             mask=write & (chan < C)[:, None] & (rows < M)[None, :])
    return tl.sum(total, axis=0)


def keep_or_tiled(us, ut, want_s, want_t, loss, grad_s, grad_t, within):
    """The low-rank result (loss, NodeGrad grad_s, grad_t) where `within` (a 0-d bool tensor), else
    the tiled algorithm's, chosen on the device: the refused result's gradient residuals are
    overwritten in place and its mean terms zeroed. us (B, Cs, M), ut (B, Ct, M): float64 nodes."""
    b, cs, m = us.shape
    ct = ut.shape[1]
    for name, grad in (("grad_s", grad_s), ("grad_t", grad_t)):
        if grad is not None and (grad.residual.dtype != torch.float64 or not grad.residual.is_contiguous()):
            raise ValueError(f"{name}: the device-side fallback writes float64 contiguous residuals")
    us, ut = us.contiguous(), ut.contiguous()
    row_tiles = triton.cdiv(m, _BLOCK_R)
    blocks_s = triton.cdiv(cs, _BLOCK_C) if grad_s is not None else 0
    blocks_t = triton.cdiv(ct, _BLOCK_C) if grad_t is not None else 0
    partial = torch.empty((b, row_tiles), dtype=torch.float64, device=us.device)
    gs = grad_s.residual if grad_s is not None else us  # never written without a gradient
    gt = grad_t.residual if grad_t is not None else ut
    with on_device(us):
        _tiled_fallback_kernel[(row_tiles, max(1, blocks_s + blocks_t), b)](
            within, us, ut, gs, gt, partial, cs, ct, m, blocks_s, blocks_t,
            BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4)
    # `partial` is unwritten where the low-rank result is kept: where() never reads its garbage into
    # the result.
    loss = torch.where(within, loss, partial.sum())
    return loss, _keep_mean_terms(grad_s, within), _keep_mean_terms(grad_t, within)


def _keep_mean_terms(grad, within):
    """The low-rank mean terms where the result is kept; zeros where the tiled gradient replaced it."""
    if grad is None or grad.bias is None:
        return grad
    return grad._replace(bias=torch.where(within, grad.bias, 0.0), outer_c=torch.where(within, grad.outer_c, 0.0))
