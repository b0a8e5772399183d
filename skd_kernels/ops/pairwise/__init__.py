"""Pair-wise distillation: input checks, the op and its autograd. The math: docs/ops/pairwise.md.

The loss compares the cosine similarities a_ij = u_i . u_j of every pair of nodes (pooled, normalised
feature vectors) of the student with the teacher's: sum over images and pairs of (a^s_ij - a^t_ij)^2,
divided by M^2 and by B. Three passes, none of which builds the M x M matrix A:

1. nodes (`nodes.py`, a fused pass per backend): pool, normalise, transpose into float64 u (B, C, M);
2. the similarity core (`core.py`, shared by every backend): ``lowrank`` or ``tiled``, both exact;
3. node backward (per backend): through the normalisation and the pooling.

Like the pixel-wise op, the op returns the loss with the gradients already computed (the core yields
them for little extra work); autograd keeps them and the backward only scales them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _validation as check
from ...backends import FEW_NODES, passes, resolve
from ...reference import accumulation_dtype, official_pairwise_window, pairwise_distill_reference
from .._fused_gradient import register_fused_gradient_op
from .core import Centring, choose_algorithm, similarity_core
from .nodes import Nodes, node_count
from .types import NORMALIZATION_CODE, POOLING_CODE

POOLINGS = ("max", "avg", "none")
NORMALIZATIONS = ("official", "paper")
ALGORITHMS = ("auto", "lowrank", "tiled")
# Working-set budget (bytes) for the float64 nodes of one tile of images: memory stays a few
# input-sized buffers whatever the batch and the node count.
_IMAGE_TILE_BYTES = {"cpu": 1 << 26, "cuda": 1 << 30}


def node_window(student: torch.Tensor, teacher: torch.Tensor, scale, node_size) -> tuple[int, int]:
    """The pooling window (= stride): from `scale` as the official module, from `node_size`, or 1x1."""
    if scale is not None and node_size is not None:
        raise ValueError("give either scale (the official node size int(H*scale) x int(W*scale)) or "
                         "node_size, not both")
    if scale is not None:
        scale = check.check_scale(scale)
        window = official_pairwise_window(teacher, scale)
        if min(window) < 1:
            raise ValueError(f"scale={scale} gives an empty node window {window} for "
                             f"{tuple(teacher.shape[2:])} features; use a larger scale or node_size")
        return window
    if node_size is None:
        return 1, 1
    window = (node_size, node_size) if isinstance(node_size, int) else tuple(node_size)
    if len(window) != 2 or not all(isinstance(k, int) and k >= 1 for k in window):
        raise ValueError(f"node_size must be a positive int or a pair of them, got {node_size!r}")
    return window


def _check_inputs(student, teacher, pooling, normalization, algorithm):
    check.check_float_tensor("student", student, 4, "(B, Cs, H, W)")
    check.check_float_tensor("teacher", teacher, 4, "(B, Ct, H, W)")
    check.check_same("student", student, "teacher", teacher)
    check.check_choice("pooling", pooling, POOLINGS)
    check.check_choice("normalization", normalization, NORMALIZATIONS)
    check.check_choice("algorithm", algorithm, ALGORITHMS)
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features "
                         f"{tuple(teacher.shape)} must agree in B, H and W (channels may differ)")
    for name, features in (("student", student), ("teacher", teacher)):
        if features.numel() == 0:
            raise ValueError(f"{name} features must be non-empty, got shape {tuple(features.shape)}")
        check.check_finite(name, features)


def pairwise_distill_loss(student: torch.Tensor, teacher: torch.Tensor, *, scale: Optional[float] = None,
                          node_size=None, pooling: str = "max", normalization: str = "official",
                          algorithm: str = "auto", backend: Optional[str] = None) -> torch.Tensor:
    """Pair-wise distillation loss of Structured Knowledge Distillation, never building M x M
    (docs/ops/pairwise.md).

    Args:
        student, teacher: features (B, Cs, H, W) and (B, Ct, H, W), Cs != Ct allowed; float32, float16,
            bfloat16 or float64, same dtype and device, any strides.
        scale: node windows of int(H*scale) x int(W*scale) of the teacher's map (the official module;
            0.5 on 65x65 gives 3x3 nodes). node_size: an int or (h, w) window instead. Neither: every
            position is a node. Windows tile the map with ceil mode: border windows may be partial.
        pooling: ``"max"`` (official), ``"avg"`` or ``"none"`` (only with 1x1 windows).
        normalization: ``"official"`` u = f / (||f|| + 1e-8) with the norm detached (the official
            code), or ``"paper"`` u = f / max(||f||, 1e-12) with the gradient through the norm
            (F.normalize, the paper's cosine; CIRKD).
        algorithm: ``"lowrank"``, ``"tiled"`` or ``"auto"`` (fewer flops); both exact.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"auto"``; default SKD_BACKEND or auto.

    Returns:
        sum over images and node pairs of (a^s_ij - a^t_ij)^2 / M^2 / B, a 0-d float32 tensor (float64
        for float64 features).
    """
    _check_inputs(student, teacher, pooling, normalization, algorithm)
    window_h, window_w = node_window(student, teacher, scale, node_size)
    if (window_h, window_w) == (1, 1):
        pooling = "none"  # a 1x1 window pools nothing
    elif pooling == "none":
        raise ValueError(f"pooling='none' needs 1x1 nodes, but the node window is {(window_h, window_w)}")
    name = resolve("pairwise", student.device.type, backend, size=node_count(*student.shape[2:], (window_h, window_w)))
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _call(student, teacher, window_h, window_w, pooling, normalization, algorithm,
                       grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad, name)
    return loss


def _image_tiles(student, teacher, nodes_per_image):
    """Slices of the batch whose float64 nodes fit the working-set budget."""
    budget = _IMAGE_TILE_BYTES.get(student.device.type, 1 << 26)
    per_image = 8 * nodes_per_image * (student.shape[1] + teacher.shape[1])
    step = max(1, budget // max(per_image, 1))
    return [slice(b, b + step) for b in range(0, student.shape[0], step)]


def _fused_forward(student, teacher, window_h, window_w, pooling, normalization, algorithm, want_s, want_t,
                   backend):
    b, _, h, w = student.shape
    window = (window_h, window_w)
    m = node_count(h, w, window)
    node_passes = passes("pairwise", backend)
    gs = torch.empty_like(student) if want_s else None
    gt = torch.empty_like(teacher) if want_t else None
    empty = student.new_empty(0)  # "not computed"; a custom op may not return one tensor twice
    if m <= FEW_NODES and algorithm != "lowrank":
        # The whole loss in one fused pass where the backend has one (Triton): at few nodes the loss
        # costs its launches. The others decline and run the three passes below.
        loss = student.new_empty((), dtype=accumulation_dtype(student))
        if node_passes.few_nodes(student, teacher, window_h, window_w, POOLING_CODE[pooling],
                                 NORMALIZATION_CODE[normalization], loss, gs, gt):
            return loss, gs if gs is not None else empty, gt if gt is not None else empty.clone()
    if algorithm == "auto":
        algorithm = choose_algorithm(m, student.shape[1], teacher.shape[1], want_t)
    centring = Centring(node_passes)
    # float32 products first where they are fast and usually exact enough (see core.py); only on
    # CPU backends, whose host decides for free (Triton on CPU tensors is the interpreter standing in
    # for a GPU: it takes the GPU's path).
    try_float32 = student.device.type == "cpu" and student.dtype != torch.float64 and backend != "triton"
    total = None
    for images in _image_tiles(student, teacher, m):
        ns = Nodes(student[images], window, pooling, normalization, node_passes, need_grad=want_s)
        nt = Nodes(teacher[images], window, pooling, normalization, node_passes, need_grad=want_t)
        loss, grad_s, grad_t = similarity_core(ns.u, nt.u, algorithm, want_s, want_t, centring, try_float32)
        total = loss if total is None else total + loss
        # The core's gradients are of the unscaled sum; the loss divides it by M^2 and B.
        if want_s:
            ns.backward(grad_s, 1.0 / (m * m * b), gs[images])
        if want_t:
            nt.backward(grad_t, 1.0 / (m * m * b), gt[images])
        del ns, nt, grad_s, grad_t
    loss = total.mul(1.0 / (m * m * b)).to(accumulation_dtype(student))
    return loss, gs if gs is not None else empty, gt if gt is not None else empty.clone()


@torch.library.custom_op("skd::pairwise_distill", mutates_args=())
def pairwise_distill(student: torch.Tensor, teacher: torch.Tensor, window_h: int, window_w: int, pooling: str,
                     normalization: str, algorithm: str, grad_student: bool, grad_teacher: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused op on validated input: (loss, d loss/d student or empty, d loss/d teacher or empty)."""
    return _fused_forward(student, teacher, window_h, window_w, pooling, normalization, algorithm, grad_student,
                          grad_teacher, backend)


def _reference(student, teacher, window_h, window_w, pooling, normalization, algorithm):
    # Builds the M x M matrices: only double backward (create_graph=True) comes here.
    return pairwise_distill_reference(student, teacher, node_size=(window_h, window_w), pooling=pooling,
                                      normalization=normalization)


_call = register_fused_gradient_op(pairwise_distill, _fused_forward, _reference)
