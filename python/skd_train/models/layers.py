"""Small building blocks shared by the segmentation models."""
from __future__ import annotations

import torch.nn as nn


def scaled(channels: int, width: float, minimum: int = 4) -> int:
    """`channels` times the width multiplier, rounded, at least `minimum` (1.0 keeps the paper's sizes)."""
    return max(minimum, int(round(channels * width)))


def check_width(width: float) -> float:
    width = float(width)
    if not 0.0 < width <= 4.0:
        raise ValueError(f"width must be a channel multiplier in (0, 4], got {width}")
    return width


def init_weights(module: nn.Module) -> None:
    """He init for convolutions, unit scale for norms: a stable start for training from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def output_size(size: int) -> int:
    """Side of every model's logits for an input side `size`: the PSPNet teacher's grid. Stride-2 conv
    (ceil(s/2)), ceil-mode 3x3 max-pool (floor(s/2) + 1), stride-2 conv (ceil(s/2)): 512 -> 65, 64 -> 9."""
    half = -(-size // 2)
    quarter = half // 2 + 1
    return -(-quarter // 2)
