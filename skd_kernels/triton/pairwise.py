"""The two fused passes of pair-wise distillation in Triton: features -> normalised float64 nodes,
and the gradient back from nodes to features. The similarity core between them is float64 GEMMs
(see skd_kernels/ops/pairwise/core.py).

Small windows: one program owns BLOCK_N nodes of one image and loops over channel blocks, a
(BLOCK_C, BLOCK_N) tile per window offset, so for node size 1 each load is a coalesced run along a
row of the map. The node norms need every channel, hence the second sweep that scales what the first
one stored (L2 hits).
Large windows (the official 3x3 nodes of 32x32 pixels): that would leave a handful of programs
walking thousands of offsets, so one program pools one node's window for BLOCK_C channels, a
(BLOCK_C, BLOCK_W) tile per window row, and a second kernel normalises; the backward writes the
window rows the same way.
Same contract as csrc/cpu/pairwise.cpp: every feature element is read once, and every gradient
element written once (zero where a max window did not pick it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device
from .pairwise_tiled import keep_or_tiled  # noqa: F401 (a pass: the low-rank fallback decided on the device)

_BLOCK_C = 32
_BLOCK_N = 64
# Windows of at least LARGE_WINDOW positions take the window kernels.
LARGE_WINDOW = 8
_WINDOW_BLOCK_C = 16
_WINDOW_BLOCK_W = 32
_NO_INDEX = tl.constexpr(2**31 - 1)  # a global a kernel reads must be a constexpr


@triton.jit
def _window(node, NW, KH, KW):
    """Top-left corner of each node's window."""
    return (node // NW) * KH, (node % NW) * KW


@triton.jit
def _node_tile(H, W, NW, M, KH, KW, BLOCK_N: tl.constexpr):
    """This program's BLOCK_N nodes: indices, mask, window corners and how many positions each
    (partial border windows hold fewer)."""
    node = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h0, w0 = _window(node, NW, KH, KW)
    count = (tl.minimum(h0 + KH, H) - h0) * (tl.minimum(w0 + KW, W) - w0)
    return node, node < M, h0, w0, count


@triton.jit
def _nodes_forward_kernel(
    x_ptr, u_ptr, inv_ptr, arg_ptr,
    C, H, W, NW, M, KH, KW,
    x_sb, x_sc, x_sh, x_sw,
    POOLING: tl.constexpr, PAPER: tl.constexpr, ARGMAX: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(1)
    node, n_mask, h0, w0, count = _node_tile(H, W, NW, M, KH, KW, BLOCK_N)
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        mask = (chan < C)[:, None] & n_mask[None, :]
        if POOLING == 1:
            acc = tl.full((BLOCK_C, BLOCK_N), float("-inf"), tl.float64)
        else:
            acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float64)
        best = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.int32) + (h0 * W + w0)[None, :]
        for dh in range(0, KH):
            for dw in range(0, KW):
                h = h0 + dh
                w = w0 + dw
                inside = mask & ((h < H) & (w < W))[None, :]
                off = b * x_sb + chan[:, None] * x_sc + (h * x_sh + w * x_sw)[None, :]
                v = tl.load(x_ptr + off, mask=inside, other=0.0).to(tl.float64)
                if POOLING == 1:  # the first maximum, and NaN wins: as max_pool2d
                    take = inside & ((v > acc) | (v != v)) & (acc == acc)
                    acc = tl.where(take, v, acc)
                    best = tl.where(take, (h * W + w)[None, :], best)
                else:
                    acc += v
        if POOLING == 2:
            acc = acc / count[None, :].to(tl.float64)
        acc = tl.where(mask, acc, 0.0)
        u_off = (b * C + chan[:, None]) * M + node[None, :]
        tl.store(u_ptr + u_off, acc, mask=mask)
        if ARGMAX:
            tl.store(arg_ptr + u_off, best, mask=mask)
        sumsq += tl.sum(acc * acc, axis=0)
    _scale_nodes(u_ptr, inv_ptr, b, node, n_mask, sumsq, C, M, PAPER, BLOCK_C)


