"""The dataset base class: a list of samples, a raw loader per subclass, the shared transform, and
per-sample random streams so that augmentation is deterministic given (seed, epoch, index) whatever
the DataLoader's workers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.utils.data

from .readers import read_label, read_rgb
from .transforms import SegTransform


class SegmentationDataset(torch.utils.data.Dataset):
    """ds[i] -> (image float32 (3, h, w) normalised, label int64 (h, w)); pixels to ignore hold
    ds.ignore_index. Subclasses set num_classes, class_names and implement __len__ and load(i) ->
    (image uint8 (H, W, 3), label integer (H, W) already in train ids)."""

    num_classes: int
    class_names: tuple
    ignore_index = 255
    default_scale_range = (0.5, 2.0)

    def __init__(self, split, crop_size, augment, seed, scale_range=None):
        # ints and NumPy integers; not floats or bools
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.split, self.seed, self.epoch = split, int(seed), 0
        self.transform = SegTransform(crop_size, augment, scale_range or self.default_scale_range,
                                      self.ignore_index)

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations for a new epoch (still reproducible). DataLoader workers hold copies:
        call it before iterating, without persistent_workers, so that new workers see it."""
        self.epoch = int(epoch)

    def load(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        image, label = self.load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform(image, label, rng)


class PairedFilesDataset(SegmentationDataset):
    """Images and label maps on disk; `label_lut` (256 entries) maps stored label values to train ids."""

    label_lut: np.ndarray

    def __init__(self, pairs, split, crop_size, augment, seed, scale_range=None):
        super().__init__(split, crop_size, augment, seed, scale_range)
        self.pairs = list(pairs)

    def __len__(self):
        return len(self.pairs)

    def load(self, index):
        image_path, label_path = self.pairs[index]
        image, label = read_rgb(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{label_path} is {label.shape} but its image {image_path} is {image.shape[:2]}")
        return image, self.label_lut[label]


def lut(mapping: dict, ignore_index: int = 255) -> np.ndarray:
    """A 256-entry lookup table: stored value -> train id, everything unlisted -> ignore."""
    table = np.full(256, ignore_index, dtype=np.uint8)
    for stored, train_id in mapping.items():
        table[stored] = train_id
    return table


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {path}")
    return path


def pair_files(images, label_for, root: Path, what: str):
    """[(image, label)] for sorted `images`; raises naming the first image without a label file."""
    images = sorted(images)
    if not images:
        raise FileNotFoundError(f"{what}: no images found under {root}")
    pairs = []
    for image in images:
        label = label_for(image)
        if not label.is_file():
            raise FileNotFoundError(f"{what}: label file not found: {label} (for image {image})")
        pairs.append((image, label))
    return pairs
