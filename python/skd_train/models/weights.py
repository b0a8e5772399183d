"""Loading weights: our own state_dict, the official SKD repository's checkpoints (PSPNet: DataParallel
'module.' prefixes, backbone at the top level, InPlace-ABN norms without num_batches_tracked, the older
'head.0'/'head.1' and 'layer5'/'layer6' head names, its 4-module DSN; ESPNet-C: its module names) and
torchvision's MobileNetV2 ImageNet layout. Every failure names the file and the offending keys."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

# Official name -> ours, tried in order, only for keys our model does not have verbatim.
_RENAMES = (
    (re.compile(r"^head\.0\."), "pspmodule."),          # pytorch-segmentation-toolbox: head = (PSP, conv)
    (re.compile(r"^head\.1\."), "head."),
    (re.compile(r"^layer5\."), "pspmodule."),           # CVPR-branch student: layer5 = PSP, layer6 = conv
    (re.compile(r"^layer6\."), "head."),
    (re.compile(r"^dsn\.3\."), "dsn.4."),               # official dsn (conv, ABN, dropout, conv); ours has the
                                                        # activation as a module of its own
    (re.compile(r"^(conv[123]|bn[123]|layer[1-4])\."), r"backbone.\1."),  # official ResNet at top level
    (re.compile(r"^features\."), "backbone.features."),  # torchvision MobileNetV2
    # Official ESPNet-C (CBR/BR/C/CDilated wrappers with .conv/.bn/.act; DownSamplerB, ESP blocks c1, d1..d16).
    (re.compile(r"^level1\.(conv|bn|act)\."), lambda m: f"level1.{('conv', 'bn', 'act').index(m[1])}."),
    (re.compile(r"^(b[123])\.(bn|act)\."), lambda m: f"{m[1]}.{('bn', 'act').index(m[2])}."),
    (re.compile(r"^(level[23](?:_0|\.\d+))\.c1\.conv\."), r"\1.reduce."),
    (re.compile(r"^(level[23](?:_0|\.\d+))\.d(1|2|4|8|16)\.conv\."),
     lambda m: f"{m[1]}.branches.{('1', '2', '4', '8', '16').index(m[2])}."),
    (re.compile(r"^(level[23]_0)\.(bn|act)\."), lambda m: f"{m[1]}.out.{('bn', 'act').index(m[2])}."),
    (re.compile(r"^(level[23]\.\d+)\.bn\.(bn|act)\."), lambda m: f"{m[1]}.out.{('bn', 'act').index(m[2])}."),
    (re.compile(r"^classifier\.conv\."), "classifier."),
)
_SKIPPED = re.compile(r"^(fc|classifier)\.")  # ImageNet classifiers: never part of a segmentation net
_WRAPPERS = ("state_dict", "model", "model_state_dict", "student", "net")
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's name: its SHA-256 starts with b0353104
MOBILENET_V2_HASH_PREFIX = "b0353104"
MOBILENET_V2_URL = "https://download.pytorch.org/models/" + MOBILENET_V2_FILE


def read_state_dict(path) -> dict:
    """The tensors of a checkpoint file (a state_dict, or a dict holding one under 'state_dict',
    'model', ...). Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict (expected a dict of name -> tensor, "
                         f"got {type(obj).__name__})")
    return obj


def map_keys(state: dict, model_keys) -> dict:
    """Rename a foreign state_dict's keys onto `model_keys` (see _RENAMES); keys already matching are
    kept as they are, ImageNet classifier tensors are dropped."""
    model_keys = set(model_keys)
    mapped = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key not in model_keys:
            renamed = (pattern.sub(repl, key) for pattern, repl in _RENAMES)
            new = next((name for name in renamed if name in model_keys), None)
            if new is None and _SKIPPED.match(key):
                continue
            key = new or key
        mapped[key] = value
    return mapped


def _check_shapes(path, mapped: dict, own: dict) -> None:
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors have mismatched shapes (wrong model or width?): "
                         + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a whole model from `path`: our own state_dict or the official repository's format.

    Every tensor of the model must be found with its shape (BatchNorm's num_batches_tracked may be
    absent, as in InPlace-ABN checkpoints); otherwise ValueError names the file and the keys.
    Returns the model."""
    state = read_state_dict(path)
    own = model.state_dict()
    mapped = map_keys(state, own)
    _check_shapes(path, mapped, own)
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: "
                         + (f"missing {_listing(missing)}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {_listing(unexpected)}" if unexpected else ""))
    model.load_state_dict(mapped, strict=False)
    return model


def imagenet_mobilenet_v2_path(download: bool = True) -> Path:
    """torchvision's MobileNetV2 ImageNet weights, in torch's hub cache (where torchvision keeps them:
    $TORCH_HOME/hub/checkpoints); downloaded there from download.pytorch.org on first request.
    Raises FileNotFoundError saying how to provide the file when it is absent and cannot be fetched."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE
    if path.is_file():
        return path
    reason = "downloading is off"
    if download:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(MOBILENET_V2_URL, str(path), hash_prefix=MOBILENET_V2_HASH_PREFIX)
            return path
        except Exception as err:  # no network, a proxy, a bad hash: all end in the same advice
            reason = f"downloading {MOBILENET_V2_URL} failed ({type(err).__name__}: {err})"
    raise FileNotFoundError(
        f"ImageNet MobileNetV2 weights: {path} not found and {reason}; download that file to {path}, or pass "
        f"its path instead of 'imagenet' (--pretrained-backbone /path/to/{MOBILENET_V2_FILE})")


def load_backbone_weights(model: nn.Module, source) -> list:
    """Load only the backbone (`backbone.*` tensors) from a checkpoint path, or from "imagenet"
    (MobileNetV2's torchvision weights). Every backbone tensor must be present with its shape.
    Returns the loaded keys."""
    if source == "imagenet":
        if type(model).__name__ != "MobileNetV2Seg":
            raise ValueError(f"'imagenet' backbone weights exist for mobilenetv2 only, not {type(model).__name__}: "
                             f"pass a checkpoint path instead")
        path = imagenet_mobilenet_v2_path()
    else:
        path = Path(os.fspath(source))
    own = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    if not own:
        raise ValueError(f"{type(model).__name__} has no backbone to load {path} into")
    mapped = {k: v for k, v in map_keys(read_state_dict(path), own).items() if k in own}
    _check_shapes(path, mapped, own)
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path} lacks backbone tensors of {type(model).__name__}: {_listing(missing)}")
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)
