"""Pixel-wise distillation: input checks, the torch.library op and its autograd. The math:
docs/ops/pixelwise.md.

The op `skd::pixelwise_distill` runs one fused kernel that reads S and T once and returns the loss
together with the gradients of the loss with respect to S (and T when it requires grad), already
multiplied by the form's constant. Autograd saves those buffers; the backward only scales them by
the incoming gradient, in place, so the whole forward+backward adds one logits-sized tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validation as check
from ..backends import passes, resolve
from ..reference import PIXELWISE_FORMS, accumulation_dtype, pixelwise_distill_reference
from ._fused_gradient import register_fused_gradient_op

_KL_FORMS = ("kl", "cvpr")  # forms whose per-pixel loss is a KL divergence; `official` is soft CE



def _check_inputs(student, teacher, labels, form, tau, tau_squared, resize_student, ignore_index):
    check.check_float_tensor("student", student, 4, "(B, K, H, W)")
    check.check_float_tensor("teacher", teacher, 4, "(B, K, H, W)")
    check.check_same("student", student, "teacher", teacher)
    check.check_choice("form", form, PIXELWISE_FORMS)
    tau = check.check_positive("tau", tau)
    if form == "official" and (tau != 1.0 or tau_squared or labels is not None):
        raise ValueError("form='official' is the official CriterionPixelWise: it takes no tau, tau_squared "
                         "or labels; use form='kl' for a temperature or an ignore mask")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher must agree in (B, K); got {tuple(student.shape[:2])} "
                         f"and {tuple(teacher.shape[:2])}")
    if min(teacher.shape) == 0:
        raise ValueError(f"teacher must be non-empty, got shape {tuple(teacher.shape)}")
    if student.shape[2:] != teacher.shape[2:]:
        if not resize_student:
            raise ValueError(f"student logits are {tuple(student.shape[2:])} but the teacher's are "
                             f"{tuple(teacher.shape[2:])}; pass resize_student=True to resize the student "
                             "bilinearly to the teacher's size")
        student = F.interpolate(student, size=teacher.shape[2:], mode="bilinear", align_corners=True)
    if labels is not None:
        check.check_labels(labels, student, tuple(teacher.shape[2:]), ignore_index)
        labels = labels.long()
    check.check_finite("student", student)
    check.check_finite("teacher", teacher)
    return student, labels, tau


def pixelwise_distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor] = None,
                           *, form: str = "official", tau: float = 1.0, tau_squared: bool = False,
                           ignore_index: int = 255, resize_student: bool = False, weight: float = 1.0,
                           backend: Optional[str] = None) -> torch.Tensor:
    """Pixel-wise distillation loss of Structured Knowledge Distillation.

    Args:
        student, teacher: logits (B, K, H, W), float32/float16/bfloat16/float64, same dtype and device,
            any strides (NCHW is read in place).
        labels: optional (B, H, W) integer map; pixels equal to `ignore_index` are left out (`kl`, `cvpr`).
        form: ``"official"`` (the official CriterionPixelWise: soft cross-entropy summed over the batch,
            divided by H*W), ``"kl"`` (mean over pixels of KL(q_t || q_s), q = softmax(logits / tau)),
            or ``"cvpr"`` (the CVPR-era KLDivLoss: the KL sum averaged over B*K*H*W elements).
        tau: temperature > 0 (`kl` and `cvpr`). tau_squared: multiply by tau**2.
        resize_student: resize the student's logits bilinearly to the teacher's size when they differ
            (otherwise that is an error, as in the official code).
        weight: a factor folded into the kernel's constant (a trainer's lambda): the loss is weight times
            the form's value, and backward() then has no gradient to rescale.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"auto"``; default: SKD_BACKEND or auto.

    Returns:
        The loss, a 0-d float32 tensor (float64 for float64 logits). With every pixel ignored it is 0.
    """
    student, labels, tau = _check_inputs(student, teacher, labels, form, tau, tau_squared, resize_student,
                                         ignore_index)
    weight = check.check_finite_number("weight", weight)
    name = resolve("pixelwise", student.device.type, backend)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _call(student, teacher, labels, int(ignore_index), tau, form, bool(tau_squared), weight,
                       grad_enabled and student.requires_grad, grad_enabled and teacher.requires_grad, name)
    return loss


def _form_constant(student, labels, ignore_index, tau, form, tau_squared, weight) -> torch.Tensor:
    """The form's constant times `weight`, a 0-d float64 tensor on the logits' device (no host sync)."""
    b, k, h, w = student.shape
    if form == "official":
        return torch.full((), weight / (h * w), dtype=torch.float64, device=student.device)
    constant = weight * (tau * tau if tau_squared else 1.0) / (k if form == "cvpr" else 1)
    if labels is None:
        return torch.full((), constant / (b * h * w), dtype=torch.float64, device=student.device)
    valid = (labels != ignore_index).sum()
    return constant / valid.clamp(min=1).to(torch.float64)


def _fused_forward(student, teacher, labels, ignore_index, tau, form, tau_squared, weight, grad_student,
                   grad_teacher, backend):
    b, _, h, w = student.shape
    constant = _form_constant(student, labels, ignore_index, tau, form, tau_squared, weight)
    pixel_loss = torch.empty((b, h, w), dtype=torch.float64, device=student.device)
    gs = torch.empty_like(student) if grad_student else None
    gt = torch.empty_like(teacher) if grad_teacher else None
    # A pass fills pixel_loss, or (CUDA) sums it in the kernel and returns the sum.
    total = passes("pixelwise", backend).loss_and_grad(student, teacher, labels, ignore_index, 1.0 / tau,
                                                       form in _KL_FORMS, constant, pixel_loss, gs, gt)
    loss = ((pixel_loss.sum() if total is None else total) * constant).to(accumulation_dtype(student))
    empty = student.new_empty(0)  # "not computed"; a custom op may not return one tensor twice
    return loss, gs if gs is not None else empty, gt if gt is not None else empty.clone()


@torch.library.custom_op("skd::pixelwise_distill", mutates_args=())
def pixelwise_distill(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                      ignore_index: int, tau: float, form: str, tau_squared: bool, weight: float,
                      grad_student: bool, grad_teacher: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused op on validated input: (loss, d loss/d student or empty, d loss/d teacher or empty)."""
    return _fused_forward(student, teacher, labels, ignore_index, tau, form, tau_squared, weight, grad_student,
                          grad_teacher, backend)


def _reference(student, teacher, labels, ignore_index, tau, form, tau_squared, weight):
    return weight * pixelwise_distill_reference(student, teacher, labels, form=form, tau=tau,
                                                tau_squared=tau_squared, ignore_index=ignore_index)


def _scale_in_place(backend):
    """The CUDA pass's device-side scaling (nothing to do when the incoming gradient is 1, decided on the
    device), for contiguous gradients; None elsewhere (the backward then multiplies)."""
    if backend != "cuda":
        return None
    from .. import backends  # the CUDA extension, loaded by the forward already

    device_scale = backends._extension_module("cuda").pixelwise_scale_in_place

    def scale(gradient, grad_loss):
        if gradient.is_contiguous() and grad_loss.dtype == accumulation_dtype(gradient):
            device_scale(gradient, grad_loss)
            return gradient
        return gradient.mul_(grad_loss)

    return scale


_call = register_fused_gradient_op(pixelwise_distill, _fused_forward, _reference, _scale_in_place)
