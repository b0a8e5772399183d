"""The losses written plainly, as the paper and the official repository state them.

This module is the specification that every backend is tested against (the derivations:
docs/ops/). It materialises whatever the formulas materialise; nothing fast lives here. Half-precision
inputs are computed in float32, so the loss is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PIXELWISE_FORMS = ("official", "kl", "cvpr")


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Every op computes and returns its loss in float32, or float64 for float64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pixelwise_official(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The official CriterionPixelWise (master): soft-target cross-entropy over classes, summed over
    pixels and the batch, divided by H*W. Logits (B, K, H, W), flattened to (B*H*W, K) as it does."""
    b, k, h, w = student.shape
    dtype = accumulation_dtype(student)
    flat_s = student.to(dtype).permute(0, 2, 3, 1).contiguous().view(-1, k)
    flat_t = teacher.to(dtype).permute(0, 2, 3, 1).contiguous().view(-1, k)
    return torch.sum(-F.softmax(flat_t, dim=1) * F.log_softmax(flat_s, dim=1)) / (h * w)


def pixelwise_kl_map(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(q_t || q_s) per pixel, q = softmax(logits / tau) over classes: (B, K, H, W) -> (B, H, W)."""
    dtype = accumulation_dtype(student)
    log_q_s = F.log_softmax(student.to(dtype) / tau, dim=1)
    log_q_t = F.log_softmax(teacher.to(dtype) / tau, dim=1)
    return torch.sum(log_q_t.exp() * (log_q_t - log_q_s), dim=1)


def pixelwise_distill_reference(student, teacher, labels=None, *, form="official", tau=1.0,
                                tau_squared=False, ignore_index=255):
    """Pixel-wise distillation loss, every form:

    - ``official``: :func:`pixelwise_official` (no temperature, no ignore mask);
    - ``kl``: mean over the non-ignored pixels of KL(q_t || q_s), times tau**2 if ``tau_squared``;
    - ``cvpr``: the CVPR-era ``nn.KLDivLoss()``, i.e. the same KL sum averaged over all
      B*K*H*W elements (over K times the non-ignored pixels when labels are given).

    With every pixel ignored, ``kl`` and ``cvpr`` return 0 (a sum over nothing), not NaN.
    """
    if form == "official":
        return pixelwise_official(student, teacher)
    kl = pixelwise_kl_map(student, teacher, tau)
    if labels is not None:
        valid = labels != ignore_index
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        count = valid.sum()
    else:
        count = torch.tensor(kl.numel(), device=kl.device)
    if form == "cvpr":
        count = count * student.shape[1]
    loss = kl.sum() / count.clamp(min=1).to(kl.dtype)
    return loss * tau**2 if tau_squared else loss


# --- pair-wise -----------------------------------------------------------------------------------

def pairwise_nodes(features: torch.Tensor, window: tuple, pooling: str) -> torch.Tensor:
    """Pool (B, C, H, W) features into nodes with pooling window = stride = `window`, ceil_mode=True
    and no padding (partial windows at the border are nodes too): (B, C, H', W')."""
    if pooling == "none" or tuple(window) == (1, 1):
        return features
    if pooling == "max":
        return F.max_pool2d(features, window, stride=window, padding=0, ceil_mode=True)
    return F.avg_pool2d(features, window, stride=window, padding=0, ceil_mode=True)


def official_pairwise_window(teacher_features: torch.Tensor, scale: float) -> tuple:
    """The official node size: (int(H * scale), int(W * scale)) of the teacher's map."""
    h, w = teacher_features.shape[-2:]
    return int(h * scale), int(w * scale)


def node_similarity(nodes: torch.Tensor, normalization: str) -> torch.Tensor:
    """Cosine similarity of every pair of nodes, (B, C, H', W') -> (B, M, M), M = H'W', in float32
    (float64 for float64 input).

    ``official``: f / (||f|| + 1e-8) with the norm detached (the official code);
    ``paper``: f / max(||f||, 1e-12) with the gradient through the norm (F.normalize, as CIRKD).
    """
    x = nodes.to(accumulation_dtype(nodes)).flatten(2)  # (B, C, M)
    if normalization == "official":
        x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt().detach() + 1e-8)
    else:
        x = F.normalize(x, p=2, dim=1)
    return torch.bmm(x.transpose(1, 2), x)


def pairwise_distill_reference(student, teacher, *, scale=None, node_size=None, pooling="max",
                               normalization="official"):
    """Pair-wise distillation loss, materialising the M x M similarity matrices:
    sum over images and node pairs of (a_ij^s - a_ij^t)^2, divided by M^2 and by B.

    Features (B, Cs, H, W) and (B, Ct, H, W), Cs != Ct allowed. Nodes: windows of
    `official_pairwise_window(teacher, scale)` (the official module) or of `node_size`
    (an int or a pair), or every position when both are None.
    With scale=0.5, pooling="max", normalization="official" this is the official
    CriterionPairWiseforWholeFeatAfterPool.
    """
    if scale is not None:
        window = official_pairwise_window(teacher, scale)
    elif node_size is not None:
        window = (node_size, node_size) if isinstance(node_size, int) else tuple(node_size)
    else:
        window = (1, 1)
    sim_s = node_similarity(pairwise_nodes(student, window, pooling), normalization)
    sim_t = node_similarity(pairwise_nodes(teacher, window, pooling), normalization)
    nodes = sim_s.shape[-1]
    return ((sim_t - sim_s) ** 2).sum() / nodes**2 / student.shape[0]


# --- attention (SAGAN Self_Attn) ------------------------------------------------------------------

def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAGAN attention as in the official Self_Attn, materialising the N x N attention map:
    out[b, i] = sum_j softmax_j(q[b, i] . k[b, j]) v[b, j], with no 1/sqrt(d) scaling.

    q, k: (B, N, Dk); v: (B, N, Dv). Returns (B, N, Dv) in the inputs' dtype, computed in float32
    (float64 for float64 input). Differentiable to any order by autograd.
    """
    acc = accumulation_dtype(q)
    energy = torch.bmm(q.to(acc), k.to(acc).transpose(1, 2))  # (B, N, N)
    attention = torch.softmax(energy, dim=-1)
    return torch.bmm(attention, v.to(acc)).to(q.dtype)
