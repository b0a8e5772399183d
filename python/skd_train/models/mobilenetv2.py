"""MobileNetV2 student: the ImageNet network with torchvision's module layout (`backbone.features.0`
.. `features.18`, so torchvision's ImageNet weights load by name), dilated to output stride 8 (the
stride-2 blocks 7 and 14 keep stride 1 and the blocks after them dilate 2 and 4), then a light PSP head
(128 channels) and a DSN head on block 13 (96 channels)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .heads import PSPModule, dsn_head
from .layers import check_width, init_weights, scaled

# expansion t, channels c, repeats n, stride s: the ImageNet MobileNetV2 (Sandler et al. 2018, table 2).
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
# Output stride 8: from features.7 on, strides become dilations (7..13 dilate 2, 14..17 dilate 4).
DILATION_FROM = {7: 2, 14: 4}
# The stride-4 block mimics the teacher's ceil-mode max-pool so that every model has the teacher's
# output grid (65 x 65 for 512 x 512) and logits and features compare position by position.
CEIL_MODE_BLOCK = 2
STAGE_ENDS = (4, 7, 14, 19)  # features[:4] stride 4 (24 ch), [4:7] stride 8 (32), [7:14] (96), [14:] (1280)


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding, so width 1.0 gives exactly its shapes."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def conv_bn_relu6(in_ch, out_ch, kernel=3, stride=1, dilation=1, groups=1):
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """ceil_mode: pad one zero row and column at the end before the strided depthwise conv, so that
    the block downsamples h -> floor(h/2) + 1 like the PSPNet stem's ceil-mode max-pool."""

    def __init__(self, inp, oup, stride, expand_ratio, dilation=1, ceil_mode=False):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        self.ceil_mode = ceil_mode
        layers = [conv_bn_relu6(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.ceil_mode:
            return self.conv[2:](self.conv[1](F.pad(self.conv[0](x), (0, 1, 0, 1))))
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Backbone(nn.Module):
    """forward(x (B, 3, H, W)) -> (stage1 at stride 4, stage2, stage3, stage4 at stride 8)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        in_ch = make_divisible(32 * width)
        self.last_channels = make_divisible(1280 * max(1.0, width))
        features = [conv_bn_relu6(3, in_ch, stride=2)]
        dilation = 1
        for t, c, n, s in SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                index = len(features)
                stride = s if i == 0 else 1
                if index in DILATION_FROM:
                    # The first block of a dilated stage keeps the previous dilation (DeepLab's rule).
                    stride, block_dilation, dilation = 1, dilation, DILATION_FROM[index]
                else:
                    block_dilation = dilation
                features.append(InvertedResidual(in_ch, out_ch, stride, t, block_dilation,
                                                 ceil_mode=index == CEIL_MODE_BLOCK))
                in_ch = out_ch
        features.append(conv_bn_relu6(in_ch, self.last_channels, 1))
        self.features = nn.Sequential(*features)
        self.channels = tuple(features[end - 1].conv[-1].num_features if end < 19 else self.last_channels
                              for end in STAGE_ENDS)

    def forward(self, x):
        stages, start = [], 0
        for end in STAGE_ENDS:
            x = self.features[start:end](x)
            stages.append(x)
            start = end
        return tuple(stages)


class MobileNetV2Seg(nn.Module):
    """forward(images (B, 3, H, W)) -> [logits, dsn_logits, psp_features, stage4, stage3, stage2, stage1]
    with logits (B, K, h, w) and psp_features (B, 128 * width, h, w), (h, w) = output_size(H), output_size(W)."""

    def __init__(self, num_classes: int, width: float = 1.0):
        super().__init__()
        width = check_width(width)
        self.backbone = MobileNetV2Backbone(width)
        c3, c4 = self.backbone.channels[2], self.backbone.channels[3]
        head_channels = scaled(128, width)
        self.pspmodule = PSPModule(c4, head_channels)
        self.head = nn.Conv2d(head_channels, num_classes, 1, bias=True)
        self.dsn = dsn_head(c3, head_channels, num_classes)
        init_weights(self)

    def forward(self, images):
        s1, s2, s3, s4 = self.backbone(images)
        features = self.pspmodule(s4)
        return [self.head(features), self.dsn(s3), features, s4, s3, s2, s1]
