"""Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine/{split}/{city}/*_gtFine_labelIds.png,
label ids mapped to the 19 train ids (everything else ignored, 255)."""
from __future__ import annotations

from pathlib import Path

from .base import PairedFilesDataset, lut, pair_files, require_dir

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
               "motorcycle", "bicycle")
# Cityscapes label id -> train id (cityscapesScripts' labels.py).
ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                  25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPLITS = ("train", "val", "test")


class Cityscapes(PairedFilesDataset):
    num_classes = 19
    class_names = CLASS_NAMES
    label_lut = lut(ID_TO_TRAIN_ID)
    default_scale_range = (0.7, 2.1)  # the official recipe's range (SKD.md)

    def __init__(self, root, split="train", crop_size=(512, 512), augment=True, seed=0, scale_range=None):
        if split not in SPLITS:
            raise ValueError(f"cityscapes split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        images_dir = require_dir(root / "leftImg8bit" / split, "cityscapes images")
        labels_dir = require_dir(root / "gtFine" / split, "cityscapes labels")

        def label_for(image: Path) -> Path:
            stem = image.name[: -len("_leftImg8bit.png")]
            return labels_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"

        pairs = pair_files(images_dir.glob("*/*_leftImg8bit.png"), label_for, images_dir, "cityscapes")
        super().__init__(pairs, split, crop_size, augment, seed, scale_range)