@triton.jit
def _scale_nodes(u_ptr, inv_ptr, b, node, n_mask, sumsq, C, M, PAPER: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stores 1 / the normaliser of each node, from its sum of squares, and scales its stored nodes."""
    norm = tl.sqrt(sumsq)
    # float64 constants: a bare literal is float32, and 1e-12 or 1e-8 rounded to float32 would shift
    # the normaliser of (near-)zero nodes by 1e-8 relative.
    if PAPER:
        inv = 1.0 / tl.maximum(norm, tl.full([], 1e-12, tl.float64))
    else:
        inv = 1.0 / (norm + tl.full([], 1e-8, tl.float64))
    tl.store(inv_ptr + b * M + node, inv, mask=n_mask)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        mask = (chan < C)[:, None] & n_mask[None, :]
        u_off = (b * C + chan[:, None]) * M + node[None, :]
        tl.store(u_ptr + u_off, tl.load(u_ptr + u_off, mask=mask) * inv[None, :], mask=mask)


@triton.jit
def _window_pool_kernel(
    x_ptr, u_ptr, arg_ptr,
    C, H, W, NW, M, KH, KW,
    x_sb, x_sc, x_sh, x_sw,
    POOLING: tl.constexpr, ARGMAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """The pooled (not yet normalised) nodes of one window for BLOCK_C channels."""
    node = tl.program_id(0)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    acc, best = pool_window(x_ptr, b, chan, node, C, H, W, NW, KH, KW, x_sb, x_sc, x_sh, x_sw, POOLING, BLOCK_C,
                            BLOCK_W)
    u_off = (b * C + chan) * M + node
    tl.store(u_ptr + u_off, acc, mask=chan < C)
    if ARGMAX:
        tl.store(arg_ptr + u_off, best, mask=chan < C)


@triton.jit
def pool_window(x_ptr, b, chan, node, C, H, W, NW, KH, KW, x_sb, x_sc, x_sh, x_sw, POOLING: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """Pools one node's window for channels `chan` (BLOCK_C,): float64 max or mean (none: the one
    position), and for max the flat h * W + w position of the pick."""
    c_mask = chan < C
    h0, w0 = _window(node, NW, KH, KW)
    h1 = tl.minimum(h0 + KH, H)
    w1 = tl.minimum(w0 + KW, W)
    if POOLING == 1:
        acc = tl.full((BLOCK_C,), float("-inf"), tl.float64)
    else:
        acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    best = tl.zeros((BLOCK_C,), dtype=tl.int32) + h0 * W + w0
    for h in range(h0, h1):
        for w_start in range(w0, w1, BLOCK_W):
            w = w_start + tl.arange(0, BLOCK_W)
            inside = c_mask[:, None] & (w < w1)[None, :]
            off = b * x_sb + chan[:, None] * x_sc + h * x_sh + w[None, :] * x_sw
            v = tl.load(x_ptr + off, mask=inside, other=0.0).to(tl.float64)
            if POOLING == 1:
                # max_pool2d's pick: the first NaN, else the first maximum. Tiles come in window
                # order, so a tile's pick replaces the running one only on a NaN or a strictly
                # larger value.
                position = (h * W + w)[None, :]
                is_nan = inside & (v != v)
                tile_nans = tl.sum(is_nan.to(tl.int32), axis=1)
                first_nan = tl.min(tl.where(is_nan, position, _NO_INDEX), axis=1)
                clean = tl.where(inside & (v == v), v, float("-inf"))
                tile_max = tl.max(clean, axis=1)
                first_max = tl.min(tl.where(inside & (clean == tile_max[:, None]), position, _NO_INDEX), axis=1)
                running_ok = acc == acc
                take_nan = running_ok & (tile_nans > 0)
                take_max = running_ok & (tile_nans == 0) & (tile_max > acc)
                acc = tl.where(take_nan, float("nan"), tl.where(take_max, tile_max, acc))
                best = tl.where(take_nan, first_nan, tl.where(take_max, first_max, best))
            else:
                acc += tl.sum(tl.where(inside, v, 0.0), axis=1)
    if POOLING == 2:
        acc = acc / ((h1 - h0) * (w1 - w0)).to(tl.float64)
    return tl.where(c_mask, acc, 0.0), best


@triton.jit
def _window_normalise_kernel(u_ptr, inv_ptr, C, M, PAPER: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    b = tl.program_id(1)
    node = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = node < M
    sumsq = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        mask = (chan < C)[:, None] & n_mask[None, :]
        u = tl.load(u_ptr + (b * C + chan[:, None]) * M + node[None, :], mask=mask, other=0.0)
        sumsq += tl.sum(u * u, axis=0)
    _scale_nodes(u_ptr, inv_ptr, b, node, n_mask, sumsq, C, M, PAPER, BLOCK_C)


@triton.jit
def _grad_u(du_ptr, bias_ptr, oc_ptr, oq_ptr, grad_scale, b, chan, node, C, M, mask, MEAN_TERMS: tl.constexpr):
    """d loss / d u (see csrc/common/pairwise_problem.h) at channels `chan` and nodes `node`, shaped to
    broadcast against each other: (BLOCK_C, 1) and (1, BLOCK_N) for a tile, (BLOCK_C,) and a scalar
    for one node's channels."""
    g = tl.load(du_ptr + (b * C + chan) * M + node, mask=mask, other=0.0).to(tl.float64)
    if MEAN_TERMS:
        bias = tl.load(bias_ptr + b * C + chan, mask=chan < C, other=0.0)
        outer_c = tl.load(oc_ptr + b * C + chan, mask=chan < C, other=0.0)
        outer_q = tl.load(oq_ptr + b * M + node, mask=node < M, other=0.0)
        g += bias + outer_c * outer_q
    return g * grad_scale


