"""SAGAN attention's passes in stock PyTorch ops, a tile of rows at a time: the `torch` backend.

Every pass holds one (B, R, N) tile of the attention map at once, never N x N, with R chosen so that
a tile has about `_TILE_ELEMENTS` entries. Rows of the map are independent, so a tile sees its whole
rows and its row statistics (log-sum-exp, D_i, Abar_i, ...) are exact in one pass; column sums
(dk, dv) accumulate over tiles. The formulas, the double backward's derivation included, and their
notation (S, P, dP, D, A, B, G, H): docs/ops/attention.md, whose "Precision at large energies" says
why lse is float64, why P is formed from its two float32 halves, and why every row statistic is a
P-weighted mean and every product centred. The C++, CUDA and Triton kernels compute the same quantities.
"""
from __future__ import annotations

from typing import Optional

import torch

_TILE_ELEMENTS = 1 << 20  # entries of the attention map held at once (4 MB in float32)


def _row_tiles(batch: int, n: int):
    rows = max(1, min(n, _TILE_ELEMENTS // max(1, batch * n)))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, N, Dk), v (B, N, Dv), all in the accumulation dtype -> out (B, N, Dv) in that dtype,
    lse (B, N) float64."""
    b, n, _ = q.shape
    out = q.new_empty((b, n, v.shape[2]))
    lse = q.new_empty((b, n), dtype=torch.float64)
    kt = k.transpose(1, 2)
    for rows in _row_tiles(b, n):
        s = torch.bmm(q[:, rows], kt)
        m = s.amax(-1, keepdim=True)  # exact; exp(s - m) <= 1
        e = torch.exp(s.sub_(m))
        z = e.sum(-1, keepdim=True)
        torch.bmm(e, v, out=out[:, rows]).div_(z)
        # m + log z in float64: lse ~ |S| carries the absolute precision exp(S - lse) needs.
        lse[:, rows] = (m.double() + torch.log(z.double())).squeeze(-1)
    return out, lse


def _lse_halves(lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """lse (float64) = hi + lo with hi, lo in `dtype`: S - hi is exact near the row maximum."""
    hi = lse.to(dtype)
    return hi, (lse - hi.double()).to(dtype)


def _probabilities(q, kt, hi, lo, rows):
    """P = exp((S - hi) - lo) for a tile of rows, without the cancellation of S - float32(lse)."""
    s = torch.bmm(q[:, rows], kt)
    return torch.exp(s.sub_(hi[:, rows, None]).sub_(lo[:, rows, None]))


def _mean(p, x, total):
    """The P-weighted mean sum_j P_ij x_ij / sum_j P_ij: dividing by the computed sum_j P_ij makes
    sum_j P_ij (x_ij - mean_i) vanish up to rounding, so that each row of dS sums to 0 (the key-bias
    gradient) even where P is rounded."""
    return (p * x).sum(-1, keepdim=True) / total


def backward(q, k, v, lse, dout):
    """First derivatives (dq, dk, dv) for the incoming gradient dout (B, N, Dv); accumulation dtype,
    lse float64."""
    b, n, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    hi, lo = _lse_halves(lse, q.dtype)
    for rows in _row_tiles(b, n):
        p = _probabilities(q, kt, hi, lo, rows)
        dp = torch.bmm(dout[:, rows], vt)
        ds = p * (dp - _mean(p, dp, p.sum(-1, keepdim=True)))  # D_i from P: exact even when `out` was rounded
        torch.bmm(ds, k, out=dq[:, rows])
        dk.baddbmm_(ds.transpose(1, 2), q[:, rows])
        dv.baddbmm_(p.transpose(1, 2), dout[:, rows])
    return dq, dk, dv


def double_backward(q, k, v, lse, dout, gq: Optional[torch.Tensor], gk: Optional[torch.Tensor],
                    gv: Optional[torch.Tensor]):
    """Gradients (q, k, v, dout) of <gq, dq> + <gk, dk> + <gv, dv>; see the module docstring.
    gq, gk (B, N, Dk) and gv (B, N, Dv) may be None (zero). Accumulation dtype throughout, lse float64."""
    b, n, _ = q.shape
    grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
    grad_v, grad_dout = torch.zeros_like(v), torch.zeros_like(dout)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    hi, lo = _lse_halves(lse, q.dtype)
    for rows in _row_tiles(b, n):
        qr, dor = q[:, rows], dout[:, rows]
        p = _probabilities(q, kt, hi, lo, rows)
        total = p.sum(-1, keepdim=True)
        dp = torch.bmm(dor, vt)
        dpc = dp - _mean(p, dp, total)  # dP - D
        ds = p * dpc
        a = torch.zeros_like(p)
        if gq is not None:
            a.baddbmm_(gq[:, rows], kt)
            grad_k.baddbmm_(ds.transpose(1, 2), gq[:, rows])
        if gk is not None:
            a.baddbmm_(qr, gk.transpose(1, 2))
            grad_q[:, rows] += torch.bmm(ds, gk)
        a -= _mean(p, a, total)  # A - Abar: A ~ |k| grows with the energies, its spread need not
        # H - Hbar in centred form: (dP - D)(A - Abar) - Cov_P(dP, A) + B - Bbar (docs/ops/attention.md).
        h = dpc * a
        h -= _mean(p, h, total)
        if gv is not None:
            pgv = torch.bmm(p, gv)  # (P gv)_i
            bb = torch.bmm(dor, gv.transpose(1, 2))
            h += bb - _mean(p, bb, total)
            grad_dout[:, rows] += pgv
        g = p * a
        ds2 = p * h
        grad_q[:, rows] += torch.bmm(ds2, k)
        grad_k.baddbmm_(ds2.transpose(1, 2), qr)
        grad_v.baddbmm_(g.transpose(1, 2), dor)
        grad_dout[:, rows] += torch.bmm(g, v)
    return grad_q, grad_k, grad_v, grad_dout
