"""CamVid in the SegNet layout: {split}/*.png with {split}annot/*.png, 11 classes, void (11) ignored."""
from __future__ import annotations

from pathlib import Path

from .base import PairedFilesDataset, lut, pair_files, require_dir

CLASS_NAMES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
               "pedestrian", "bicyclist")
SPLITS = ("train", "val", "test")


class CamVid(PairedFilesDataset):
    num_classes = 11
    class_names = CLASS_NAMES
    label_lut = lut({k: k for k in range(11)})  # 11 (void) and anything else -> 255

    def __init__(self, root, split="train", crop_size=(360, 480), augment=True, seed=0, scale_range=None):
        if split not in SPLITS:
            raise ValueError(f"camvid split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        images_dir = require_dir(root / split, "camvid images")
        labels_dir = require_dir(root / f"{split}annot", "camvid labels")
        pairs = pair_files(images_dir.glob("*.png"), lambda image: labels_dir / image.name, images_dir, "camvid")
        super().__init__(pairs, split, crop_size, augment, seed, scale_range)
