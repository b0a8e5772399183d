"""Fused SAGAN attention in Triton: forward, backward and double backward, on tensor cores.

The math and its notation (S, P, dP, D, A, B, G, H): docs/ops/attention.md. Every kernel walks one
(BLOCK_M queries x BLOCK_N keys) tile of the map at a time and recomputes P = exp(S - lse) from the
saved float64 log-sum-exp, so nothing N x N exists. Three launch shapes:

- *query-outer* programs own BLOCK_M rows and walk the keys (forward, dq, the row statistics, grad q);
- *key-outer* programs own BLOCK_N keys and walk the queries (dk, grad k): column sums without atomics,
  so every result is deterministic;
- *slice* programs own a slice of the Dv columns of an (N, Dv) result (out, dv, grad dO, grad v). Those
  results need only P (or G = P (A - Abar)), i.e. products over Dk, so slicing Dv costs little and lets
  one image fill the GPU; wide v (Dv = 512) never has to sit in registers whole. Sums over Dv (dP, B)
  walk Dv in chunks of DV_CHUNK instead.

The forward is one launch, the backward three (the row statistic D_i, then a query-outer and a
key-outer launch), the double backward three (row statistics; grad q with the grad dO slices; grad k with the
grad v slices).

Precision. float64 runs float64 throughout. For float32, S = q . k, which the softmax exponentiates
(SAGAN has no 1/sqrt(d), so |S| reaches 1e4), is an IEEE product; every other product uses
FP32_DOT_PRECISION (3xTF32 on tensor cores, about 2^-22 relative per product); so are the products
over Dk in the double backward (A = gq . k + q . gk), which it centres. The softmax exponentiates
S - m, *after* the subtraction (tl.exp is base 2 on the GPU: one multiply by log2(e), then ex2):
folding log2(e) into q as FlashAttention does would round S at |S| * 2^-24, which at |S| = 1e4 is
an error of 6e-4 in every probability.
For the same reason lse is saved in float64 and split into two float32 words when P is recomputed:
(S - hi) - lo is exact near the row maximum, where a float32 lse would be off by |lse| * 2^-24.

Inputs are contiguous (B, N, D) in the accumulation dtype (float32 or float64), lse (B, N) float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device

# Products other than S = q . k, for float32 inputs: "tf32x3" (tensor cores, ~fp32 accuracy) or
# "ieee" (CUDA cores). S = q . k is always "ieee" (see the module docstring).
FP32_DOT_PRECISION = "tf32x3"


# --- tiles ----------------------------------------------------------------------------------------

@triton.jit
def _mask(rows, cols, N, D: tl.constexpr, WIDTH: tl.constexpr):
    # Column slices start at multiples of WIDTH: when WIDTH divides D no column is out of range, and a
    # mask that is constant along the row lets the loads be vectorised.
    if D % WIDTH == 0:
        return (rows[:, None] < N) & (cols[None, :] >= 0)
    return (rows[:, None] < N) & (cols[None, :] < D)


@triton.jit
def _load(ptr, b, rows, N, col0, D: tl.constexpr, WIDTH: tl.constexpr):
    """Rows `rows`, columns [col0, col0 + WIDTH) of image b of a contiguous (B, N, D) tensor; 0 outside.
    col0 is a multiple of WIDTH."""
    cols = col0 + tl.arange(0, WIDTH)
    base = ptr + b.to(tl.int64) * N * D
    return tl.load(base + rows[:, None] * D + cols[None, :], mask=_mask(rows, cols, N, D, WIDTH), other=0.0)


@triton.jit
def _store(ptr, tile, b, rows, N, col0, D: tl.constexpr, WIDTH: tl.constexpr):
    cols = col0 + tl.arange(0, WIDTH)
    base = ptr + b.to(tl.int64) * N * D
    tl.store(base + rows[:, None] * D + cols[None, :], tile.to(ptr.dtype.element_ty),
             mask=_mask(rows, cols, N, D, WIDTH))


@triton.jit
def _load_row(ptr, b, rows, N):
    return tl.load(ptr + b.to(tl.int64) * N + rows, mask=rows < N, other=0.0)


@triton.jit
def _dot_over_dk(x_ptr, y_ptr, b, x_rows, y_rows, N, DK: tl.constexpr, BLOCK_DK: tl.constexpr, acc):
    """acc + X[x_rows] Y[y_rows]^T for (B, N, Dk) tensors: the products over Dk (S = q . k, and
    A = gq . k + q . gk). IEEE, because the softmax exponentiates S and the double backward centres
    A; cheap next to the products over Dv. An IEEE float32 product runs on FMAs, whose operands sit
    in registers whole rows at a time, so the operands come 16 columns at a time (reloads hit the
    cache) into one accumulation: a (64, Dk) operand tile held across the loop spilled."""
    for c in tl.static_range(0, BLOCK_DK, 16):
        acc = tl.dot(_load(x_ptr, b, x_rows, N, c, DK, 16), tl.trans(_load(y_ptr, b, y_rows, N, c, DK, 16)), acc,
                     input_precision="ieee", out_dtype=acc.dtype)
    return acc


@triton.jit
def _energies(x_ptr, y_ptr, b, x_rows, y_rows, N, DK: tl.constexpr, BLOCK_DK: tl.constexpr):
    """The (x_rows, y_rows) tile of X Y^T over Dk: S with (q, k), S^T with (k, q)."""
    zeros = tl.zeros([x_rows.shape[0], y_rows.shape[0]], x_ptr.dtype.element_ty)
    return _dot_over_dk(x_ptr, y_ptr, b, x_rows, y_rows, N, DK, BLOCK_DK, zeros)


@triton.jit
def _mm(x, y, PRECISION: tl.constexpr):
    return tl.dot(x, y, input_precision=PRECISION, out_dtype=x.dtype)


@triton.jit
def _probabilities(s, lse, valid, SPLIT_LSE: tl.constexpr):
    """P = exp(S - lse) on a tile of S or of S^T, 0 where not `valid`; lse float64, shaped to
    broadcast against s (lse[:, None] for S, lse[None, :] for S^T)."""
    if SPLIT_LSE:  # float32: lse = hi + lo, and S - hi is exact near the row max
        hi = lse.to(tl.float32)
        lo = (lse - hi.to(tl.float64)).to(tl.float32)
        x = (s - hi) - lo
    else:
        x = s - lse
    return tl.where(valid, tl.exp(x), 0.0)


@triton.jit
def _sum_over_dv(x_ptr, y_ptr, b, x_rows, y_rows, N, DV: tl.constexpr, DV_CHUNK: tl.constexpr,
                 PRECISION: tl.constexpr, acc):
    """acc + X Y^T over Dv for rows x_rows of X and y_rows of Y ((B, N, Dv) tensors), in chunks."""
    for c in tl.static_range(0, DV, DV_CHUNK):
        x = _load(x_ptr, b, x_rows, N, c, DV, DV_CHUNK)
        y = _load(y_ptr, b, y_rows, N, c, DV, DV_CHUNK)
        acc += _mm(x, tl.trans(y), PRECISION)
    return acc


# --- forward --------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, N, DK: tl.constexpr, DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                    SLICE_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (query blocks, Dv slices, B): out[rows, slice] and, from slice 0, lse[rows]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * SLICE_DV
    b = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    m = tl.full([BLOCK_M], float("-inf"), dtype)
    z = tl.zeros([BLOCK_M], dtype)
    acc = tl.zeros([BLOCK_M, SLICE_DV], dtype)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s = _energies(q_ptr, k_ptr, b, rows, keys, N, DK, BLOCK_DK)
        s = tl.where((keys < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has a key (the first has key 0)
        alpha = tl.exp(m - m_new)  # 0 on the first tile, where m = -inf
        p = tl.exp(s - m_new[:, None])
        z = z * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, _load(v_ptr, b, keys, N, col0, DV, SLICE_DV), PRECISION)
        m = m_new
    _store(out_ptr, acc / z[:, None], b, rows, N, col0, DV, SLICE_DV)
    if tl.program_id(1) == 0:
        lse = m.to(tl.float64) + tl.log(z.to(tl.float64))
        tl.store(lse_ptr + b.to(tl.int64) * N + rows, lse, mask=rows < N)


# --- backward -------------------------------------------------------------------------------------

@triton.jit
def _backward_rows_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, d_ptr, N, DK: tl.constexpr, DV: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                          DV_CHUNK: tl.constexpr, SPLIT_LSE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (query blocks, B): D_i = sum_j P_ij dP_ij / sum_j P_ij, from the same P and dP tiles the
    dq and dk kernels recompute. FlashAttention's dO_i . out_i is cheaper but rounds differently from
    the dP_ij it is subtracted from: at a saturated row dP - D is pure rounding noise of size
    eps |dO| |v|, ten times the naive block's error at |S| ~ 1e4. Dividing by the computed sum_j P_ij
    makes each row of dS sum to 0 up to rounding (the key-bias gradient)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    lse = _load_row(lse_ptr, b, rows, N)
    weight = tl.zeros([BLOCK_M], dtype)
    pdp = tl.zeros([BLOCK_M], dtype)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s = _energies(q_ptr, k_ptr, b, rows, keys, N, DK, BLOCK_DK)
        p = _probabilities(s, lse[:, None], (keys < N)[None, :], SPLIT_LSE)
        dp = _sum_over_dv(dout_ptr, v_ptr, b, rows, keys, N, DV, DV_CHUNK, PRECISION,
                          tl.zeros([BLOCK_M, BLOCK_N], dtype))
        weight += tl.sum(p, 1)
        pdp += tl.sum(p * dp, 1)
    tl.store(d_ptr + b.to(tl.int64) * N + rows, pdp / tl.where(weight > 0, weight, 1.0), mask=rows < N)


@triton.jit
def _backward_queries_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, d_ptr, dq_ptr, N,
                             DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_DK: tl.constexpr, DV_CHUNK: tl.constexpr, SPLIT_LSE: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Grid (query blocks, B): dq_i = sum_j P_ij (dP_ij - D_i) k_j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    lse = _load_row(lse_ptr, b, rows, N)
    d = _load_row(d_ptr, b, rows, N)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load(k_ptr, b, keys, N, 0, DK, BLOCK_DK)
        s = _energies(q_ptr, k_ptr, b, rows, keys, N, DK, BLOCK_DK)
        p = _probabilities(s, lse[:, None], (keys < N)[None, :], SPLIT_LSE)
        dp = _sum_over_dv(dout_ptr, v_ptr, b, rows, keys, N, DV, DV_CHUNK, PRECISION,
                          tl.zeros([BLOCK_M, BLOCK_N], dtype))
        dq += _mm(p * (dp - d[:, None]), k, PRECISION)
    _store(dq_ptr, dq, b, rows, N, 0, DK, BLOCK_DK)


@triton.jit
def _backward_keys_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, d_ptr, dk_ptr, dv_ptr, N,
                          DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_DK: tl.constexpr, DV_CHUNK: tl.constexpr, SLICE_DV: tl.constexpr,
                          SPLIT_LSE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (key blocks, 1 + Dv slices, B). Program 0 of axis 1: dk_j = sum_i P_ij (dP_ij - D_i) q_i;
    program 1 + s: dv_j over slice s = sum_i P_ij dO_i. Works on the transposed tile (keys, queries)."""
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    part = tl.program_id(1)
    b = tl.program_id(2)
    dtype = k_ptr.dtype.element_ty
    if part == 0:
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = _load(q_ptr, b, rows, N, 0, DK, BLOCK_DK)
            st = _energies(k_ptr, q_ptr, b, keys, rows, N, DK, BLOCK_DK)
            pt = _probabilities(st, _load_row(lse_ptr, b, rows, N)[None, :],
                                (rows < N)[None, :], SPLIT_LSE)
            dpt = _sum_over_dv(v_ptr, dout_ptr, b, keys, rows, N, DV, DV_CHUNK, PRECISION,
                               tl.zeros([BLOCK_N, BLOCK_M], dtype))
            dk += _mm(pt * (dpt - _load_row(d_ptr, b, rows, N)[None, :]), q, PRECISION)
        _store(dk_ptr, dk, b, keys, N, 0, DK, BLOCK_DK)
    else:
        col0 = (part - 1) * SLICE_DV
        dv = tl.zeros([BLOCK_N, SLICE_DV], dtype)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            st = _energies(k_ptr, q_ptr, b, keys, rows, N, DK, BLOCK_DK)
            pt = _probabilities(st, _load_row(lse_ptr, b, rows, N)[None, :],
                                (rows < N)[None, :], SPLIT_LSE)
            dv += _mm(pt, _load(dout_ptr, b, rows, N, col0, DV, SLICE_DV), PRECISION)
        _store(dv_ptr, dv, b, keys, N, col0, DV, SLICE_DV)


