"""The tiled algorithm of the similarity core: tiles of rows of D = A^s - A^t (R x M), formed,
squared and summed, the gradient D U accumulated tile by tile; O(M^2 C) work, O(R M) memory. Exact:
it subtracts the similarities themselves. docs/ops/pairwise.md."""
from __future__ import annotations

import torch

from .types import NodeGrad

# Working-set budget (bytes) of one tile (rows of D) of the tiled algorithm.
_TILE_BYTES = 1 << 25


def tiled(us, ut, want_s, want_t):
    m = us.shape[-1]
    rows = max(1, min(m, _TILE_BYTES // (8 * m * us.shape[0])))
    if rows == m:
        return _one_tile(us, ut, want_s, want_t)
    loss = us.new_zeros(())
    dus = torch.empty_like(us) if want_s else None
    dut = torch.empty_like(ut) if want_t else None
    for r0 in range(0, m, rows):
        block = slice(r0, r0 + rows)
        # D_I = A^s[I, :] - A^t[I, :], (B, R, M)
        diff = torch.baddbmm(torch.bmm(us[:, :, block].transpose(1, 2), us), ut[:, :, block].transpose(1, 2), ut,
                             alpha=-1)
        loss += diff.square().sum()
        if want_s:  # (D Us)[I], stored as columns: Us D_I^T
            dus[:, :, block] = torch.bmm(us, diff.transpose(1, 2)).mul_(4)
        if want_t:
            dut[:, :, block] = torch.bmm(ut, diff.transpose(1, 2)).mul_(-4)
    return loss, NodeGrad(dus) if want_s else None, NodeGrad(dut) if want_t else None


def _one_tile(us, ut, want_s, want_t):
    """`_tiled` when D = A^s - A^t fits one tile (few nodes, as the official 3x3): the fewest
    launches, which is what a loss this small costs on a GPU. D is symmetric, so D U^T needs no
    transpose."""
    diff = torch.baddbmm(torch.bmm(us.transpose(1, 2), us), ut.transpose(1, 2), ut, alpha=-1)
    flat = diff.view(-1)
    loss = torch.dot(flat, flat)
    dus = NodeGrad(torch.baddbmm(us, us, diff, beta=0, alpha=4)) if want_s else None
    dut = NodeGrad(torch.baddbmm(ut, ut, diff, beta=0, alpha=-4)) if want_t else None
    return loss, dus, dut
