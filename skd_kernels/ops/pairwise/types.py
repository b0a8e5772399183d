"""The types pair-wise distillation's passes exchange: node gradients and centred nodes. The math:
docs/ops/pairwise.md."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# The node passes' integer codes, as the kernels take them.
POOLING_CODE = {"none": 0, "max": 1, "avg": 2}
NORMALIZATION_CODE = {"official": 0, "paper": 1}


class NodeGrad(NamedTuple):
    """d loss / d u as the core leaves it: residual[b, c, m] + bias[b, c] + outer_c[b, c] * outer_q[b, m],
    the residual in float32 or float64, the low-rank algorithm's rank-2 mean terms in float64 (or None),
    all of the unscaled sum (the node backward applies 1 / (M^2 B))."""
    residual: torch.Tensor
    bias: Optional[torch.Tensor] = None
    outer_c: Optional[torch.Tensor] = None
    outer_q: Optional[torch.Tensor] = None

    def dense(self) -> torch.Tensor:
        grad = self.residual.double()
        if self.bias is not None:
            grad = grad + self.bias[..., None] + self.outer_c[..., None] * self.outer_q[:, None, :]
        return grad


class Centred(NamedTuple):
    """Nodes centred over the nodes: residual r = u - mean (B, C, M) in the core's dtype, mean (B, C),
    q = r . mean (B, M) and the per-channel sums of r^2 (B, C), those three in float64."""
    residual: torch.Tensor
    mean: torch.Tensor
    q: torch.Tensor
    sumsq: torch.Tensor



class CentredPair(NamedTuple):
    """Both sides' nodes centred for the difference expansion (Cs == Ct): stacked [S; E] (B, 2C, M) in the
    core's dtype, S = (rs + rt) / 2 and E = rs - rt each rounded once from float64; the means (B, C),
    q = r . mean (B, M) of each side and the per-row sums of squares of [S; E] (B, 2C), in float64."""
    stacked: torch.Tensor
    mean_s: torch.Tensor
    mean_t: torch.Tensor
    q_s: torch.Tensor
    q_t: torch.Tensor
    sumsq: torch.Tensor


