"""ESPNet-C student (Mehta et al., ECCV 2018): efficient spatial pyramid (ESP) blocks with
hierarchical feature fusion, input reinforcement, PReLU; its encoder ends at output stride 8, which is
where the distillation losses compare student and teacher (the full ESPNet's decoder, upsampling back to
full resolution, is not included). Output grid: the PSPNet teacher's (65 x 65 for 512 x 512).
The official ESPNet-C checkpoints (network/ESPnet.py, ESPNet_Encoder p=2, q=8) map onto it by name
(models/weights.py); concatenations follow its order."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import check_width, init_weights, scaled


def bn_prelu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels, eps=1e-3), nn.PReLU(channels))


class ESPBlock(nn.Module):
    """Reduce (1x1, or a strided 3x3 when downsampling) to n channels, five parallel dilated 3x3 convs
    (dilations 1, 2, 4, 8, 16), hierarchical sums (which remove the gridding artefacts of plain
    concatenation), concatenate to out_ch; residual when shapes allow. (B, in_ch, h, w) ->
    (B, out_ch, h/stride, w/stride)."""

    DILATIONS = (1, 2, 4, 8, 16)

    def __init__(self, in_ch: int, out_ch: int, downsample: bool = False, ceil_mode: bool = False):
        super().__init__()
        self.ceil_mode = ceil_mode  # pad one row/column at the end: h -> floor(h/2) + 1
        n = max(1, out_ch // 5)
        first = out_ch - 4 * n  # the d=1 branch takes the remainder so channels add up to out_ch
        self.reduce = (nn.Conv2d(in_ch, n, 3, stride=2, padding=1, bias=False) if downsample
                       else nn.Conv2d(in_ch, n, 1, bias=False))
        self.branches = nn.ModuleList(
            nn.Conv2d(n, first if d == 1 else n, 3, padding=d, dilation=d, bias=False) for d in self.DILATIONS)
        self.residual = not downsample and in_ch == out_ch
        self.out = bn_prelu(out_ch)

    def forward(self, x):
        reduced = self.reduce(F.pad(x, (0, 1, 0, 1)) if self.ceil_mode else x)
        outputs = [self.branches[0](reduced)]
        fused = None
        for branch in self.branches[1:]:
            y = branch(reduced)
            fused = y if fused is None else fused + y
            outputs.append(fused)
        y = torch.cat(outputs, dim=1)
        return self.out(y + x if self.residual else y)


class ESPNetC(nn.Module):
    """forward(images (B, 3, H, W)) -> [logits (B, K, h, w), None, features (B, 256 * width, h, w), None,
    level3 (B, 128 * width, h, w), level2 (stride 4), level1 (stride 2)], (h, w) = output_size(H), output_size(W).

    alpha2, alpha3: ESP blocks at levels 2 and 3 (the paper's ESPNet-C uses 2 and 8)."""

    def __init__(self, num_classes: int, width: float = 1.0, alpha2: int = 2, alpha3: int = 8):
        super().__init__()
        width = check_width(width)
        c1, c2, c3 = scaled(16, width), scaled(64, width, 5), scaled(128, width, 5)
        self.level1 = nn.Sequential(nn.Conv2d(3, c1, 3, stride=2, padding=1, bias=False), *bn_prelu(c1))
        self.b1 = bn_prelu(c1 + 3)
        # Ceil-mode downsampling at stride 4, as in the PSPNet stem: the teacher's output grid.
        self.level2_0 = ESPBlock(c1 + 3, c2, downsample=True, ceil_mode=True)
        self.level2 = nn.Sequential(*(ESPBlock(c2, c2) for _ in range(alpha2)))
        self.b2 = bn_prelu(2 * c2 + 3)
        self.level3_0 = ESPBlock(2 * c2 + 3, c3, downsample=True)
        self.level3 = nn.Sequential(*(ESPBlock(c3, c3) for _ in range(alpha3)))
        self.b3 = bn_prelu(2 * c3)
        self.classifier = nn.Conv2d(2 * c3, num_classes, 1, bias=False)
        init_weights(self)

    @property
    def ceil_mode(self) -> bool:
        """True (default): the teacher's grid (512 -> 65); False: the official ESPNet-C's (512 -> 64)."""
        return self.level2_0.ceil_mode

    @ceil_mode.setter
    def ceil_mode(self, value: bool) -> None:
        self.level2_0.ceil_mode = bool(value)

    def forward(self, images):
        # Input reinforcement: the image, average-pooled to each level's size, joins its features.
        half = F.avg_pool2d(images, 3, stride=2, padding=1)
        quarter = F.avg_pool2d(half, 3, stride=2, padding=1, ceil_mode=self.ceil_mode)
        level1 = self.b1(torch.cat([self.level1(images), half], dim=1))
        down2 = self.level2_0(level1)
        level2 = self.b2(torch.cat([self.level2(down2), down2, quarter], dim=1))  # the official order
        down3 = self.level3_0(level2)
        level3 = self.level3(down3)
        features = self.b3(torch.cat([down3, level3], dim=1))
        return [self.classifier(features), None, features, None, level3, level2, level1]
