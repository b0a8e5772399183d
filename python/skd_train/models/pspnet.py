"""PSPNet on a deep-stem dilated ResNet: the paper's teacher (ResNet-101, PSP 2048 -> 512) and student
(ResNet-18, PSP 512 -> 128), each with an auxiliary DSN head on layer3."""
from __future__ import annotations

import torch.nn as nn

from .heads import PSPModule, dsn_head
from .layers import check_width, init_weights, scaled
from .resnet import DilatedResNet


class PSPNet(nn.Module):
    """forward(images (B, 3, H, W)) -> [logits, dsn_logits, psp_features, layer4, layer3, layer2, layer1],
    the official order; logits and dsn_logits (B, K, h, w), psp_features (B, head_channels, h, w),
    layers 2-4 on the same grid and layer1 at stride 4, where h = output_size(H) (65 for 512: the stem's
    ceil-mode max-pool adds one row).

    Attribute names follow the official pspnet_combine.py (conv1.., layer1.., pspmodule, head, dsn)."""

    def __init__(self, depth: int, num_classes: int, width: float = 1.0):
        super().__init__()
        width = check_width(width)
        self.backbone = DilatedResNet(depth, width)
        c3, c4 = self.backbone.channels[2], self.backbone.channels[3]
        head_channels = scaled(512 if depth == 101 else 128, width)
        self.pspmodule = PSPModule(c4, head_channels)
        self.head = nn.Conv2d(head_channels, num_classes, 1, bias=True)
        self.dsn = dsn_head(c3, head_channels, num_classes)
        init_weights(self)

    def forward(self, images):
        x1, x2, x3, x4 = self.backbone(images)
        features = self.pspmodule(x4)
        return [self.head(features), self.dsn(x3), features, x4, x3, x2, x1]
