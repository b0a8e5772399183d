"""The usual segmentation augmentation, identical for every dataset: random scale (image bilinear,
label nearest at the same pixel centres), padding to the crop size (image with the mean, label with
ignore), random crop, horizontal flip, mean/std normalisation. Without augmentation: pad and centre-crop
(or the whole image when crop_size is None).

Written in NumPy on purpose: one sample is small, and torch's intra-op threads only contend with the
training step for the cores (a 233 x 197 slice took 5 ms on one thread, 100 ms on two busy ones)."""
from __future__ import annotations

import numpy as np
import torch

# ImageNet statistics of RGB in [0, 1]: what the torchvision MobileNetV2 weights expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _source_index(out_size: int, in_size: int):
    """Bilinear taps along one axis, as torch's interpolate(mode="bilinear", align_corners=False)."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, size) -> np.ndarray:
    """float (H, W, C) -> (h, w, C); matches torch's bilinear, align_corners=False."""
    (y0, y1, wy), (x0, x1, wx) = _source_index(size[0], image.shape[0]), _source_index(size[1], image.shape[1])
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def resize_nearest(label: np.ndarray, size) -> np.ndarray:
    """(H, W) -> (h, w) sampling the pixel centres bilinear uses (torch's "nearest-exact")."""
    def index(out_size, in_size):
        return np.minimum(((np.arange(out_size) + 0.5) * (in_size / out_size)).astype(np.int64), in_size - 1)
    return label[index(size[0], label.shape[0])[:, None], index(size[1], label.shape[1])[None, :]]


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
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        # Normalise before padding, so that the image pads with the mean (0).
        img = (np.asarray(image, np.float32) / 255 - self.mean) / self.std
        lab = np.asarray(label, np.int64)
        if self.augment:
            scale = rng.uniform(*self.scale_range)
            size = (max(1, round(lab.shape[0] * scale)), max(1, round(lab.shape[1] * scale)))
            img, lab = resize_bilinear(img, size), resize_nearest(lab, size)
        if self.crop_size is not None:
            img, lab = self._crop(img, lab, rng)
        if self.augment and self.flip and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        image_t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        return image_t, torch.from_numpy(np.ascontiguousarray(lab))

    def _crop(self, img, lab, rng):
        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - lab.shape[0], 0), max(cw - lab.shape[1], 0)
        if pad_h or pad_w:
            img = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)))
            lab = np.pad(lab, ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        h, w = lab.shape
        if self.augment:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        return img[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]


def denormalize(image: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """Undo the normalisation for display: image (3, h, w) -> uint8 (h, w, 3)."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(1, 2, 0).numpy()
