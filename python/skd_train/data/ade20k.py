"""ADE20K (SceneParsing150): ADEChallengeData2016/images/{training,validation}/*.jpg with
annotations/{training,validation}/*.png; stored 1..150 -> train ids 0..149, 0 ('other') ignored."""
from __future__ import annotations

from pathlib import Path

from .base import PairedFilesDataset, lut, pair_files, require_dir

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
SPLIT_DIRS = {"train": "training", "val": "validation"}


class ADE20K(PairedFilesDataset):
    num_classes = 150
    class_names = CLASS_NAMES
    label_lut = lut({k: k - 1 for k in range(1, 151)})  # 0 ('other') -> 255

    def __init__(self, root, split="train", crop_size=(512, 512), augment=True, seed=0, scale_range=None):
        if split not in SPLIT_DIRS:
            raise ValueError(f"ade20k split must be one of {tuple(SPLIT_DIRS)}, got {split!r}")
        base = Path(root)
        if (base / "ADEChallengeData2016").is_dir():  # accept the folder above it too
            base = base / "ADEChallengeData2016"
        images_dir = require_dir(base / "images" / SPLIT_DIRS[split], "ade20k images")
        labels_dir = require_dir(base / "annotations" / SPLIT_DIRS[split], "ade20k labels")
        pairs = pair_files(images_dir.glob("*.jpg"), lambda image: labels_dir / f"{image.stem}.png",
                           images_dir, "ade20k")
        super().__init__(pairs, split, crop_size, augment, seed, scale_range)