# --- double backward ------------------------------------------------------------------------------

@triton.jit
def _cotangent_energy(x_ptr, y_ptr, gx_ptr, gy_ptr, b, x_rows, y_rows, N, DK: tl.constexpr, BLOCK_DK: tl.constexpr,
                      HAS_GX: tl.constexpr, HAS_GY: tl.constexpr):
    """A tile = gx y^T + x gy^T for rows x_rows of x and y_rows of y; 0 without cotangents. With
    (x, y) = (q, k) it is A; with (k, q) and (gk, gq) it is A^T (the same sum of the same two products)."""
    a = tl.zeros([x_rows.shape[0], y_rows.shape[0]], x_ptr.dtype.element_ty)
    if HAS_GX:
        a += _energies(gx_ptr, y_ptr, b, x_rows, y_rows, N, DK, BLOCK_DK)
    if HAS_GY:
        a += _energies(x_ptr, gy_ptr, b, x_rows, y_rows, N, DK, BLOCK_DK)
    return a


@triton.jit
def _double_backward_rows_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, gq_ptr, gk_ptr, gv_ptr, stats_ptr, B, N,
                                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DV_CHUNK: tl.constexpr,
                                 HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr, HAS_A: tl.constexpr,
                                 HAS_GV: tl.constexpr, SPLIT_LSE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (query blocks, B): the row statistics, centred so that nothing cancels (docs/ops/attention.md):
    stats[0] = D_i (P-weighted mean of dP), stats[1] = Abar_i (of A), stats[2] = E_i, the weighted
    covariance of dP and A, and stats[3] = Bbar_i (of B). Tiles merge by Chan's update, so E never
    comes from C_i - D_i Abar_i."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    lse = _load_row(lse_ptr, b, rows, N)
    weight = tl.zeros([BLOCK_M], dtype)
    d = tl.zeros([BLOCK_M], dtype)
    abar = tl.zeros([BLOCK_M], dtype)
    cov = tl.zeros([BLOCK_M], dtype)
    bbar = tl.zeros([BLOCK_M], dtype)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s = _energies(q_ptr, k_ptr, b, rows, keys, N, DK, BLOCK_DK)
        p = _probabilities(s, lse[:, None], (keys < N)[None, :], SPLIT_LSE)
        w = tl.sum(p, 1)
        w_safe = tl.where(w > 0, w, 1.0)
        if HAS_A:
            dp = _sum_over_dv(dout_ptr, v_ptr, b, rows, keys, N, DV, DV_CHUNK, PRECISION,
                              tl.zeros([BLOCK_M, BLOCK_N], dtype))
            a = _cotangent_energy(q_ptr, k_ptr, gq_ptr, gk_ptr, b, rows, keys, N, DK, BLOCK_DK, HAS_GQ, HAS_GK)
            d_tile = tl.sum(p * dp, 1) / w_safe
            a_tile = tl.sum(p * a, 1) / w_safe
            cov_tile = tl.sum(p * (dp - d_tile[:, None]) * (a - a_tile[:, None]), 1)
            total = weight + w
            share = tl.where(total > 0, w / tl.where(total > 0, total, 1.0), 0.0)  # the tile's share
            d_step = d_tile - d
            a_step = a_tile - abar
            d += d_step * share
            abar += a_step * share
            cov += cov_tile + d_step * a_step * weight * share
        if HAS_GV:
            bt = _sum_over_dv(dout_ptr, gv_ptr, b, rows, keys, N, DV, DV_CHUNK, PRECISION,
                              tl.zeros([BLOCK_M, BLOCK_N], dtype))
            bbar += tl.sum(p * bt, 1)
        weight += w
    weight = tl.where(weight > 0, weight, 1.0)
    row = b.to(tl.int64) * N + rows
    valid = rows < N
    tl.store(stats_ptr + row, d, mask=valid)
    tl.store(stats_ptr + B * N + row, abar, mask=valid)
    tl.store(stats_ptr + 2 * B * N + row, cov / weight, mask=valid)
    tl.store(stats_ptr + 3 * B * N + row, bbar / weight, mask=valid)


