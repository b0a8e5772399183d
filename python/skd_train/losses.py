"""The student's losses (task + pixel + pair + holistic G term) and the discriminator's step, as in the
official recipe (networks/kd_model.py); the distillation terms come from skd_kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import skd_kernels

from .config import TrainConfig
from .models import PAIR_FEATURES_INDEX

MIN_D_INPUT = 64  # skd_kernels.Discriminator's smallest input (its last 4x4 conv needs a 4x4 map)
OFFICIAL_D_INPUT = 65  # the official D sees 65 x 65 score maps (512 crops at output stride 8)


def upsample_to(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=True: how the official CriterionDSN brings logits to the label size."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def ohem_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, thresh: float,
                       min_kept: int) -> torch.Tensor:
    """Online hard example mining CE (official OhemCrossEntropy2d): keep the pixels whose probability of
    the true class is below `thresh`, and at least the `min_kept` hardest ones.

    logits (B, K, H, W), labels (B, H, W)."""
    valid = labels != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0
    with torch.no_grad():
        prob = torch.softmax(logits.float(), 1).gather(1, labels.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
        prob = prob[valid]
        threshold = thresh
        if min_kept > 0 and n_valid > min_kept:
            threshold = max(thresh, float(prob.kthvalue(min(min_kept, n_valid)).values))
        keep = valid.clone()
        keep[valid] = prob <= threshold
    target = torch.where(keep, labels, torch.full_like(labels, ignore_index))
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


class TaskLoss(nn.Module):
    """CE(main logits upsampled to the labels) + dsn_weight * CE(aux logits upsampled), as CriterionDSN.

    forward(outputs, labels): outputs the model's list (element 0 main, 1 aux or None), labels (B, H, W)."""

    def __init__(self, ignore_index: int = 255, dsn_weight: float = 0.4, ohem: bool = False,
                 ohem_thresh: float = 0.7, ohem_min_kept: int = 100000):
        super().__init__()
        self.ignore_index, self.dsn_weight = ignore_index, dsn_weight
        self.ohem, self.ohem_thresh, self.ohem_min_kept = ohem, ohem_thresh, ohem_min_kept

    def _ce(self, logits, labels):
        logits = upsample_to(logits.float(), labels.shape[-2:])
        if self.ohem:
            return ohem_cross_entropy(logits, labels, self.ignore_index, self.ohem_thresh, self.ohem_min_kept)
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index)

    def forward(self, outputs, labels):
        loss = self._ce(outputs[0], labels)
        if self.dsn_weight and len(outputs) > 1 and outputs[1] is not None:
            loss = loss + self.dsn_weight * self._ce(outputs[1], labels)
        return loss


def _size_of(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student's map at the teacher's spatial size (bilinear, align_corners=True) when the two
    architectures' output sizes differ (e.g. MobileNetV2 16x16 vs PSPNet 17x17); unchanged otherwise."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    return upsample_to(student, teacher.shape[-2:])


class DistillLosses(nn.Module):
    """The distillation terms switched on in `cfg`, and the discriminator when holistic is on.

    student_terms(preds_S, preds_T) -> {name: weighted loss} (pixel, pair, adv_g);
    d_step(preds_S, preds_T) -> the D loss d_weight * (adv + GP (wgan-gp only)) on detached maps, its
    backward already run into D's gradients (skd_kernels.HolisticDistillLoss.d_step, one graph at a time).
    With cfg.cuda_graph the D step and the adversarial G term are captured in CUDA graphs at their first
    call (skd_kernels.graphs) and replayed after: D's .grad must then be zeroed in place, not set to None.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.terms = cfg.distill_terms()
        if "pixel" in self.terms:
            self.pixel = skd_kernels.CriterionPixelWise()
        if "pair" in self.terms:
            self.pair = skd_kernels.PairWiseDistillLoss(scale=cfg.pair_scale, feat_ind=PAIR_FEATURES_INDEX)
        self.D: Optional[nn.Module] = None
        if "holistic" in self.terms:
            size = cfg.d_input_size or OFFICIAL_D_INPUT
            self.D = skd_kernels.Discriminator(1, num_classes, cfg.batch_size, size, cfg.d_conv_dim)
            self.holistic = skd_kernels.HolisticDistillLoss(self.D, cfg.adv_type, cfg.lambda_gp, weight=cfg.d_weight)
        self._graphed_d_step = self._graphed_g_loss = None

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)

    def _d_input(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        size = self.cfg.d_input_size
        if size is None and min(logits.shape[-2:]) < MIN_D_INPUT:
            size = OFFICIAL_D_INPUT  # the official D's input size; it needs at least 64x64
        if size and tuple(logits.shape[-2:]) != (size, size):
            logits = upsample_to(logits, (size, size))
        return logits

    def student_terms(self, preds_S, preds_T) -> dict:
        out = {}
        if "pixel" in self.terms:
            t0 = preds_T[0].float()
            out["pixel"] = self.terms["pixel"] * self.pixel([_size_of(preds_S[0].float(), t0)], [t0])
        if "pair" in self.terms:
            ind = PAIR_FEATURES_INDEX
            t_feat = preds_T[ind].float()
            s_list, t_list = list(preds_S), list(preds_T)
            s_list[ind], t_list[ind] = _size_of(preds_S[ind].float(), t_feat), t_feat
            out["pair"] = self.terms["pair"] * self.pair(s_list, t_list)
        if "holistic" in self.terms:
            # The student's term: Trainer.train_step freezes D's parameters for it (the D step trains D).
            out["adv_g"] = self.terms["holistic"] * self._g_loss(self._d_input(preds_S[0]))
        return out

    def _g_loss(self, d_input: torch.Tensor) -> torch.Tensor:
        """-mean D(d_input), differentiable w.r.t. d_input."""
        if not self.cfg.cuda_graph:
            return skd_kernels.adversarial_g_loss(self.D(d_input)[0])  # D returns [scores, attention maps...]
        if self._graphed_g_loss is None:  # captured under the caller's autocast, as the eager term runs
            from skd_kernels.graphs import capture_g_loss
            self._graphed_g_loss = capture_g_loss(self.D, d_input.detach())
        return self._graphed_g_loss(d_input)

    def d_step(self, preds_S, preds_T) -> torch.Tensor:
        student, teacher = self._d_input(preds_S[0].detach()), self._d_input(preds_T[0].detach())
        if not self.cfg.cuda_graph:
            return self.holistic.d_step(student, teacher)[0]
        if self._graphed_d_step is None:
            from skd_kernels.graphs import capture_d_step
            self._graphed_d_step = capture_d_step(self.holistic, student, teacher)
        return self._graphed_d_step(student, teacher)[0].clone()
