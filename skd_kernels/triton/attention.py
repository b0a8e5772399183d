"""Fused SAGAN attention in Triton: forward and backward kernels (flash-attention tiling).

Forward: one program owns BLOCK_M query rows of one image and walks the keys in tiles of BLOCK_N
with an online softmax, so only a (BLOCK_M, BLOCK_N) tile of the map ever exists; it saves the row
log-sum-exp. Backward: a row kernel (two walks over the keys: D_i = sum_j P dP, then dq) and a
column kernel (BLOCK_N keys walk the queries: dk, dv), each recomputing P = exp(S - lse), so no
atomics. Products use tl.dot with IEEE input precision: TF32 would break the fp32 contract.

There is no Triton double backward yet: the backend table (`backends.py`) gives this backend the
stock-PyTorch one (`pytorch/attention.py`), exact and O(N * C) in memory.

Inputs are contiguous (B, N, D) in the accumulation dtype (float32, or float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device


@triton.jit
def _load_rows(ptr, b, rows, N, D, BLOCK_D: tl.constexpr):
    """Rows `rows` of image b of a contiguous (B, N, D) tensor: a (len(rows), BLOCK_D) tile, 0 outside."""
    cols = tl.arange(0, BLOCK_D)
    return tl.load(ptr + b * N * D + rows[:, None] * D + cols[None, :],
                   mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, tile, b, rows, N, D, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    tl.store(ptr + b * N * D + rows[:, None] * D + cols[None, :], tile,
             mask=(rows[:, None] < N) & (cols[None, :] < D))


@triton.jit
def _dot(a, b, acc_ty: tl.constexpr):
    # IEEE products: TF32 would break the fp32 contract.
    return tl.dot(a, b, input_precision="ieee", out_dtype=acc_ty)


@triton.jit
def _row_tile(q, do, lse, k_ptr, v_ptr, b, cols, N, DK, DV, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """For a tile of query rows (q, do, lse) and the keys `cols`: k, P = exp(q k^T - lse) (0 past N)
    and dP = dO v^T."""
    acc_ty = q.dtype
    k = _load_rows(k_ptr, b, cols, N, DK, BLOCK_DK)
    v = _load_rows(v_ptr, b, cols, N, DV, BLOCK_DV)
    p = tl.where((cols < N)[None, :], tl.exp(_dot(q, tl.trans(k), acc_ty) - lse[:, None]), 0.0)
    return k, p, _dot(do, tl.trans(v), acc_ty)


@triton.jit
def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, N, DK, DV,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr, b, rows, N, DK, BLOCK_DK)
    acc_ty = q.dtype
    m = tl.full([BLOCK_M], float("-inf"), acc_ty)
    z = tl.zeros([BLOCK_M], acc_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], acc_ty)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, b, cols, N, DK, BLOCK_DK)
        v = _load_rows(v_ptr, b, cols, N, DV, BLOCK_DV)
        s = tl.where((cols < N)[None, :], _dot(q, tl.trans(k), acc_ty), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile, where m = -inf
        p = tl.exp(s - m_new[:, None])
        z = z * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, acc_ty)
        m = m_new
    _store_rows(out_ptr, acc / z[:, None], b, rows, N, DV, BLOCK_DV)
    tl.store(lse_ptr + b * N + rows, m + tl.log(z), mask=rows < N)


@triton.jit
def _attention_backward_rows_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, dq_ptr, d_ptr, N, DK, DV,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr, b, rows, N, DK, BLOCK_DK)
    do = _load_rows(dout_ptr, b, rows, N, DV, BLOCK_DV)
    lse = tl.load(lse_ptr + b * N + rows, mask=rows < N, other=0.0)
    acc_ty = q.dtype
    # Walk 1: D_i = sum_j P_ij dP_ij (from P, not from a rounded `out`).
    d = tl.zeros([BLOCK_M], acc_ty)
    for start in range(0, N, BLOCK_N):
        _, p, dp = _row_tile(q, do, lse, k_ptr, v_ptr, b, start + tl.arange(0, BLOCK_N), N, DK, DV,
                             BLOCK_DK, BLOCK_DV)
        d += tl.sum(p * dp, 1)
    # Walk 2: dq_i = sum_j P_ij (dP_ij - D_i) k_j.
    dq = tl.zeros([BLOCK_M, BLOCK_DK], acc_ty)
    for start in range(0, N, BLOCK_N):
        k, p, dp = _row_tile(q, do, lse, k_ptr, v_ptr, b, start + tl.arange(0, BLOCK_N), N, DK, DV,
                             BLOCK_DK, BLOCK_DV)
        dq += _dot(p * (dp - d[:, None]), k, acc_ty)
    _store_rows(dq_ptr, dq, b, rows, N, DK, BLOCK_DK)
    tl.store(d_ptr + b * N + rows, d, mask=rows < N)


@triton.jit
def _attention_backward_columns_kernel(q_ptr, k_ptr, v_ptr, lse_ptr, dout_ptr, d_ptr, dk_ptr, dv_ptr,
                                       N, DK, DV, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                       BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    b = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(k_ptr, b, cols, N, DK, BLOCK_DK)
    v = _load_rows(v_ptr, b, cols, N, DV, BLOCK_DV)
    acc_ty = k.dtype
    grad_k = tl.zeros([BLOCK_N, BLOCK_DK], acc_ty)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], acc_ty)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        q = _load_rows(q_ptr, b, rows, N, DK, BLOCK_DK)
        do = _load_rows(dout_ptr, b, rows, N, DV, BLOCK_DV)
        lse = tl.load(lse_ptr + b * N + rows, mask=row_mask, other=0.0)
        d = tl.load(d_ptr + b * N + rows, mask=row_mask, other=0.0)
        # P^T, (keys, queries)
        pt = tl.where(row_mask[None, :], tl.exp(_dot(k, tl.trans(q), acc_ty) - lse[None, :]), 0.0)
        dpt = _dot(v, tl.trans(do), acc_ty)
        grad_v += _dot(pt, do, acc_ty)
        grad_k += _dot(pt * (dpt - d[None, :]), q, acc_ty)
    _store_rows(dk_ptr, grad_k, b, cols, N, DK, BLOCK_DK)
    _store_rows(dv_ptr, grad_v, b, cols, N, DV, BLOCK_DV)


def _blocks(q: torch.Tensor, v: torch.Tensor) -> dict:
    # tl.dot needs every dimension >= 16; smaller tiles for float64 and wide v keep registers in budget.
    block = 16 if q.dtype == torch.float64 or v.shape[2] > 256 else 32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_DK=max(16, triton.next_power_of_2(q.shape[2])),
                BLOCK_DV=max(16, triton.next_power_of_2(v.shape[2])))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, N, Dk), v (B, N, Dv), contiguous, float32/float64 -> out (B, N, Dv), lse (B, N)."""
    b, n, d_k = q.shape
    out = q.new_empty((b, n, v.shape[2]))
    lse = q.new_empty((b, n))
    blocks = _blocks(q, v)
    with on_device(q):
        _attention_forward_kernel[(triton.cdiv(n, blocks["BLOCK_M"]), b)](
            q, k, v, out, lse, n, d_k, v.shape[2], **blocks)
    return out, lse


def backward(q, k, v, lse, dout):
    """First derivatives (dq, dk, dv) for the incoming gradient dout (B, N, Dv)."""
    b, n, d_k = q.shape
    d_v = v.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    row_d = q.new_empty((b, n))
    blocks = _blocks(q, v)
    with on_device(q):
        _attention_backward_rows_kernel[(triton.cdiv(n, blocks["BLOCK_M"]), b)](
            q, k, v, lse, dout, dq, row_d, n, d_k, d_v, **blocks)
        _attention_backward_columns_kernel[(triton.cdiv(n, blocks["BLOCK_N"]), b)](
            q, k, v, lse, dout, row_d, dk, dv, n, d_k, d_v, **blocks)
    return dq, dk, dv