# The node-pass kernels share one argument layout (pointers, sizes, strides, the same constexprs)
# on purpose: one launcher (`_launch`) serves them all, so their headers read alike.
@triton.jit
def _nodes_backward_kernel(
    u_ptr, inv_ptr, arg_ptr, du_ptr, bias_ptr, oc_ptr, oq_ptr, scale_ptr, g_ptr,
    C, H, W, NW, M, KH, KW,
    g_sb, g_sc, g_sh, g_sw,
    POOLING: tl.constexpr, PAPER: tl.constexpr, MEAN_TERMS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(1)
    node, n_mask, h0, w0, count = _node_tile(H, W, NW, M, KH, KW, BLOCK_N)
    inv = tl.load(inv_ptr + b * M + node, mask=n_mask, other=0.0)
    grad_scale = tl.load(scale_ptr)  # float64 in memory: a scalar argument would be rounded to float32
    # Paper form: the gradient through the norm projects out the radial part, unless the norm was
    # clamped at 1e-12 (then it is a constant), as F.normalize.
    radial = tl.zeros((BLOCK_N,), dtype=tl.float64)
    if PAPER:
        for c0 in range(0, C, BLOCK_C):
            chan = c0 + tl.arange(0, BLOCK_C)
            mask = (chan < C)[:, None] & n_mask[None, :]
            u_off = (b * C + chan[:, None]) * M + node[None, :]
            u = tl.load(u_ptr + u_off, mask=mask, other=0.0)
            du = _grad_u(du_ptr, bias_ptr, oc_ptr, oq_ptr, grad_scale, b, chan[:, None], node[None, :], C, M, mask,
                         MEAN_TERMS)
            radial += tl.sum(u * du, axis=0)
        radial = tl.where(inv < tl.full([], 1e12, tl.float64), radial, 0.0)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        mask = (chan < C)[:, None] & n_mask[None, :]
        u_off = (b * C + chan[:, None]) * M + node[None, :]
        u = tl.load(u_ptr + u_off, mask=mask, other=0.0)
        du = _grad_u(du_ptr, bias_ptr, oc_ptr, oq_ptr, grad_scale, b, chan[:, None], node[None, :], C, M, mask,
                         MEAN_TERMS)
        dp = (du - u * radial[None, :]) * inv[None, :]
        if POOLING == 2:
            dp = dp / count[None, :].to(tl.float64)
        if POOLING == 1:
            best = tl.load(arg_ptr + u_off, mask=mask, other=-1)
        for dh in range(0, KH):
            for dw in range(0, KW):
                h = h0 + dh
                w = w0 + dw
                inside = mask & ((h < H) & (w < W))[None, :]
                g = dp
                if POOLING == 1:
                    g = tl.where(best == (h * W + w)[None, :], dp, 0.0)
                off = b * g_sb + chan[:, None] * g_sc + (h * g_sh + w * g_sw)[None, :]
                if g_ptr.dtype.element_ty != tl.float64:  # the interpreter mis-converts f64 -> bf16
                    g = g.to(tl.float32)
                tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _window_backward_kernel(
    u_ptr, inv_ptr, arg_ptr, du_ptr, bias_ptr, oc_ptr, oq_ptr, scale_ptr, g_ptr,
    C, H, W, NW, M, KH, KW,
    g_sb, g_sc, g_sh, g_sw,
    POOLING: tl.constexpr, PAPER: tl.constexpr, MEAN_TERMS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """d loss / d features over one node's window, for BLOCK_C channels. (Its arguments repeat
    `_nodes_backward_kernel`'s on purpose: one launcher passes both alike.)"""
    node = tl.program_id(0)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    c_mask = chan < C
    h0, w0 = _window(node, NW, KH, KW)
    h1 = tl.minimum(h0 + KH, H)
    w1 = tl.minimum(w0 + KW, W)
    inv = tl.load(inv_ptr + b * M + node)
    grad_scale = tl.load(scale_ptr)
    radial = tl.zeros((), dtype=tl.float64)
    if PAPER:  # needs every channel of the node: each program sums it (few nodes when windows are large)
        part = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for c0 in range(0, C, BLOCK_C):
            every = c0 + tl.arange(0, BLOCK_C)
            u = tl.load(u_ptr + (b * C + every) * M + node, mask=every < C, other=0.0)
            part += u * _grad_u(du_ptr, bias_ptr, oc_ptr, oq_ptr, grad_scale, b, every, node, C, M, every < C,
                                MEAN_TERMS)
        radial = tl.where(inv < tl.full([], 1e12, tl.float64), tl.sum(part, axis=0), radial)
    u_off = (b * C + chan) * M + node
    u = tl.load(u_ptr + u_off, mask=c_mask, other=0.0)
    du = _grad_u(du_ptr, bias_ptr, oc_ptr, oq_ptr, grad_scale, b, chan, node, C, M, c_mask, MEAN_TERMS)
    dp = (du - u * radial) * inv
    if POOLING == 2:
        dp = dp / ((h1 - h0) * (w1 - w0)).to(tl.float64)
    if g_ptr.dtype.element_ty != tl.float64:  # the interpreter mis-converts f64 -> bf16
        dp = dp.to(tl.float32)
    best = tl.load(arg_ptr + u_off, mask=c_mask, other=-1) if POOLING == 1 else best_unused(BLOCK_C)
    scatter_window(g_ptr, dp, best, b, chan, c_mask, h0, w0, h1, w1, W, g_sb, g_sc, g_sh, g_sw, POOLING, BLOCK_W)


@triton.jit
def best_unused(BLOCK_C: tl.constexpr):
    return tl.zeros((BLOCK_C,), dtype=tl.int32)


@triton.jit
def scatter_window(g_ptr, dp, best, b, chan, c_mask, h0, w0, h1, w1, W, g_sb, g_sc, g_sh, g_sw,
                   POOLING: tl.constexpr, BLOCK_W: tl.constexpr):
    """Writes a node's pooled gradient dp (BLOCK_C,) over its window: all of it to the maximum at
    `best` (max; zeros elsewhere), or evenly (avg: dp already divided by the window's size)."""
    for h in range(h0, h1):
        for w_start in range(w0, w1, BLOCK_W):
            w = w_start + tl.arange(0, BLOCK_W)
            inside = c_mask[:, None] & (w < w1)[None, :]
            if POOLING == 1:
                g = tl.where(best[:, None] == (h * W + w)[None, :], dp[:, None], 0.0)
            else:
                g = dp[:, None] + tl.zeros((1, BLOCK_W), dtype=dp.dtype)
            off = b * g_sb + chan[:, None] * g_sc + h * g_sh + w[None, :] * g_sw
            tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=inside)


def _geometry(features, window_h, window_w):
    b, c, h, w = features.shape
    nw = -(-w // window_w)
    return b, c, h, w, nw, -(-h // window_h) * nw


def _large_windows(window_h, window_w, pooling) -> bool:
    return pooling != 0 and window_h * window_w >= LARGE_WINDOW


def _launch(kernel, features, window_h, window_w, pooling, norm, tensors, strides, **constants):
    b, c, h, w, nw, m = _geometry(features, window_h, window_w)
    with on_device(features):
        kernel[(triton.cdiv(m, _BLOCK_N), b)](
            *tensors, c, h, w, nw, m, window_h, window_w, *strides, POOLING=pooling, PAPER=norm == 1,
            BLOCK_C=_BLOCK_C, BLOCK_N=_BLOCK_N, num_warps=4, **constants)


def _launch_window(kernel, features, window_h, window_w, pooling, tensors, strides, **constants):
    b, c, h, w, nw, m = _geometry(features, window_h, window_w)
    with on_device(features):
        kernel[(m, triton.cdiv(c, _WINDOW_BLOCK_C), b)](
            *tensors, c, h, w, nw, m, window_h, window_w, *strides, POOLING=pooling,
            BLOCK_C=_WINDOW_BLOCK_C, BLOCK_W=_WINDOW_BLOCK_W, num_warps=4, **constants)


def nodes_forward(features, window_h, window_w, pooling, norm, nodes, inv_norm, argmax) -> None:
    """Same contract as the C++/CUDA `pairwise_nodes_forward` and `pytorch/pairwise.py` (codes: pooling none/max/avg = 0/1/2,
    norm official/paper = 0/1)."""
    arg = argmax if argmax is not None else inv_norm  # never dereferenced without ARGMAX
    if not _large_windows(window_h, window_w, pooling):
        _launch(_nodes_forward_kernel, features, window_h, window_w, pooling, norm,
                (features, nodes, inv_norm, arg), features.stride(), ARGMAX=argmax is not None)
        return
    _launch_window(_window_pool_kernel, features, window_h, window_w, pooling, (features, nodes, arg),
                   features.stride(), ARGMAX=argmax is not None)
    b, c, _, _, _, m = _geometry(features, window_h, window_w)
    with on_device(features):
        _window_normalise_kernel[(triton.cdiv(m, _BLOCK_N), b)](
            nodes, inv_norm, c, m, PAPER=norm == 1, BLOCK_C=_BLOCK_C, BLOCK_N=_BLOCK_N, num_warps=4)


def nodes_backward(features, window_h, window_w, pooling, norm, nodes, inv_norm, argmax, grad_residual,
                            grad_bias, grad_outer_c, grad_outer_q, grad_scale, grad_features) -> None:
    """Same contract as the C++/CUDA `pairwise_nodes_backward`."""
    arg = argmax if argmax is not None else inv_norm
    mean_terms = grad_bias is not None
    if mean_terms != (grad_outer_c is not None) or mean_terms != (grad_outer_q is not None):
        raise ValueError("the low-rank mean terms come together: grad_bias, grad_outer_c, grad_outer_q")
    scale = torch.full((1,), grad_scale, dtype=torch.float64, device=features.device)
    vectors = (grad_bias, grad_outer_c, grad_outer_q) if mean_terms else (inv_norm,) * 3  # unread stand-ins
    tensors = (nodes, inv_norm, arg, grad_residual, *vectors, scale, grad_features)
    if _large_windows(window_h, window_w, pooling):
        _launch_window(_window_backward_kernel, features, window_h, window_w, pooling, tensors,
                       grad_features.stride(), PAPER=norm == 1, MEAN_TERMS=mean_terms)
    else:
        _launch(_nodes_backward_kernel, features, window_h, window_w, pooling, norm, tensors,
                grad_features.stride(), MEAN_TERMS=mean_terms)


def few_nodes(*args) -> bool:
    """The whole loss at few nodes in two launches (`pairwise_few.few_nodes`, which builds on the
    kernels above: imported at the call, so either module may be imported first)."""
    from .pairwise_few import few_nodes as fused

    return fused(*args)
