"""The usual segmentation augmentation, identical for every dataset: random scale (image bilinear,
label nearest at the same pixel centres), padding to the crop size (image with the mean, label with
ignore), random crop, horizontal flip, mean/std normalisation. Without augmentation: pad and centre-crop
(or the whole image when crop_size is None)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics of RGB in [0, 1]: what the torchvision MobileNetV2 weights expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class SegTransform:
    """__call__(image uint8 (H, W, 3), label integer (H, W), rng np.random.Generator) ->
    (image float32 (3, h, w) normalised, label int64 (h, w)); (h, w) = crop_size, or (H, W) if None."""

    def __init__(self, crop_size=None, augment=True, scale_range=(0.5, 2.0), ignore_index=255,
                 mean=MEAN, std=STD, flip=True):
        if crop_size is not None:
            crop_size = tuple(int(c) for c in crop_size)
            if len(crop_size) != 2 or min(crop_size) < 1:
                raise ValueError(f"crop_size must be (h, w) with positive sides or None, got {crop_size}")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.crop_size, self.augment, self.scale_range = crop_size, augment, (lo, hi)
        self.ignore_index, self.flip = ignore_index, flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        img = (img - self.mean) / self.std  # before padding, so the image pads with the mean (0)
        lab = torch.from_numpy(np.asarray(label, dtype=np.int64))
        if self.augment:
            scale = rng.uniform(*self.scale_range)
            size = (max(1, round(lab.shape[0] * scale)), max(1, round(lab.shape[1] * scale)))
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            # nearest-exact samples the pixel centres that bilinear (align_corners=False) uses.
            lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        if self.crop_size is not None:
            img, lab = self._crop(img, lab, rng)
        if self.augment and self.flip and rng.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return img.contiguous(), lab.contiguous()

    def _crop(self, img, lab, rng):
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - lab.shape[0], 0), max(cw - lab.shape[1], 0)
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=self.ignore_index)
        h, w = lab.shape
        if self.augment:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        return img[:, top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]
