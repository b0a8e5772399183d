"""Segmentation networks of the reference trainer, each returning the official 7-element output list
[logits, dsn_logits, pair_features, stage4, stage3, stage2, stage1] (logits at output stride 8, all
on the PSPNet teacher's grid: output_size(512) = 65, so students and teacher compare pixel by pixel)."""
from __future__ import annotations

import torch.nn as nn

from .espnet import ESPNetC
from .layers import output_size
from .mobilenetv2 import MobileNetV2Seg
from .pspnet import PSPNet
from .weights import load_backbone_weights, load_weights

PAIR_FEATURES_INDEX = -5  # outputs[-5] == outputs[2]: what the pair-wise loss reads

_BUILDERS = {
    "pspnet_resnet101": lambda k, w: PSPNet(101, k, w),
    "pspnet_resnet18": lambda k, w: PSPNet(18, k, w),
    "mobilenetv2": lambda k, w: MobileNetV2Seg(k, w),
    "espnet": lambda k, w: ESPNetC(k, w),
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, *, width: float = 1.0, pretrained_backbone=None) -> nn.Module:
    """A segmentation network by name.

    name: "pspnet_resnet101" (teacher), "pspnet_resnet18", "mobilenetv2", "espnet" (students).
    num_classes: K, the classifier's outputs. width: channel multiplier (1.0 = the paper's sizes).
    pretrained_backbone: None, a checkpoint path whose backbone tensors are loaded (official/torchvision
    key layouts are mapped), or "imagenet" for MobileNetV2's torchvision ImageNet weights (width 1.0; read from
    torch's hub cache, downloaded there on first use).
    The model maps images (B, 3, H, W) to the 7-element list; see the module docstring."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = _BUILDERS[name](num_classes, width)
    if pretrained_backbone is not None:
        load_backbone_weights(model, pretrained_backbone)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["build_model", "load_weights", "load_backbone_weights", "count_parameters", "MODEL_NAMES",
           "PAIR_FEATURES_INDEX", "output_size", "PSPNet", "MobileNetV2Seg", "ESPNetC"]
