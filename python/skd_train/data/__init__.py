"""Datasets of the reference trainer. Every dataset maps an index to (image float32 (3, h, w)
normalised with the ImageNet mean/std, label int64 (h, w)) with ignored pixels = ds.ignore_index, and
carries num_classes, ignore_index and class_names."""
from __future__ import annotations

from .ade20k import ADE20K
from .base import SegmentationDataset
from .brain import BrainTissue
from .camvid import CamVid
from .cityscapes import Cityscapes
from .procedural import Procedural
from .transforms import MEAN, STD, denormalize

_ON_DISK = {"cityscapes": Cityscapes, "camvid": CamVid, "ade20k": ADE20K}
_EMBEDDED = {"brain": BrainTissue, "procedural": Procedural}
DATASET_NAMES = tuple(_ON_DISK) + tuple(_EMBEDDED)
DEFAULT_DATASET = "brain"


def build_dataset(name: str, root=None, split: str = "train", crop_size=..., augment: bool = True,
                  seed: int = 0, **options) -> SegmentationDataset:
    """A dataset by name.

    name: "cityscapes", "camvid", "ade20k" (read from `root`, the folder holding the dataset's usual
    layout), "brain" (the embedded default: MNI152 brain tissue, 3 classes, no download) or "procedural"
    (synthetic shapes, 4 classes). split: "train" / "val" (and "test" where the dataset has it).
    crop_size: (h, w) of every sample; None: whole images (batch them only without augment); omitted:
    the dataset's default (cityscapes 512 x 512, camvid 360 x 480, ade20k 512 x 512, brain 192 x 160 out of
    its 233 x 197 slices, procedural 64 x 64).
    augment: random scale, crop and flip (deterministic given seed, the epoch (ds.set_epoch) and index).
    options: scale_range=(low, high); for "procedural" also num_samples and image_size."""
    if crop_size is not ...:
        options["crop_size"] = crop_size
    if name in _ON_DISK:
        if root is None:
            raise ValueError(f"dataset {name!r} is read from disk: pass root=<the folder that holds it>")
        return _ON_DISK[name](root, split=split, augment=augment, seed=seed, **options)
    if name in _EMBEDDED:
        return _EMBEDDED[name](split=split, augment=augment, seed=seed, **options)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


__all__ = ["build_dataset", "DATASET_NAMES", "DEFAULT_DATASET", "SegmentationDataset", "Cityscapes", "CamVid",
           "ADE20K", "BrainTissue", "Procedural", "MEAN", "STD", "denormalize"]
