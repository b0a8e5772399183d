"""Pair-wise distillation's passes in stock PyTorch ops: the `torch` backend, and the centring that
every backend but the CPU one uses.

Same contract as the C++/CUDA and Triton node passes (see `ops/pairwise/nodes.py`). The math:
docs/ops/pairwise.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import triton_available
from ..ops.pairwise.tiled import tiled
from ..ops.pairwise.types import NORMALIZATION_CODE, POOLING_CODE, Centred, CentredPair, NodeGrad


def nodes_forward(features, window_h, window_w, pooling, normalization, u, inv_norm, argmax) -> None:
    """Pool (B, C, H, W) features over windows = strides (ceil mode) and normalise: u (B, C, M) and
    inv_norm (B, M) float64; argmax (B, C, M) int32, the maxima's positions in the H x W plane, or
    None when no backward will run."""
    window = (window_h, window_w)
    if pooling == POOLING_CODE["max"]:
        # A maximum is one of the inputs: pool in float32/float64 and convert only the result.
        x = features if features.dtype in (torch.float32, torch.float64) else features.double()
        pooled, positions = F.max_pool2d(x, window, stride=window, ceil_mode=True, return_indices=True)
        if argmax is not None:
            argmax.copy_(positions.flatten(2))
        pooled = pooled.double()
    elif pooling == POOLING_CODE["avg"]:
        pooled = F.avg_pool2d(features.double(), window, stride=window, ceil_mode=True)
    else:
        pooled = features.double()
    norm = pooled.flatten(2).square().sum(1).sqrt()
    official = normalization == NORMALIZATION_CODE["official"]
    inv_norm.copy_(1 / (norm + 1e-8) if official else 1 / norm.clamp_min(1e-12))
    u.copy_(pooled.flatten(2) * inv_norm[:, None, :])


def nodes_backward(features, window_h, window_w, pooling, normalization, u, inv_norm, argmax, residual, bias,
                   outer_c, outer_q, scale, grad) -> None:
    """Writes d loss / d features into `grad` (the features' shape and dtype), from scale times the
    node gradient residual + bias + outer_c outer_q (`NodeGrad`)."""
    grad_u = NodeGrad(residual, bias, outer_c, outer_q).dense() * scale
    if normalization == NORMALIZATION_CODE["paper"]:
        # The gradient through the norm: its radial part, except where the norm was clamped.
        radial = (u * grad_u).sum(1, keepdim=True) * (inv_norm < 1e12)[:, None, :]
        grad_u = grad_u - u * radial
    b, c, h, w = features.shape
    pooled_shape = (b, c, -(-h // window_h), -(-w // window_w))
    grad_pooled = (grad_u * inv_norm[:, None, :]).view(pooled_shape)
    window = [window_h, window_w]
    if pooling == POOLING_CODE["max"]:
        grad_pooled = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_pooled, features.double(), window, window, [0, 0], [1, 1], True, argmax.long().view(pooled_shape))
    elif pooling == POOLING_CODE["avg"]:
        grad_pooled = torch.ops.aten.avg_pool2d_backward(
            grad_pooled, features.double(), window, window, [0, 0], True, True, None)
    grad.copy_(grad_pooled)


def centre(u: torch.Tensor, out: torch.Tensor) -> Centred:
    """Nodes centred over the nodes, the residuals written into `out` (B, C, M), whose dtype is the
    low-rank core's."""
    mean = u.mean(2)
    r = u - mean[..., None]
    out.copy_(r)
    return Centred(out, mean, torch.einsum("bcm,bc->bm", r, mean), r.square().sum(2))


def centre_pair(us: torch.Tensor, ut: torch.Tensor, out: torch.Tensor) -> CentredPair:
    """Both sides centred for the difference expansion (Cs == Ct): [S; E] written into `out` (B, 2C, M)."""
    c = us.shape[1]
    mean_s, mean_t = us.mean(2), ut.mean(2)
    # At most one node-sized float64 temporary (none for a float64 core): on a GPU the whole batch is
    # one tile of images, and r_s, r_t, their sum, difference and squares took five.
    scratch = None if out.dtype == torch.float64 else torch.empty_like(us)
    sumsq = []
    halves = ((slice(0, c), _half_sum, (mean_s + mean_t) * 0.5), (slice(c, 2 * c), torch.sub, mean_s - mean_t))
    for half, combine, shift in halves:
        target = out[:, half] if scratch is None else scratch
        combine(us, ut, out=target).sub_(shift[..., None])
        sumsq.append(torch.linalg.vector_norm(target, dim=2).square_())
        if scratch is not None:
            out[:, half].copy_(scratch)
    return CentredPair(out, mean_s, mean_t, _dot_mean(us, mean_s), _dot_mean(ut, mean_t), torch.cat(sumsq, 1))


def _half_sum(a, b, out):
    return torch.add(a, b, out=out).mul_(0.5)


def _dot_mean(u, mean):
    """q = (u - mean) . mean per node, (B, M), without forming u - mean."""
    return torch.bmm(mean[:, None, :], u)[:, 0] - mean.square().sum(1, keepdim=True)


def keep_or_tiled(us, ut, want_s, want_t, loss, grad_s, grad_t, within):
    """(loss, grad_s, grad_t): the low-rank result where `within` (0-d bool tensor), else the tiled
    algorithm's. On CPU tensors the host reads `within` (free there). On a GPU stock PyTorch could
    only choose by reading it, a host sync on every call, so CUDA tensors take the Triton pass, which
    decides on the device, wherever Triton is installed."""
    if us.device.type == "cuda" and triton_available():
        from ..triton.pairwise_tiled import keep_or_tiled as on_device

        return on_device(us, ut, want_s, want_t, loss, grad_s, grad_t, within)
    if bool(within):
        return loss, grad_s, grad_t
    return tiled(us, ut, want_s, want_t)


def few_nodes(student, teacher, window_h, window_w, pooling, normalization, loss, grad_student,
              grad_teacher) -> bool:
    """The whole loss at few nodes in one fused pass: stock PyTorch has none, so it declines (False)
    and the op runs its three passes (the Triton backend's writes the results and returns True)."""
    return False