@triton.jit
def _second_order_scores(p, dp, a, bt, d, abar, cov, bbar, HAS_A: tl.constexpr, HAS_GV: tl.constexpr):
    """dS2 = P (H - Hbar) = P ((dP - D)(A - Abar) - E + (B - Bbar)), on a tile or its transpose (the
    row statistics shaped to broadcast); the centred form of docs/ops/attention.md."""
    h = tl.zeros(p.shape, p.dtype)
    if HAS_A:
        h += (dp - d) * (a - abar) - cov
    if HAS_GV:
        h += bt - bbar
    return p * h


@triton.jit
def _double_backward_queries_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, gq_ptr, gk_ptr, gv_ptr, stats_ptr,
                                    grad_q_ptr, grad_dout_ptr, B, N, DK: tl.constexpr, DV: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                                    DV_CHUNK: tl.constexpr, SLICE_DV: tl.constexpr, HAS_GQ: tl.constexpr,
                                    HAS_GK: tl.constexpr, HAS_A: tl.constexpr, HAS_GV: tl.constexpr, SPLIT_LSE: tl.constexpr,
                                    PRECISION: tl.constexpr):
    """Grid (query blocks, 1 + Dv slices, B). Program 0 of axis 1: grad q_i = sum_j dS_ij gk_j +
    dS2_ij k_j; program 1 + s: grad dO_i over slice s = sum_j G_ij v_j + P_ij gv_j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    part = tl.program_id(1)
    b = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty
    lse = _load_row(lse_ptr, b, rows, N)[:, None]
    row = b.to(tl.int64) * N + rows
    valid = rows < N
    d = tl.load(stats_ptr + row, mask=valid, other=0.0)[:, None]
    abar = tl.load(stats_ptr + B * N + row, mask=valid, other=0.0)[:, None]
    cov = tl.load(stats_ptr + 2 * B * N + row, mask=valid, other=0.0)[:, None]
    bbar = tl.load(stats_ptr + 3 * B * N + row, mask=valid, other=0.0)[:, None]
    if part == 0:
        grad_q = tl.zeros([BLOCK_M, BLOCK_DK], dtype)
        for start in range(0, N, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k = _load(k_ptr, b, keys, N, 0, DK, BLOCK_DK)
            s = _energies(q_ptr, k_ptr, b, rows, keys, N, DK, BLOCK_DK)
            p = _probabilities(s, lse, (keys < N)[None, :], SPLIT_LSE)
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype)
            a = tl.zeros([BLOCK_M, BLOCK_N], dtype)
            bt = tl.zeros([BLOCK_M, BLOCK_N], dtype)
            if HAS_A:
                dp = _sum_over_dv(dout_ptr, v_ptr, b, rows, keys, N, DV, DV_CHUNK, PRECISION, dp)
                a = _cotangent_energy(q_ptr, k_ptr, gq_ptr, gk_ptr, b, rows, keys, N, DK, BLOCK_DK, HAS_GQ, HAS_GK)
            if HAS_GV:
                bt = _sum_over_dv(dout_ptr, gv_ptr, b, rows, keys, N, DV, DV_CHUNK, PRECISION, bt)
            ds2 = _second_order_scores(p, dp, a, bt, d, abar, cov, bbar, HAS_A, HAS_GV)
            grad_q += _mm(ds2, k, PRECISION)
            if HAS_GK:
                grad_q += _mm(p * (dp - d), _load(gk_ptr, b, keys, N, 0, DK, BLOCK_DK), PRECISION)
        _store(grad_q_ptr, grad_q, b, rows, N, 0, DK, BLOCK_DK)
    else:
        col0 = (part - 1) * SLICE_DV
        grad_dout = tl.zeros([BLOCK_M, SLICE_DV], dtype)
        for start in range(0, N, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            s = _energies(q_ptr, k_ptr, b, rows, keys, N, DK, BLOCK_DK)
            p = _probabilities(s, lse, (keys < N)[None, :], SPLIT_LSE)
            if HAS_A:
                a = _cotangent_energy(q_ptr, k_ptr, gq_ptr, gk_ptr, b, rows, keys, N, DK, BLOCK_DK, HAS_GQ, HAS_GK)
                grad_dout += _mm(p * (a - abar), _load(v_ptr, b, keys, N, col0, DV, SLICE_DV), PRECISION)
            if HAS_GV:
                grad_dout += _mm(p, _load(gv_ptr, b, keys, N, col0, DV, SLICE_DV), PRECISION)
        _store(grad_dout_ptr, grad_dout, b, rows, N, col0, DV, SLICE_DV)


@triton.jit
def _double_backward_keys_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, gq_ptr, gk_ptr, gv_ptr, stats_ptr,
                                 grad_k_ptr, grad_v_ptr, B, N, DK: tl.constexpr, DV: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                                 DV_CHUNK: tl.constexpr, SLICE_DV: tl.constexpr, HAS_GQ: tl.constexpr,
                                 HAS_GK: tl.constexpr, HAS_A: tl.constexpr, HAS_GV: tl.constexpr, SPLIT_LSE: tl.constexpr,
                                 PRECISION: tl.constexpr):
    """Grid (key blocks, 1 + Dv slices, B), on transposed tiles (keys, queries). Program 0 of axis 1:
    grad k_j = sum_i dS_ij gq_i + dS2_ij q_i; program 1 + s: grad v_j over slice s = sum_i G_ij dO_i
    (launched only with gq or gk: G = 0 otherwise)."""
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    part = tl.program_id(1)
    b = tl.program_id(2)
    dtype = k_ptr.dtype.element_ty
    if part == 0:
        grad_k = tl.zeros([BLOCK_N, BLOCK_DK], dtype)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row = b.to(tl.int64) * N + rows
            valid = rows < N
            q = _load(q_ptr, b, rows, N, 0, DK, BLOCK_DK)
            st = _energies(k_ptr, q_ptr, b, keys, rows, N, DK, BLOCK_DK)
            pt = _probabilities(st, _load_row(lse_ptr, b, rows, N)[None, :],
                                valid[None, :], SPLIT_LSE)
            d = tl.load(stats_ptr + row, mask=valid, other=0.0)[None, :]
            abar = tl.load(stats_ptr + B * N + row, mask=valid, other=0.0)[None, :]
            cov = tl.load(stats_ptr + 2 * B * N + row, mask=valid, other=0.0)[None, :]
            bbar = tl.load(stats_ptr + 3 * B * N + row, mask=valid, other=0.0)[None, :]
            dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype)
            at = tl.zeros([BLOCK_N, BLOCK_M], dtype)
            bt = tl.zeros([BLOCK_N, BLOCK_M], dtype)
            if HAS_A:
                dpt = _sum_over_dv(v_ptr, dout_ptr, b, keys, rows, N, DV, DV_CHUNK, PRECISION, dpt)
                at = _cotangent_energy(k_ptr, q_ptr, gk_ptr, gq_ptr, b, keys, rows, N, DK, BLOCK_DK, HAS_GK, HAS_GQ)
            if HAS_GV:
                bt = _sum_over_dv(gv_ptr, dout_ptr, b, keys, rows, N, DV, DV_CHUNK, PRECISION, bt)
            ds2t = _second_order_scores(pt, dpt, at, bt, d, abar, cov, bbar, HAS_A, HAS_GV)
            grad_k += _mm(ds2t, q, PRECISION)
            if HAS_GQ:
                grad_k += _mm(pt * (dpt - d), _load(gq_ptr, b, rows, N, 0, DK, BLOCK_DK), PRECISION)
        _store(grad_k_ptr, grad_k, b, keys, N, 0, DK, BLOCK_DK)
    else:
        col0 = (part - 1) * SLICE_DV
        grad_v = tl.zeros([BLOCK_N, SLICE_DV], dtype)
        for start in range(0, N, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            valid = rows < N
            st = _energies(k_ptr, q_ptr, b, keys, rows, N, DK, BLOCK_DK)
            pt = _probabilities(st, _load_row(lse_ptr, b, rows, N)[None, :],
                                valid[None, :], SPLIT_LSE)
            abar = tl.load(stats_ptr + B * N + b.to(tl.int64) * N + rows, mask=valid, other=0.0)[None, :]
            at = _cotangent_energy(k_ptr, q_ptr, gk_ptr, gq_ptr, b, keys, rows, N, DK, BLOCK_DK, HAS_GK, HAS_GQ)
            grad_v += _mm(pt * (at - abar), _load(dout_ptr, b, rows, N, col0, DV, SLICE_DV), PRECISION)
        _store(grad_v_ptr, grad_v, b, keys, N, col0, DV, SLICE_DV)


# --- launchers ------------------------------------------------------------------------------------

def _config(x: torch.Tensor, d_k: int, d_v: int, keys_outer: bool = False, double_backward: bool = False) -> dict:
    """Tile sizes, warps and dot precision for the accumulation dtype. tl.dot needs every dimension >= 16.
    float32: the owned side is 64 (a wgmma is 64 rows), the walked side 32 (16 in the double backward,
    which keeps more tiles live per step), Dv in chunks of 32; 4 warps, or 8 for the double backward
    and for Dk > 32, where 4 spill: of the shapes compiled for sm_90a (scripts/aot_check.py,
    bench/results/aot/) those with the fewest spills."""
    fp64 = x.dtype == torch.float64
    owned, walked = (32, 32) if fp64 else (64, 16 if double_backward else 32)
    rows, keys = (walked, owned) if keys_outer else (owned, walked)
    wide = not fp64 and (double_backward or d_k > 32)
    return dict(BLOCK_M=rows, BLOCK_N=keys, BLOCK_DK=max(16, triton.next_power_of_2(d_k)),
                DV_CHUNK=min(max(16, triton.next_power_of_2(d_v)), 32),
                PRECISION="ieee" if fp64 else FP32_DOT_PRECISION, num_warps=8 if wide else 4)


def _forward_config(x: torch.Tensor, d_k: int, d_v: int) -> dict:
    config = _config(x, d_k, d_v)
    del config["DV_CHUNK"]
    if x.dtype != torch.float64:
        config.update(BLOCK_M=64, BLOCK_N=64, num_warps=8)
    return config


_MULTIPROCESSORS: dict = {}


def _slice_dv(x: torch.Tensor, programs: int, d_v: int, widest: int = 64) -> int:
    """The Dv slice width: as wide as possible (each slice recomputes P) but narrow enough that
    `programs` x slices fills the GPU twice over; at most `widest` columns (registers), at least 32."""
    device = x.device
    if device not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                    if device.type == "cuda" else 132)
    width = min(widest, max(16, triton.next_power_of_2(d_v)))
    while width > 32 and programs * triton.cdiv(d_v, width) < 2 * _MULTIPROCESSORS[device]:
        width //= 2
    return width


def _sizes(q, v):
    b, n, d_k = q.shape
    return b, n, d_k, v.shape[2]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, N, Dk), v (B, N, Dv) -> out (B, N, Dv), lse (B, N) float64."""
    b, n, d_k, d_v = _sizes(q, v)
    out = q.new_empty((b, n, d_v))
    lse = q.new_empty((b, n), dtype=torch.float64)
    config = _forward_config(q, d_k, d_v)
    blocks = triton.cdiv(n, config["BLOCK_M"])
    width = _slice_dv(q, blocks * b, d_v, widest=128)
    with on_device(q):
        _forward_kernel[(blocks, triton.cdiv(d_v, width), b)](
            q, k, v, out, lse, n, DK=d_k, DV=d_v, SLICE_DV=width, **config)
    return out, lse


