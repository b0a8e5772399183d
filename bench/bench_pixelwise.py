"""Pixel-wise distillation (soft-target cross-entropy over classes): cases and baselines.

Step: forward and backward of the loss on logits (B, K, H, W), student and teacher independent
standard normal. Baselines: the official CriterionPixelWise formula (skd_kernels.reference), eager
and compiled; on a GPU Liger-Kernel's fused KL divergence where it is installed.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import skd_kernels as sk
from bench.harness import Case, Impl, Op, loss_step, official_baselines
from skd_kernels.reference import pixelwise_official


def _case(b, k, h, w, modes):
    # Memory-bound: a step must read S and T and write grad S once, 3·B·K·H·W elements (times 4 bytes
    # in float32); its arithmetic is a few operations per element.
    return Case(f"{b}x{k}x{h}x{w}", size=b * h * w, params=dict(shape=(b, k, h, w)), series=f"K={k}", modes=modes,
                elements=3 * b * k * h * w)


CASES = [
    _case(2, 19, 16, 16, ("tiny",)),
    _case(8, 19, 65, 65, ("quick", "full")),      # 1/8-resolution logits of a 512 crop (the official recipe)
    _case(8, 19, 128, 256, ("quick",)),
    _case(8, 19, 256, 512, ("full",)),
    _case(8, 19, 512, 512, ("full",)),            # full-resolution logits
    _case(8, 19, 512, 1024, ("full",)),
    _case(2, 150, 512, 512, ("full",)),           # ADE20K's 150 classes
]


def make_inputs(case, device, dtype):
    g = torch.Generator().manual_seed(0)
    shape = case.params["shape"]
    student = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    teacher = torch.randn(shape, generator=g).to(device, dtype)
    return dict(student=student, teacher=teacher)


def _official(case):
    return pixelwise_official


def _fused(backend):
    def loss(student, teacher):
        return sk.pixelwise_distill_loss(student, teacher, backend=backend)
    return loss


def _liger_step(case, inputs):
    """Liger's KL(q_t || q_s) on rows of classes: (B, K, H, W) -> (B*H*W, K), log-probabilities
    from torch. It differs from the official loss by the teacher's entropy, a constant of the
    student: the same gradient."""
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="sum", log_target=True)
    b, k, h, w = case.params["shape"]

    def loss(student, teacher):
        rows_s = student.permute(0, 2, 3, 1).reshape(-1, k)
        rows_t = teacher.permute(0, 2, 3, 1).reshape(-1, k)
        return kl(F.log_softmax(rows_s.float(), dim=1), F.log_softmax(rows_t.float(), dim=1)) / (h * w)

    return loss_step(loss, inputs)


def impls(case, device):
    found = official_baselines(_official)
    # The `torch` backend of this op is the reference itself: no row of its own.
    for backend in sk.available_backends(device):
        if backend != "torch" and (backend != "triton" or device.type == "cuda"):
            found.append(Impl(f"skd_{backend}", lambda case, inputs, b=backend: loss_step(_fused(b), inputs)))
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        found.append(Impl("liger_kl", _liger_step))
    return found


NOTES = """\
Forward and backward of the loss on logits (B, K, H, W). The official formula (`reference.pixelwise_official`)
permutes the logits to (B·H·W, K) rows, takes softmax and log-softmax of both and keeps them for the
backward: about five logits-sized tensors at its peak. The fused kernels read student and teacher once
per pass and write only the student's gradient, about one logits-sized tensor. `liger_kl` (GPU, when
`liger_kernel` is installed) is Liger-Kernel's fused KL divergence on the same logits rearranged to its
(rows, classes) layout, log-probabilities computed by torch; it differs from the official loss by the
teacher's entropy, so its gradient is the same. `size` is pixels per batch (B·H·W)."""

OP = Op(name="pixelwise", title="Pixel-wise distillation", size_label="pixels per batch (B·H·W)",
        cases=CASES, make_inputs=make_inputs, impls=impls, notes=NOTES)
