"""The embedded default dataset: brain tissue segmentation on the MNI152 2009a symmetric template
that nilearn ships (T1 plus grey- and white-matter probability maps, 197 x 233 x 189 at 1 mm).

Each axial slice with more than 5 % brain is a sample: image = the T1 slice (anterior up) as three equal
channels; label = argmax over (1 - gm - wm, gm, wm): 0 background (outside the brain, and the CSF and ventricles
inside it), 1 grey matter, 2 white matter.
Train and val are interleaved blocks of 8 slices (every 5th block is val), with the 2 slices next to a
val block left out of train, so neighbouring, nearly identical slices never sit on both sides.
Decoded slices are cached in an .npz (see cache_dir) so later runs need neither nibabel nor decoding."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .base import SegmentationDataset

CLASS_NAMES = ("background", "grey matter", "white matter")
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MIN_BRAIN_FRACTION = 0.05
BLOCK, VAL_EVERY, VAL_BLOCK, GUARD = 8, 5, 2, 2
CACHE_NAME = "brain_mni152_2009a_v1.npz"


def cache_dir() -> Path:
    """$SKD_TRAIN_CACHE, else $XDG_CACHE_HOME/skd_train, else ~/.cache/skd_train."""
    if os.environ.get("SKD_TRAIN_CACHE"):
        return Path(os.environ["SKD_TRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skd_train"


def template_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (its import is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'brain' dataset needs nilearn's MNI152 template: "
                          "pip install nilearn==0.14.1 nibabel")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    for kind in ("t1", "gm", "wm"):
        if not (folder / TEMPLATE.format(kind)).is_file():
            raise FileNotFoundError(f"brain dataset: template file not found: {folder / TEMPLATE.format(kind)}")
    return folder


def decode_slices():
    """(images uint8 (N, 233, 197), labels uint8 (N, 233, 197), z int (N,)) from the template."""
    try:
        import nibabel
    except ImportError as err:
        raise ImportError("the 'brain' dataset needs nibabel to read the template: pip install nibabel") from err
    folder = template_dir()
    t1, gm, wm = (np.asarray(nibabel.load(folder / TEMPLATE.format(k)).dataobj) for k in ("t1", "gm", "wm"))
    gm, wm = gm.astype(np.float32) / 255, wm.astype(np.float32) / 255
    labels = np.argmax(np.stack([1 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    # RAS voxel axes: z (axis 2) is the axial slice; transpose and flip y so that anterior is up.
    def axial(volume):
        return np.ascontiguousarray(volume[:, ::-1, :].transpose(2, 1, 0))
    t1, labels = axial(t1.astype(np.uint8)), axial(labels)
    z = np.nonzero((labels > 0).mean(axis=(1, 2)) > MIN_BRAIN_FRACTION)[0]
    return t1[z], labels[z], z


def load_slices():
    """The decoded slices, from the cache when present (written atomically on first use)."""
    path = cache_dir() / CACHE_NAME
    if path.is_file():
        try:
            with np.load(path) as data:
                return data["images"], data["labels"], data["z"]
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is rebuilt below
    images, labels, z = decode_slices()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=images, labels=labels, z=z)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still works, just without the cache
    return images, labels, z


def split_positions(count: int, split: str) -> np.ndarray:
    """Positions (0..count-1, in slice order) of the slices in `split` ("train", "val" or "all")."""
    position = np.arange(count)
    is_val = (position // BLOCK) % VAL_EVERY == VAL_BLOCK
    if split == "val":
        return position[is_val]
    if split == "all":
        return position
    val = position[is_val]
    near_val = np.abs(position[:, None] - val[None, :]).min(axis=1) <= GUARD if len(val) else np.zeros(count, bool)
    return position[~near_val]


class BrainTissue(SegmentationDataset):
    """ds[i] -> (image float32 (3, h, w), label int64 (h, w)); 3 classes; raw slices 233 x 197."""

    num_classes = 3
    class_names = CLASS_NAMES
    default_scale_range = (0.75, 1.25)

    def __init__(self, split="train", crop_size=(192, 160), augment=True, seed=0, scale_range=None):
        if split not in ("train", "val", "all"):
            raise ValueError(f"brain split must be 'train', 'val' or 'all', got {split!r}")
        super().__init__(split, crop_size, augment, seed, scale_range)
        images, labels, z = load_slices()
        keep = split_positions(len(z), split)
        self.images, self.labels, self.z = images[keep], labels[keep], z[keep]

    def __len__(self):
        return len(self.z)

    def load(self, index):
        return np.repeat(self.images[index][..., None], 3, axis=2), self.labels[index]