def backward(q, k, v, lse, dout):
    """First derivatives (dq, dk, dv) for the incoming gradient dout (B, N, Dv)."""
    b, n, d_k, d_v = _sizes(q, v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    row_d = q.new_empty((b, n))
    rows, keys = _config(q, d_k, d_v), _config(q, d_k, d_v, keys_outer=True)
    split = q.dtype != torch.float64
    row_blocks, key_blocks = triton.cdiv(n, rows["BLOCK_M"]), triton.cdiv(n, keys["BLOCK_N"])
    width = _slice_dv(q, key_blocks * b, d_v)
    with on_device(q):
        _backward_rows_kernel[(row_blocks, b)](q, k, v, lse, dout, row_d, n, DK=d_k, DV=d_v, SPLIT_LSE=split, **rows)
        _backward_queries_kernel[(row_blocks, b)](
            q, k, v, lse, dout, row_d, dq, n, DK=d_k, DV=d_v, SPLIT_LSE=split, **rows)
        _backward_keys_kernel[(key_blocks, 1 + triton.cdiv(d_v, width), b)](
            q, k, v, lse, dout, row_d, dk, dv, n, DK=d_k, DV=d_v, SLICE_DV=width, SPLIT_LSE=split, **keys)
    return dq, dk, dv


def double_backward(q, k, v, lse, dout, gq, gk, gv):
    """Gradients (q, k, v, dout) of <gq, dq> + <gk, dk> + <gv, dv>; gq, gk (B, N, Dk) and gv (B, N, Dv)
    may be None (zero)."""
    b, n, d_k, d_v = _sizes(q, v)
    grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
    grad_v, grad_dout = torch.zeros_like(v), torch.zeros_like(dout)
    has = dict(HAS_GQ=gq is not None, HAS_GK=gk is not None, HAS_GV=gv is not None)
    has["HAS_A"] = has["HAS_GQ"] or has["HAS_GK"]  # A = gq . k + q . gk
    if not any(has.values()):
        return grad_q, grad_k, grad_v, grad_dout
    cotangents = [q if g is None else g for g in (gq, gk, gv)]  # a pointer the kernel never reads
    rows = _config(q, d_k, d_v, double_backward=True)
    keys = _config(q, d_k, d_v, keys_outer=True, double_backward=True)
    split = q.dtype != torch.float64
    stats = q.new_empty((4, b, n))
    row_blocks, key_blocks = triton.cdiv(n, rows["BLOCK_M"]), triton.cdiv(n, keys["BLOCK_N"])
    row_width, key_width = _slice_dv(q, row_blocks * b, d_v), _slice_dv(q, key_blocks * b, d_v)
    common = dict(DK=d_k, DV=d_v, SPLIT_LSE=split, **has)
    key_slices = triton.cdiv(d_v, key_width) if has["HAS_A"] else 0  # G = 0 without them
    with on_device(q):
        _double_backward_rows_kernel[(row_blocks, b)](q, k, v, lse, dout, *cotangents, stats, b, n, **common, **rows)
        _double_backward_queries_kernel[(row_blocks, 1 + triton.cdiv(d_v, row_width), b)](
            q, k, v, lse, dout, *cotangents, stats, grad_q, grad_dout, b, n, SLICE_DV=row_width, **common, **rows)
        _double_backward_keys_kernel[(key_blocks, 1 + key_slices, b)](
            q, k, v, lse, dout, *cotangents, stats, grad_k, grad_v, b, n, SLICE_DV=key_width, **common, **keys)
    return grad_q, grad_k, grad_v, grad_dout
