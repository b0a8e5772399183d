"""Drop-in loss modules. They hold configuration and call the functional ops; no math here."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.pairwise import pairwise_distill_loss
from .ops.pixelwise import pixelwise_distill_loss


def first_output(preds):
    """The official modules and criteria take model outputs as lists and read element 0 (the final
    logits); a tensor is taken as it is."""
    return preds[0] if isinstance(preds, (list, tuple)) else preds


class PixelWiseDistillLoss(nn.Module):
    """Pixel-wise distillation, see :func:`skd_kernels.pixelwise_distill_loss` for the forms.

    forward(preds_S, preds_T, labels=None): logits (B, K, H, W), or the official lists of model
    outputs (element 0 is used); labels (B, H, W) optional. Returns a 0-d float32 loss.
    """

    def __init__(self, form: str = "official", tau: float = 1.0, tau_squared: bool = False,
                 ignore_index: int = 255, resize_student: bool = False, weight: float = 1.0,
                 backend: Optional[str] = None):
        super().__init__()
        self.form, self.tau, self.tau_squared, self.weight = form, tau, tau_squared, weight
        self.ignore_index, self.resize_student, self.backend = ignore_index, resize_student, backend

    def forward(self, preds_S, preds_T, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pixelwise_distill_loss(first_output(preds_S), first_output(preds_T), labels, form=self.form,
                                      tau=self.tau, tau_squared=self.tau_squared, ignore_index=self.ignore_index,
                                      resize_student=self.resize_student, weight=self.weight,
                                      backend=self.backend)

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, tau={self.tau}, tau_squared={self.tau_squared}, weight={self.weight}, "
                f"backend={self.backend!r}")


class CriterionPixelWise(PixelWiseDistillLoss):
    """Drop-in for the official `CriterionPixelWise(ignore_index=255, use_weight=True, reduce=True)`:
    same constructor and call, forward(preds_S, preds_T) on lists of outputs, the official form.
    (The official module accepts but does not use its arguments; so do we.)"""

    def __init__(self, ignore_index: int = 255, use_weight: bool = True, reduce: bool = True,
                 backend: Optional[str] = None):
        super().__init__(form="official", ignore_index=ignore_index, backend=backend)

    def forward(self, preds_S, preds_T) -> torch.Tensor:
        return super().forward(preds_S, preds_T)


class PairWiseDistillLoss(nn.Module):
    """Pair-wise distillation, see :func:`skd_kernels.pairwise_distill_loss` for the arguments.

    forward(preds_S, preds_T): features (B, Cs, H, W) and (B, Ct, H, W), or the official lists of
    model outputs, of which element `feat_ind` is used (-5: the PSP features). The teacher gets a
    gradient only if its features require one. Returns a 0-d float32 loss.
    """

    def __init__(self, scale: Optional[float] = 0.5, feat_ind: int = -5, node_size=None, pooling: str = "max",
                 normalization: str = "official", algorithm: str = "auto", backend: Optional[str] = None):
        super().__init__()
        self.scale, self.feat_ind, self.node_size = scale, feat_ind, node_size
        self.pooling, self.normalization, self.algorithm, self.backend = pooling, normalization, algorithm, backend

    def _features(self, preds):
        return preds[self.feat_ind] if isinstance(preds, (list, tuple)) else preds

    def forward(self, preds_S, preds_T) -> torch.Tensor:
        return pairwise_distill_loss(self._features(preds_S), self._features(preds_T), scale=self.scale,
                                     node_size=self.node_size, pooling=self.pooling,
                                     normalization=self.normalization, algorithm=self.algorithm,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        nodes = f"scale={self.scale}" if self.scale is not None else f"node_size={self.node_size}"
        return (f"{nodes}, feat_ind={self.feat_ind}, pooling={self.pooling!r}, "
                f"normalization={self.normalization!r}, algorithm={self.algorithm!r}, backend={self.backend!r}")


class CriterionPairWiseforWholeFeatAfterPool(PairWiseDistillLoss):
    """Drop-in for the official `CriterionPairWiseforWholeFeatAfterPool(scale, feat_ind)`: max-pooled
    nodes of int(H*scale) x int(W*scale), the norm detached, as the official module.

    The teacher is *not* detached, as in the official module: its `feat_T.detach()` discards the
    result, so a teacher whose features require grad gets the loss's gradient (through the
    similarity's numerator; the norm is detached). A frozen teacher (no grad, the recipe) is
    unaffected; detach the teacher's features yourself to stop it otherwise.
    """

    def __init__(self, scale: float, feat_ind: int, backend: Optional[str] = None):
        super().__init__(scale=scale, feat_ind=feat_ind, backend=backend)
