"""Pair-wise distillation with few nodes (at most 64 an image; the official 3 x 3) in two Triton
launches: at that size the loss costs its launches, not its arithmetic (the three-pass path makes
about eleven). The math: docs/ops/pairwise.md.

1. `_few_pool_kernel`: one program pools one node's window for BLOCK_C channels of the student or
   the teacher into float64 (B, C, M), with the maxima's positions where a gradient is wanted.
   Programs are windows x channel blocks x images, enough to stream the maps at full bandwidth.
2. `_few_loss_grad_kernel`: one program per (node i, group of channel blocks, image; groups enough
   for about 512 programs) recomputes
   from the pooled nodes (L2 hits: M (Cs + Ct) values) every node's norm and row i of each side's
   similarities, a_ij = (p_i . p_j) / (|p_i| |p_j|) with the normaliser, so D_i = a^s_i - a^t_i,
   never storing a node-sized normalised copy. Its channels' node gradient is
   +-4 sum_j u_j D_ij / (M^2 B); the paper normalisation's radial part u_i . g = +-4 sum_j a_ij D_ij
   needs no other channel. It is taken through the normalisation and scattered over the window (the
   maximum's position, zeros elsewhere; or evenly). Group 0 also stores sum_j D_ij^2; the
   last of those programs to finish (an atomic ticket; the others' stores are released before
   their ticket) sums them in a fixed order, so the loss is deterministic, and resets the ticket.

Like the tiled algorithm it subtracts the similarities themselves: exact to float64 rounding of
each entry, however close the student is to the teacher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device
from .pairwise import pool_window, scatter_window, _window

MAX_NODES = 64
_POOL_BLOCK_C = 16
_GRAD_BLOCK_C = 32
_BLOCK_W = 32
# The second launch aims at this many programs: each recomputes its node's similarity rows from
# M (Cs + Ct) pooled values (L2 reads), so programs beyond a few waves only add reads.
_TARGET_PROGRAMS = 512
_REDUCE_BLOCK = 1024


@triton.jit
def _few_pool_kernel(
    s_ptr, t_ptr, ps_ptr, pt_ptr, as_ptr, at_ptr,
    CS, CT, H, W, NW, M, KH, KW,
    s_sb, s_sc, s_sh, s_sw, t_sb, t_sc, t_sh, t_sw, BLOCKS_S,
    POOLING: tl.constexpr, ARGMAX_S: tl.constexpr, ARGMAX_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    node = tl.program_id(0)
    k = tl.program_id(1)
    b = tl.program_id(2)
    if k < BLOCKS_S:
        chan = k * BLOCK_C + tl.arange(0, BLOCK_C)
        acc, best = pool_window(s_ptr, b, chan, node, CS, H, W, NW, KH, KW, s_sb, s_sc, s_sh, s_sw, POOLING,
                                BLOCK_C, BLOCK_W)
        tl.store(ps_ptr + (b * CS + chan) * M + node, acc, mask=chan < CS)
        if ARGMAX_S:
            tl.store(as_ptr + (b * CS + chan) * M + node, best, mask=chan < CS)
    else:
        chan = (k - BLOCKS_S) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc, best = pool_window(t_ptr, b, chan, node, CT, H, W, NW, KH, KW, t_sb, t_sc, t_sh, t_sw, POOLING,
                                BLOCK_C, BLOCK_W)
        tl.store(pt_ptr + (b * CT + chan) * M + node, acc, mask=chan < CT)
        if ARGMAX_T:
            tl.store(at_ptr + (b * CT + chan) * M + node, best, mask=chan < CT)


@triton.jit
def _dots_and_norms(p_ptr, b, i, C, M, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Over every channel of image b's pooled nodes p (C, M): p_i . p_j and |p_j|^2 for each node j."""
    nodes = tl.arange(0, BLOCK_M)
    dots = tl.zeros((BLOCK_M,), dtype=tl.float64)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        p = tl.load(p_ptr + (b * C + chan[:, None]) * M + nodes[None, :],
                    mask=(chan < C)[:, None] & (nodes < M)[None, :], other=0.0)
        p_i = tl.load(p_ptr + (b * C + chan) * M + i, mask=chan < C, other=0.0)
        dots += tl.sum(p * p_i[:, None], axis=0)
        sumsq += tl.sum(p * p, axis=0)
    return dots, sumsq


@triton.jit
def _inverse_norm(sumsq, PAPER: tl.constexpr):
    # float64 constants: a bare literal is float32, and 1e-12 or 1e-8 rounded to float32 would shift
    # the normaliser of (near-)zero nodes by 1e-8 relative.
    norm = tl.sqrt(sumsq)
    if PAPER:
        return 1.0 / tl.maximum(norm, tl.full([], 1e-12, tl.float64))
    return 1.0 / (norm + tl.full([], 1e-8, tl.float64))


