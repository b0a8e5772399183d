"""One feature map's nodes: the forward node pass (pool, normalise, transpose into float64 nodes)
and its backward, on whichever backend's passes the op chose."""
from __future__ import annotations

import torch

from .types import NORMALIZATION_CODE, POOLING_CODE, NodeGrad


def node_count(height: int, width: int, window: tuple) -> int:
    """M: windows tile the map with ceil mode, so border windows may be partial."""
    return -(-height // window[0]) * -(-width // window[1])


class Nodes:
    """Nodes u (B, C, M) float64 of `features` (B, C, H, W), their inverse norms (B, M) and, for a
    max pooling whose backward will run, the maxima's positions."""

    def __init__(self, features: torch.Tensor, window: tuple, pooling: str, normalization: str, passes,
                 need_grad: bool):
        b, c, h, w = features.shape
        m = node_count(h, w, window)
        device = features.device
        self.features, self.passes = features, passes
        self.geometry = (*window, POOLING_CODE[pooling], NORMALIZATION_CODE[normalization])
        self.u = torch.empty((b, c, m), dtype=torch.float64, device=device)
        self.inv_norm = torch.empty((b, m), dtype=torch.float64, device=device)
        # The maxima's positions only when the backward will run (tracking them costs the pooling time).
        self.argmax = (torch.empty((b, c, m), dtype=torch.int32, device=device)
                       if pooling == "max" and need_grad else None)
        passes.nodes_forward(features, *self.geometry, self.u, self.inv_norm, self.argmax)

    def backward(self, grad_u: NodeGrad, scale: float, grad: torch.Tensor) -> None:
        """Writes d loss / d features, from scale * d loss / d u, into `grad` (the features' shape and dtype)."""
        self.passes.nodes_backward(self.features, *self.geometry, self.u, self.inv_norm, self.argmax, *grad_u,
                                   scale, grad)
