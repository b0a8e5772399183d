"""Pair-wise distillation: input checks, the node passes per backend, backend dispatch, the
torch.library op and its autograd.

The loss compares the cosine similarities a_ij = u_i . u_j of every pair of nodes (pooled, normalised
feature vectors) of the student with the teacher's: sum over images and pairs of (a^s_ij - a^t_ij)^2,
divided by M^2 and by B. Three passes, none of which builds the M x M matrix A:

1. nodes (fused kernel per backend): pool, normalise, transpose into float64 u (B, C, M);
2. the similarity core (`pairwise_core`, shared by every backend): ``lowrank`` (Gram matrices,
   O(M C^2)) or ``tiled`` (blocks of A^s - A^t, O(M^2 C)), both exact; ``auto`` picks the one with
   fewer flops;
3. node backward (fused kernel per backend): through the normalisation and the pooling.

Like the pixel-wise op, the op returns the loss with the gradients already computed (the core yields
them for little extra work); autograd keeps them and the backward only scales them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validation as check
from .._extension import load_extension
from ..backends import resolve_backend
from ..reference import official_pairwise_kernel, pairwise_distill_reference
from ._fused_gradient import fake_outputs, loss_dtype, register_fused_gradient_autograd
from .pairwise_core import (Centred, CentredPair, NodeGrad, centre_nodes, centre_pair_nodes, choose_algorithm,
                            similarity_core)

POOLINGS = ("max", "avg", "none")
NORMALIZATIONS = ("official", "paper")
ALGORITHMS = ("auto", "lowrank", "tiled")
_POOLING_CODE = {"none": 0, "max": 1, "avg": 2}
_NORM_CODE = {"official": 0, "paper": 1}
# Working-set budget (bytes) for the float64 nodes of one chunk of images: memory stays a few
# input-sized buffers whatever the batch and the node count.
_CHUNK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 30}

# `auto` on a GPU: the CUDA kernels measured faster than the Triton ones (bench/results/*_cuda.csv, H100).
_GPU_PREFERENCE = ("cuda", "triton")

def node_kernel(student: torch.Tensor, teacher: torch.Tensor, scale, node_size) -> tuple[int, int]:
    """The pooling window (= stride): from `scale` as the official module, from `node_size`, or 1x1."""
    if scale is not None and node_size is not None:
        raise ValueError("give either scale (the official node size int(H*scale) x int(W*scale)) or "
                         "node_size, not both")
    if scale is not None:
        scale = check.check_scale(scale)
        kernel = official_pairwise_kernel(teacher, scale)
        if min(kernel) < 1:
            raise ValueError(f"scale={scale} gives an empty node window {kernel} for "
                             f"{tuple(teacher.shape[2:])} features; use a larger scale or node_size")
        return kernel
    if node_size is None:
        return 1, 1
    kernel = (node_size, node_size) if isinstance(node_size, int) else tuple(node_size)
    if len(kernel) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel):
        raise ValueError(f"node_size must be a positive int or a pair of them, got {node_size!r}")
    return kernel


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
    """Pair-wise distillation loss of Structured Knowledge Distillation, never building M x M.

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
        algorithm: ``"lowrank"``, ``"tiled"`` or ``"auto"`` (fewer flops); both exact, see the module.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"auto"``; default SKD_BACKEND or auto.

    Returns:
        sum over images and node pairs of (a^s_ij - a^t_ij)^2 / M^2 / B, a 0-d float32 tensor (float64
        for float64 features).
    """
    _check_inputs(student, teacher, pooling, normalization, algorithm)
    kernel_h, kernel_w = node_kernel(student, teacher, scale, node_size)
    if (kernel_h, kernel_w) == (1, 1):
        pooling = "none"  # a 1x1 window pools nothing
    elif pooling == "none":
        raise ValueError(f"pooling='none' needs 1x1 nodes, but the node window is {(kernel_h, kernel_w)}")
    name = resolve_backend(student.device.type, backend, gpu_preference=_GPU_PREFERENCE)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _call(student, teacher, kernel_h, kernel_w, pooling, normalization, algorithm,
                       grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad, name)
    return loss


# --- the node passes, per backend -----------------------------------------------------------------

class _Nodes:
    """One feature map's nodes (B, C, M) float64 and what their backward needs."""

    def __init__(self, features, kernel, pooling, normalization, backend, need_grad=True):
        self.features, self.kernel, self.pooling, self.normalization = features, kernel, pooling, normalization
        self.backend = backend
        b, c, h, w = features.shape
        m = -(-h // kernel[0]) * -(-w // kernel[1])
        device = features.device
        self.u = torch.empty((b, c, m), dtype=torch.float64, device=device)
        self.inv_norm = torch.empty((b, m), dtype=torch.float64, device=device)
        # The maxima's positions only when the backward will run (tracking them costs the pooling time).
        self.argmax = (torch.empty((b, c, m), dtype=torch.int32, device=device)
                       if pooling == "max" and need_grad else None)
        if backend == "torch":
            self._torch_forward()
        else:
            _node_pass(backend, "forward", self)

    def backward(self, grad_u: NodeGrad, scale: float, grad: torch.Tensor) -> None:
        """Writes d loss / d features, from scale * d loss / d u, into `grad` (the features' shape and dtype)."""
        if self.backend == "torch":
            self._torch_backward(grad_u.dense() * scale, grad)
        else:
            _node_pass(self.backend, "backward", self, *grad_u, scale, grad)

    def centre(self, out: torch.Tensor) -> Centred:
        """The centred nodes for the low-rank core, residuals written into `out` (B, C, M); fused on
        the CPU backend."""
        if self.backend != "cpu":
            return centre_nodes(self.u, out)
        b, c, _ = self.u.shape
        result = Centred(out, torch.empty((b, c), dtype=torch.float64), torch.empty((b, self.u.shape[2]), dtype=torch.float64),
                         torch.empty((b, c), dtype=torch.float64))
        load_extension("cpu").pairwise_centre(self.u, *result)
        return result

    # The PyTorch fallback: the same two passes from stock ops. Custom-op kernels run below autograd,
    # so the pooling's backward is called directly.
    def _torch_forward(self):
        k = self.kernel
        x = self.features if self.pooling == "max" and self.features.dtype in (torch.float32, torch.float64) \
            else self.features.double()
        if self.pooling == "max":
            # A maximum is one of the inputs: pool in float32/float64 and convert only the result.
            pooled, self.indices = F.max_pool2d(x, k, stride=k, ceil_mode=True, return_indices=True)
            pooled = pooled.double()
        elif self.pooling == "avg":
            pooled = F.avg_pool2d(x, k, stride=k, ceil_mode=True)
        else:
            pooled = x
        norm = pooled.flatten(2).pow(2).sum(1).sqrt()
        inv = 1 / (norm + 1e-8) if self.normalization == "official" else 1 / norm.clamp_min(1e-12)
        self.inv_norm.copy_(inv)
        self.u.copy_(pooled.flatten(2) * inv[:, None, :])
        self.pooled_shape = pooled.shape

    def _torch_backward(self, grad_u, grad):
        radial = 0
        if self.normalization == "paper":
            radial = (self.u * grad_u).sum(1, keepdim=True) * (self.inv_norm < 1e12)[:, None, :]
        grad_pooled = ((grad_u - self.u * radial) * self.inv_norm[:, None, :]).view(self.pooled_shape)
        x, k = self.features.double(), list(self.kernel)
        if self.pooling == "max":
            grad_pooled = torch.ops.aten.max_pool2d_with_indices_backward(
                grad_pooled, x, k, k, [0, 0], [1, 1], True, self.indices)
        elif self.pooling == "avg":
            grad_pooled = torch.ops.aten.avg_pool2d_backward(grad_pooled, x, k, k, [0, 0], True, True, None)
        grad.copy_(grad_pooled)


def _centre_pair_cpu(us: torch.Tensor, ut: torch.Tensor, out: torch.Tensor) -> CentredPair:
    """`centre_pair_nodes` fused on the CPU backend."""
    b, c, m = us.shape
    f64 = dict(dtype=torch.float64)
    pair = CentredPair(out, torch.empty((b, c), **f64), torch.empty((b, c), **f64), torch.empty((b, m), **f64),
                       torch.empty((b, m), **f64), torch.empty((b, 2 * c), **f64))
    load_extension("cpu").pairwise_centre_pair(us, ut, *pair)
    return pair


def _node_pass(backend: str, direction: str, nodes: _Nodes, *grads) -> None:
    args = (nodes.features, *nodes.kernel, _POOLING_CODE[nodes.pooling], _NORM_CODE[nodes.normalization],
            nodes.u, nodes.inv_norm, nodes.argmax, *grads)
    if backend == "triton":
        from ..triton import pairwise as triton_pairwise

        return getattr(triton_pairwise, f"pairwise_nodes_{direction}")(*args)
    module = load_extension(backend)
    if module is None:
        raise RuntimeError(f"skd::pairwise_distill: the {backend} backend could not be built (see the warning)")
    getattr(module, f"pairwise_nodes_{direction}")(*args)


def _chunks(student, teacher, nodes_per_image):
    """Slices of the batch whose float64 nodes fit the working-set budget."""
    budget = _CHUNK_BYTES.get(student.device.type, 1 << 26)
    per_image = 8 * nodes_per_image * (student.shape[1] + teacher.shape[1])
    step = max(1, budget // max(per_image, 1))
    return [slice(b, b + step) for b in range(0, student.shape[0], step)]


def _fused_forward(student, teacher, kernel, pooling, normalization, algorithm, want_s, want_t, backend):
    b, _, h, w = student.shape
    m = -(-h // kernel[0]) * -(-w // kernel[1])
    if algorithm == "auto":
        algorithm = choose_algorithm(m, student.shape[1], teacher.shape[1], want_t)
    gs = torch.empty_like(student) if want_s else None
    gt = torch.empty_like(teacher) if want_t else None
    total = None
    workspace = {}
    for part in _chunks(student, teacher, m):
        ns = _Nodes(student[part], kernel, pooling, normalization, backend, need_grad=want_s)
        nt = _Nodes(teacher[part], kernel, pooling, normalization, backend, need_grad=want_t)

        def centre(u, out):
            return (ns if u is ns.u else nt).centre(out)

        def centre_pair(us, ut, dtype):
            # One [S; E] buffer for all the chunks: on CPU, first-touch page faults of a fresh one
            # cost as much as the centring itself.
            shape = (us.shape[0], 2 * us.shape[1], us.shape[2])
            if workspace.get(dtype) is None or workspace[dtype].shape != shape:
                workspace[dtype] = torch.empty(shape, dtype=dtype)
            return _centre_pair_cpu(us, ut, workspace[dtype])

        loss, grad_s, grad_t = similarity_core(
            ns.u, nt.u, algorithm, want_s, want_t,
            try_float32=student.device.type == "cpu" and student.dtype != torch.float64, centre=centre,
            centre_pair=centre_pair if backend == "cpu" else centre_pair_nodes)
        total = loss if total is None else total + loss
        # The core's gradients are of the unscaled sum; the loss divides it by M^2 and B.
        if want_s:
            ns.backward(grad_s, 1.0 / (m * m * b), gs[part])
        if want_t:
            nt.backward(grad_t, 1.0 / (m * m * b), gt[part])
        del ns, nt, grad_s, grad_t
    loss = total.mul(1.0 / (m * m * b)).to(loss_dtype(student))
    empty = student.new_empty(0)  # "not computed"; a custom op may not return one tensor twice
    return loss, gs if gs is not None else empty, gt if gt is not None else empty.clone()


# --- the op and its autograd ----------------------------------------------------------------------

@torch.library.custom_op("skd::pairwise_distill", mutates_args=())
def pairwise_distill(student: torch.Tensor, teacher: torch.Tensor, kernel_h: int, kernel_w: int, pooling: str,
                     normalization: str, algorithm: str, grad_student: bool, grad_teacher: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused op on validated input: (loss, d loss/d student or empty, d loss/d teacher or empty)."""
    raise NotImplementedError(f"skd::pairwise_distill has no kernel for {student.device.type} tensors")


def _device_kernel(device_type: str, backends: tuple):
    def kernel(student, teacher, kernel_h, kernel_w, pooling, normalization, algorithm, grad_student,
               grad_teacher, backend):
        if backend not in backends:
            raise ValueError(f"skd::pairwise_distill: backend {backend!r} cannot run on {device_type} tensors")
        return _fused_forward(student, teacher, (kernel_h, kernel_w), pooling, normalization, algorithm,
                              grad_student, grad_teacher, backend)

    return kernel


# triton on CPU tensors: the interpreter
_KERNELS = {"cpu": _device_kernel("cpu", ("torch", "cpu", "triton")),
            "cuda": _device_kernel("cuda", ("torch", "cuda", "triton"))}
for _device, _kernel in _KERNELS.items():
    pairwise_distill.register_kernel(_device)(_kernel)


@pairwise_distill.register_fake
def _(student, teacher, kernel_h, kernel_w, pooling, normalization, algorithm, grad_student, grad_teacher,
      backend):
    return fake_outputs(student, teacher, grad_student, grad_teacher)


def _reference(student, teacher, kernel_h, kernel_w, pooling, normalization, algorithm):
    # Builds the M x M matrices: only double backward (create_graph=True) comes here.
    return pairwise_distill_reference(student, teacher, node_size=(kernel_h, kernel_w), pooling=pooling,
                                      normalization=normalization)


_call = register_fused_gradient_autograd(pairwise_distill, _reference, _KERNELS)