@triton.jit
def _at(x, nodes, i):
    """Element i of a (BLOCK_M,) vector."""
    return tl.sum(tl.where(nodes == i, x, 0.0), axis=0)


@triton.jit
def _feature_grad(p_ptr, arg_ptr, g_ptr, g_sb, g_sc, g_sh, g_sw, b, i, chan, C, H, W, NW, M, KH, KW,
                  inv, a, d, factor, POOLING: tl.constexpr, PAPER: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    """d loss / d features over node i's window for channels `chan` of one side: `inv` (BLOCK_M,) its
    inverse norms, `a` its similarity row i, `d` = D_i, `factor` = +-4 / (M^2 B)."""
    nodes = tl.arange(0, BLOCK_M)
    c_mask = chan < C
    p = tl.load(p_ptr + (b * C + chan[:, None]) * M + nodes[None, :], mask=c_mask[:, None] & (nodes < M)[None, :],
                other=0.0)
    inv_i = _at(inv, nodes, i)
    grad_u = factor * tl.sum(p * (inv * d)[None, :], axis=1)  # factor sum_j u_j D_ij
    if PAPER:  # minus the radial part u_i (u_i . g), unless the norm was clamped (as F.normalize)
        radial = factor * tl.sum(a * d, axis=0)
        radial = tl.where(inv_i < tl.full([], 1e12, tl.float64), radial, 0.0)
        grad_u -= tl.sum(tl.where(nodes[None, :] == i, p, 0.0), axis=1) * inv_i * radial
    dp = grad_u * inv_i
    h0, w0 = _window(i, NW, KH, KW)
    h1 = tl.minimum(h0 + KH, H)
    w1 = tl.minimum(w0 + KW, W)
    if POOLING == 2:
        dp = dp / ((h1 - h0) * (w1 - w0)).to(tl.float64)
    if g_ptr.dtype.element_ty != tl.float64:  # the interpreter mis-converts f64 -> bf16
        dp = dp.to(tl.float32)
    if POOLING == 1:
        best = tl.load(arg_ptr + (b * C + chan) * M + i, mask=c_mask, other=-1)
    else:
        best = tl.zeros((BLOCK_C,), dtype=tl.int32)
    scatter_window(g_ptr, dp, best, b, chan, c_mask, h0, w0, h1, w1, W, g_sb, g_sc, g_sh, g_sw, POOLING, BLOCK_W)


@triton.jit
def _few_loss_grad_kernel(
    ps_ptr, pt_ptr, as_ptr, at_ptr, gs_ptr, gt_ptr, partial_ptr, ticket_ptr, loss_ptr,
    CS, CT, H, W, NW, M, KH, KW, B,
    gs_sb, gs_sc, gs_sh, gs_sw, gt_sb, gt_sc, gt_sh, gt_sw, BLOCKS_S, BLOCKS_T,
    POOLING: tl.constexpr, PAPER: tl.constexpr, DOT_BLOCK_C: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, REDUCE_BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    group = tl.program_id(1)
    b = tl.program_id(2)
    nodes = tl.arange(0, BLOCK_M)
    dots_s, sumsq_s = _dots_and_norms(ps_ptr, b, i, CS, M, DOT_BLOCK_C, BLOCK_M)
    dots_t, sumsq_t = _dots_and_norms(pt_ptr, b, i, CT, M, DOT_BLOCK_C, BLOCK_M)
    inv_s = _inverse_norm(sumsq_s, PAPER)
    inv_t = _inverse_norm(sumsq_t, PAPER)
    a_s = dots_s * inv_s * _at(inv_s, nodes, i)
    a_t = dots_t * inv_t * _at(inv_t, nodes, i)
    d = tl.where(nodes < M, a_s - a_t, 0.0)
    # 1 / (M^2 B) in float64: a float scalar argument would be rounded to float32.
    scale = 1.0 / ((tl.zeros([], dtype=tl.float64) + M) * M * B)
    if group == 0:
        tl.store(partial_ptr + b * M + i, tl.sum(d * d, axis=0))
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == M * B - 1:  # the last row: every other row's partial sum is stored
            total = tl.zeros((REDUCE_BLOCK,), dtype=tl.float64)
            for r0 in range(0, M * B, REDUCE_BLOCK):
                rows = r0 + tl.arange(0, REDUCE_BLOCK)
                total += tl.load(partial_ptr + rows, mask=rows < M * B, other=0.0, volatile=True)
            tl.store(loss_ptr, (tl.sum(total, axis=0) * scale).to(loss_ptr.dtype.element_ty))
            tl.atomic_xchg(ticket_ptr, 0)  # ready for the next call
    # Channel blocks 0 .. BLOCKS_S - 1 are the student's, then BLOCKS_T of the teacher's (0 for a side
    # without a gradient); this program's are every num_programs(1)-th from its group.
    for k in range(group, BLOCKS_S + BLOCKS_T, tl.num_programs(1)):
        if k < BLOCKS_S:
            _feature_grad(ps_ptr, as_ptr, gs_ptr, gs_sb, gs_sc, gs_sh, gs_sw, b, i,
                          k * BLOCK_C + tl.arange(0, BLOCK_C), CS, H, W, NW, M, KH, KW, inv_s, a_s, d, 4.0 * scale,
                          POOLING, PAPER, BLOCK_C, BLOCK_M, BLOCK_W)
        else:
            _feature_grad(pt_ptr, at_ptr, gt_ptr, gt_sb, gt_sc, gt_sh, gt_sw, b, i,
                          (k - BLOCKS_S) * BLOCK_C + tl.arange(0, BLOCK_C), CT, H, W, NW, M, KH, KW, inv_t, a_t, d,
                          -4.0 * scale, POOLING, PAPER, BLOCK_C, BLOCK_M, BLOCK_W)


_tickets: dict[torch.device, torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The loss reduction's ticket counter of a device: zeroed once, and reset by the kernel that
    used it. (Calls on one device that overlap on two streams would share it: not supported.)"""
    ticket = _tickets.get(device)
    if ticket is None:
        ticket = _tickets[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return ticket


def few_nodes(student, teacher, window_h, window_w, pooling, norm, loss, grad_student, grad_teacher) -> bool:
    """The whole loss for at most MAX_NODES nodes an image: writes `loss` (0-d, float32 or float64)
    and d loss / d features into grad_student, grad_teacher (the features' shapes and dtypes, any
    strides; None: not wanted). Codes as the node passes: pooling none/max/avg = 0/1/2, norm
    official/paper = 0/1. Returns True: served (the stock backend's declines)."""
    b, cs, h, w = student.shape
    ct = teacher.shape[1]
    nw = -(-w // window_w)
    m = -(-h // window_h) * nw
    if m > MAX_NODES:
        raise ValueError(f"the fused few-node pass takes at most {MAX_NODES} nodes an image, got {m}")
    device = student.device
    ps = torch.empty((b, cs, m), dtype=torch.float64, device=device)
    pt = torch.empty((b, ct, m), dtype=torch.float64, device=device)
    argmax_s = pooling == 1 and grad_student is not None
    argmax_t = pooling == 1 and grad_teacher is not None
    as_ = torch.empty((b, cs, m), dtype=torch.int32, device=device) if argmax_s else ps
    at = torch.empty((b, ct, m), dtype=torch.int32, device=device) if argmax_t else pt
    pool_blocks_s = triton.cdiv(cs, _POOL_BLOCK_C)
    block_m = max(16, triton.next_power_of_2(m))
    dot_block_c = max(16, min(128, 2048 // block_m))  # a (channels, nodes) float64 tile of 2048
    blocks_s = triton.cdiv(cs, _GRAD_BLOCK_C) if grad_student is not None else 0
    blocks_t = triton.cdiv(ct, _GRAD_BLOCK_C) if grad_teacher is not None else 0
    groups = max(1, min(blocks_s + blocks_t, triton.cdiv(_TARGET_PROGRAMS, m * b)))
    partial = torch.empty(b * m, dtype=torch.float64, device=device)
    gs = grad_student if grad_student is not None else student  # never written without a gradient
    gt = grad_teacher if grad_teacher is not None else teacher
    with on_device(student):
        _few_pool_kernel[(m, pool_blocks_s + triton.cdiv(ct, _POOL_BLOCK_C), b)](
            student, teacher, ps, pt, as_, at, cs, ct, h, w, nw, m, window_h, window_w,
            *student.stride(), *teacher.stride(), pool_blocks_s,
            POOLING=pooling, ARGMAX_S=argmax_s, ARGMAX_T=argmax_t, BLOCK_C=_POOL_BLOCK_C, BLOCK_W=_BLOCK_W,
            num_warps=4)
        _few_loss_grad_kernel[(m, groups, b)](
            ps, pt, as_, at, gs, gt, partial, _ticket(device), loss, cs, ct, h, w, nw, m, window_h, window_w, b,
            *gs.stride(), *gt.stride(), blocks_s, blocks_t,
            POOLING=pooling, PAPER=norm == 1, DOT_BLOCK_C=dot_block_c, BLOCK_C=_GRAD_BLOCK_C, BLOCK_M=block_m,
            BLOCK_W=_BLOCK_W,
            REDUCE_BLOCK=_REDUCE_BLOCK, num_warps=4)
    return True
