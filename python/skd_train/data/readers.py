"""Reading images and label maps with Pillow, imported only when a file is read."""
from __future__ import annotations

import numpy as np


def _pil():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is a dependency
        raise ImportError("reading image files needs Pillow: pip install pillow") from err
    return Image


def read_rgb(path) -> np.ndarray:
    """uint8 (H, W, 3) RGB."""
    with _pil().open(path) as img:
        return np.array(img.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def read_label(path) -> np.ndarray:
    """uint8 (H, W) stored label values (palette PNGs give their indices, not colours)."""
    with _pil().open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            img = img.convert("L")
        array = np.asarray(img)
    if array.ndim != 2:
        raise ValueError(f"{path}: a label map must be single-channel, got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.max(initial=0) > 255:
            raise ValueError(f"{path}: label values above 255 are not supported")
        array = array.astype(np.uint8)
    return array
