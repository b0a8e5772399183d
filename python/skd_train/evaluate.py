"""Evaluation: whole-image or sliding-window inference, confusion matrix, mIoU and per-class IoU."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .metrics import confusion_matrix, iou_from_confusion, mean_iou, pixel_accuracy


def logits_at(model, images: torch.Tensor) -> torch.Tensor:
    """The model's main logits upsampled to the input size (bilinear, align_corners=True as in training).

    images (B, 3, H, W) -> (B, K, H, W) float32.
    """
    out = model(images)
    logits = out[0] if isinstance(out, (list, tuple)) else out
    return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=True)


def sliding_window_logits(model, images: torch.Tensor, num_classes: int, window: Sequence[int],
                          stride_ratio: float = 2 / 3) -> torch.Tensor:
    """Average of the softmax-free logits of overlapping windows (images smaller than the window are padded).

    images (B, 3, H, W) -> (B, K, H, W). Windows start every `stride_ratio * window` pixels and the last
    one is aligned with the border, so every pixel is covered.
    """
    b, _, h, w = images.shape
    wh, ww = window
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    padded = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
    H, W = padded.shape[-2:]
    sh, sw = max(1, int(wh * stride_ratio)), max(1, int(ww * stride_ratio))
    rows = sorted({min(i * sh, H - wh) for i in range(math.ceil(max(H - wh, 0) / sh) + 1)})
    cols = sorted({min(j * sw, W - ww) for j in range(math.ceil(max(W - ww, 0) / sw) + 1)})
    total = images.new_zeros(b, num_classes, H, W, dtype=torch.float32)
    count = images.new_zeros(1, 1, H, W, dtype=torch.float32)
    for y in rows:
        for x in cols:
            total[:, :, y:y + wh, x:x + ww] += logits_at(model, padded[:, :, y:y + wh, x:x + ww])
            count[:, :, y:y + wh, x:x + ww] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def evaluate(model, loader, num_classes: int, ignore_index: int = 255, *, mode: str = "whole",
             window: Optional[Sequence[int]] = None, stride_ratio: float = 2 / 3,
             device: Optional[torch.device] = None, class_names: Optional[Sequence[str]] = None,
             distributed: bool = False) -> dict:
    """Run the model over `loader` ((images, labels) batches) in eval mode and score it.

    Returns {"miou", "pixel_acc", "iou": [per class, NaN for absent classes], "confusion": (K, K) tensor,
    "class_names"}. With `distributed`, the confusion matrices of all ranks are summed.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if mode == "sliding":
            logits = sliding_window_logits(model, images, num_classes, window or images.shape[-2:], stride_ratio)
        elif mode == "whole":
            logits = logits_at(model, images)
        else:
            raise ValueError(f"mode: expected 'whole' or 'sliding', got {mode!r}")
        cm += confusion_matrix(logits.argmax(1), labels, num_classes, ignore_index)
    if distributed:
        torch.distributed.all_reduce(cm)
    model.train(was_training)
    cm = cm.cpu()
    return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm), "iou": iou_from_confusion(cm).tolist(),
            "confusion": cm, "class_names": list(class_names) if class_names else None}
