"""A synthetic dataset for tests and smoke runs: discs, squares and triangles with striped textures on
a textured, noisy background. Sample i of a split is a pure function of (seed, split, i)."""
from __future__ import annotations

import numpy as np

from .base import SegmentationDataset

CLASS_NAMES = ("background", "disc", "square", "triangle")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def _stripes(rng, h, w):
    """A random two-colour stripe texture, float (h, w, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
    wave = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    return a + wave[..., None] * (b - a)


def _shape_mask(rng, kind, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    size = rng.uniform(0.12, 0.3) * min(h, w)
    cy, cx = rng.uniform(size, h - size), rng.uniform(size, w - size)
    if kind == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= size ** 2
    if kind == 2:
        return (np.abs(yy - cy) <= size) & (np.abs(xx - cx) <= size)
    # Upright isosceles triangle: below the apex, inside the two slanted edges.
    dy = yy - (cy - size)
    return (dy >= 0) & (dy <= 2 * size) & (np.abs(xx - cx) <= dy / 2)


def render(rng: np.random.Generator, height: int, width: int):
    """(image uint8 (H, W, 3), label uint8 (H, W)) with 1 to 4 shapes; later shapes occlude earlier."""
    image = _stripes(rng, height, width)
    label = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(1, 4))
        mask = _shape_mask(rng, kind, height, width)
        image[mask] = _stripes(rng, height, width)[mask]
        label[mask] = kind
    image = image + rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


class Procedural(SegmentationDataset):
    """ds[i] -> (image float32 (3, h, w), label int64 (h, w)); 4 classes; samples rendered at
    `image_size` (default: the crop size, else 64 x 64)."""

    num_classes = 4
    class_names = CLASS_NAMES
    default_scale_range = (0.75, 1.5)

    def __init__(self, split="train", crop_size=(64, 64), augment=True, seed=0, scale_range=None,
                 num_samples=None, image_size=None):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"procedural split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
        super().__init__(split, crop_size, augment, seed, scale_range)
        self.num_samples = int(num_samples if num_samples is not None else (64 if split == "train" else 16))
        self.image_size = tuple(image_size or crop_size or (64, 64))

    def __len__(self):
        return self.num_samples

    def load(self, index):
        rng = np.random.default_rng([self.seed, SPLIT_STREAMS[self.split], index])
        return render(rng, *self.image_size)
