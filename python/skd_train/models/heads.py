"""Segmentation heads: pyramid pooling (PSP) and the auxiliary deep-supervision (DSN) head.

The official heads normalise with InPlaceABNSync's default activation, leaky ReLU of slope 0.01 (the
backbone's norms are activation='none' followed by ReLU); we keep that so official checkpoints give the
official outputs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bn_act(channels: int) -> tuple:
    """BatchNorm + InPlace-ABN's default activation."""
    return nn.BatchNorm2d(channels), nn.LeakyReLU(0.01, inplace=True)


class PSPModule(nn.Module):
    """Pyramid pooling (bins 1, 2, 3, 6) then a 3x3 bottleneck.

    forward(feats (B, C_in, h, w)) -> (B, out_channels, h, w): the features the pair-wise loss reads.
    Module indices follow the official code (stages.i.1 conv, stages.i.2 norm; bottleneck.0 conv,
    bottleneck.1 norm) so its checkpoints map by name."""

    def __init__(self, in_channels: int, out_channels: int, bins=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                          *bn_act(out_channels))
            for b in bins)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + len(bins) * out_channels, out_channels, 3, padding=1, bias=False),
            *bn_act(out_channels), nn.Dropout2d(dropout))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        size = feats.shape[-2:]
        priors = [F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=True)
                  for stage in self.stages]
        return self.bottleneck(torch.cat(priors + [feats], dim=1))


def dsn_head(in_channels: int, mid_channels: int, num_classes: int, dropout: float = 0.1) -> nn.Sequential:
    """Auxiliary head on layer3: 3x3 conv (with bias, as in the official code) -> BN -> leaky ReLU -> dropout
    -> 1x1 classifier. (B, in_channels, h, w) -> (B, num_classes, h, w)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=True),
        *bn_act(mid_channels), nn.Dropout2d(dropout),
        nn.Conv2d(mid_channels, num_classes, 1, bias=True))
