"""SAGAN attention's passes in stock PyTorch ops, a tile of rows at a time: the `torch` backend.

Every pass holds one (B, R, N) tile of the attention map at once, never N x N, with R chosen so that
a tile has about `_TILE_ELEMENTS` entries. Rows of the map are independent, so a tile sees its whole
rows and its row statistics (log-sum-exp, D_i, Abar_i, C_i, Bbar_i) are exact in one pass; column
sums (dk, dv) accumulate over tiles. The formulas, the double backward's derivation included, and
their notation (S, P, dP, D, A, B, G, H): docs/ops/attention.md. The C++, CUDA and Triton kernels
compute the same quantities.
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
    """q, k (B, N, Dk), v (B, N, Dv), all in the accumulation dtype -> out (B, N, Dv), lse (B, N)."""
    b, n, _ = q.shape
    out = q.new_empty((b, n, v.shape[2]))
    lse = q.new_empty((b, n))
    kt = k.transpose(1, 2)
    for rows in _row_tiles(b, n):
        s = torch.bmm(q[:, rows], kt)
        lse[:, rows] = torch.logsumexp(s, dim=-1)
        torch.bmm(torch.exp(s.sub_(lse[:, rows, None])), v, out=out[:, rows])
    return out, lse


def _probabilities(q, kt, lse, rows):
    return torch.exp(torch.bmm(q[:, rows], kt).sub_(lse[:, rows, None]))


def backward(q, k, v, out, lse, dout):
    """First derivatives (dq, dk, dv) for the incoming gradient dout (B, N, Dv); accumulation dtype."""
    b, n, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    for rows in _row_tiles(b, n):
        p = _probabilities(q, kt, lse, rows)
        dp = torch.bmm(dout[:, rows], vt)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # D_i from P: exact even when `out` was rounded
        torch.bmm(ds, k, out=dq[:, rows])
        dk.baddbmm_(ds.transpose(1, 2), q[:, rows])
        dv.baddbmm_(p.transpose(1, 2), dout[:, rows])
    return dq, dk, dv


def double_backward(q, k, v, lse, dout, gq: Optional[torch.Tensor], gk: Optional[torch.Tensor],
                    gv: Optional[torch.Tensor]):
    """Gradients (q, k, v, dout) of <gq, dq> + <gk, dk> + <gv, dv>; see the module docstring.
    gq, gk (B, N, Dk) and gv (B, N, Dv) may be None (zero). Accumulation dtype throughout."""
    b, n, _ = q.shape
    grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
    grad_v, grad_dout = torch.zeros_like(v), torch.zeros_like(dout)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    for rows in _row_tiles(b, n):
        qr, dor = q[:, rows], dout[:, rows]
        p = _probabilities(q, kt, lse, rows)
        dp = torch.bmm(dor, vt)
        d = (p * dp).sum(-1, keepdim=True)
        ds = p * (dp - d)
        a = torch.zeros_like(p)
        if gq is not None:
            a.baddbmm_(gq[:, rows], kt)
            grad_k.baddbmm_(ds.transpose(1, 2), gq[:, rows])
        if gk is not None:
            a.baddbmm_(qr, gk.transpose(1, 2))
            grad_q[:, rows] += torch.bmm(ds, gk)
        abar = (p * a).sum(-1, keepdim=True)
        h = (dp - d) * a - dp * abar
        hbar = (p * dp * a).sum(-1, keepdim=True) - 2 * d * abar
        if gv is not None:
            pgv = torch.bmm(p, gv)  # (P gv)_i
            h += torch.bmm(dor, gv.transpose(1, 2))
            hbar += (dor * pgv).sum(-1, keepdim=True)
            grad_dout[:, rows] += pgv
        g = p * (a - abar)
        ds2 = p * (h - hbar)
        grad_q[:, rows] += torch.bmm(ds2, k)
        grad_k.baddbmm_(ds2.transpose(1, 2), qr)
        grad_v.baddbmm_(g.transpose(1, 2), dor)
        grad_dout[:, rows] += torch.bmm(g, v)
    return grad_q, grad_k, grad_v, grad_dout
