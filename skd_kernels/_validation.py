"""Input checks shared by every op. Each op calls these once, before dispatch, so every backend
sees validated input and every error names the argument and what was expected."""
from __future__ import annotations

import math
import operator
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(name: str, tensor, ndim: int, layout: str) -> None:
    """`tensor` must be a floating-point tensor of rank `ndim` (described as `layout`, e.g. "(B, K, H, W)")."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d {layout}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Same device and dtype."""
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move them to one device")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; cast them to one dtype")


def check_labels(labels, like: torch.Tensor, spatial: tuple, ignore_index) -> None:
    """Integer label map (B, H, W) matching the logits `like` of shape (B, K, H, W), whose dtype can
    hold `ignore_index` (an int8 map never equals 255: every pixel would count, silently)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor (B, H, W) or None, got {type(labels).__name__}")
    expected = (like.shape[0], *spatial)
    if labels.dim() != 3 or tuple(labels.shape) != expected:
        raise ValueError(f"labels must have shape (B, H, W) = {expected}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != like.device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {like.device}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}") from None
    limits = torch.iinfo(labels.dtype)
    if not limits.min <= ignore_index <= limits.max:
        raise ValueError(f"ignore_index={ignore_index} cannot occur in labels of dtype {labels.dtype} "
                         f"(values {limits.min}..{limits.max}), so no pixel would be ignored; "
                         f"use labels of a wider dtype (e.g. labels.long()) or another ignore_index")


def check_nonempty_batch(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{name} must hold a batch of at least one sample, got shape {tuple(tensor.shape)}")


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the discriminator is on {device}; move it there")


def check_score_maps(name: str, maps, channels: int, device: torch.device) -> None:
    """Discriminator input: float score maps (B, `channels`, H, W) with B >= 1, on `device`."""
    check_float_tensor(name, maps, 4, f"(B, {channels}, H, W)")
    check_nonempty_batch(name, maps)
    if maps.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, as the discriminator was built for, got shape "
                         f"{tuple(maps.shape)}")
    check_device(name, maps, device)


def check_positive(name: str, value) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_finite_number(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_scale(scale) -> float:
    """The pair-wise node fraction: the official window is int(H*scale) x int(W*scale) of an H x W map,
    so only 0 < scale <= 1 makes nodes; above 1 the window exceeds the map (one node, a loss of 0)."""
    value = float(scale)
    if not (0 < value <= 1):
        raise ValueError(f"scale must be in (0, 1] (the node window is int(H*scale) x int(W*scale)), got {scale}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def finite_checks_enabled() -> bool:
    """NaN/inf checks cost a host sync, so they are opt-in: SKD_CHECK_FINITE=1."""
    return os.environ.get("SKD_CHECK_FINITE", "0") not in ("", "0")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if finite_checks_enabled() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf (SKD_CHECK_FINITE=1 is set)")
