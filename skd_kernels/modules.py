"""Drop-in loss modules. They hold configuration and call the functional ops; no math here."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.pixelwise import pixelwise_distill_loss


def _first(preds):
    """The official modules take model outputs as lists and read element 0 (the final logits)."""
    return preds[0] if isinstance(preds, (list, tuple)) else preds


class PixelWiseDistillLoss(nn.Module):
    """Pixel-wise distillation, see :func:`skd_kernels.pixelwise_distill_loss` for the forms.

    forward(preds_S, preds_T, labels=None): logits (B, K, H, W), or the official lists of model
    outputs (element 0 is used); labels (B, H, W) optional. Returns a 0-d float32 loss.
    """

    def __init__(self, form: str = "official", tau: float = 1.0, tau_squared: bool = False,
                 ignore_index: int = 255, resize_student: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.form, self.tau, self.tau_squared = form, tau, tau_squared
        self.ignore_index, self.resize_student, self.backend = ignore_index, resize_student, backend

    def forward(self, preds_S, preds_T, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pixelwise_distill_loss(_first(preds_S), _first(preds_T), labels, form=self.form, tau=self.tau,
                                      tau_squared=self.tau_squared, ignore_index=self.ignore_index,
                                      resize_student=self.resize_student, backend=self.backend)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, tau={self.tau}, tau_squared={self.tau_squared}, backend={self.backend!r}"


class CriterionPixelWise(PixelWiseDistillLoss):
    """Drop-in for the official `CriterionPixelWise(ignore_index=255, use_weight=True, reduce=True)`:
    same constructor and call, forward(preds_S, preds_T) on lists of outputs, the official form.
    (The official module accepts but does not use its arguments; so do we.)"""

    def __init__(self, ignore_index: int = 255, use_weight: bool = True, reduce: bool = True,
                 backend: Optional[str] = None):
        super().__init__(form="official", ignore_index=ignore_index, backend=backend)

    def forward(self, preds_S, preds_T) -> torch.Tensor:
        return super().forward(preds_S, preds_T)
