"""Training configuration: one flat dataclass, loaded from YAML/JSON/TOML, overridden on the command line.

Flat on purpose: every field is one command-line flag (`--pixel-weight 5`, `--no-holistic`), so a run is
fully described by a config file plus the flags shown in its log.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass
class TrainConfig:
    # Data
    dataset: str = "brain"
    data_root: Optional[str] = None
    crop_size: Sequence[int] = (128, 128)
    augment: bool = True
    num_workers: int = 0
    dataset_options: Optional[dict] = None   # extra keyword arguments of build_dataset (JSON on the command line)
    # Student
    model: str = "pspnet_resnet18"
    width: float = 1.0
    pretrained_backbone: Optional[str] = None
    weights: Optional[str] = None            # initial student weights (load_weights format)
    # Teacher (needed only when a distillation term is on)
    teacher: str = "pspnet_resnet101"
    teacher_width: float = 1.0
    teacher_weights: Optional[str] = None
    # Task loss: CE(main) + dsn_weight * CE(aux), both upsampled to the crop (bilinear, align_corners=True)
    dsn_weight: float = 0.4
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    # Distillation switches and weights (a term is skipped entirely when off or weighted 0)
    pixel: bool = True
    pixel_weight: float = 10.0
    pair: bool = True
    pair_weight: float = 0.5
    pair_scale: float = 0.5
    holistic: bool = True
    adv_weight: float = 0.1                  # G term: adv_weight * (-mean D(student))
    d_weight: float = 0.1                    # D step: d_weight * (adversarial + GP)
    lambda_gp: float = 10.0
    d_conv_dim: int = 64                     # the discriminator's first width (official 64)
    adv_type: str = "wgan-gp"
    d_input_size: Optional[int] = None       # resize logits to this square size before D; None: as they are,
                                             # or 65 (the official size) when smaller than D's minimum 64
    # Optimisation (official recipe)
    steps: int = 40000
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    lr_d: float = 4e-4
    momentum_d: float = 0.9
    amp: str = "none"                        # none | bf16 | fp16 (GPU only; fp16 uses a GradScaler)
    sync_bn: bool = True                     # SyncBatchNorm when distributed
    seed: int = 0
    device: str = "auto"                     # auto | cpu | cuda
    # Evaluation
    eval_every: int = 0                      # 0: only at the end
    eval_mode: str = "whole"                 # whole | sliding
    eval_crop: Optional[Sequence[int]] = None  # sliding window size (default: crop_size)
    eval_stride_ratio: float = 2 / 3
    eval_split: str = "val"
    # Output, checkpoints, logging
    out_dir: str = "runs/default"
    ckpt_every: int = 0                      # 0: only at the end
    resume: bool = False                     # continue from out_dir/last.pt if it exists
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    stop_after: int = 0                      # testing aid: exit abruptly after this step (simulates a kill)

    def distill_terms(self) -> dict:
        """The distillation terms that run, with their weights (off or 0-weighted terms are absent)."""
        terms = {"pixel": (self.pixel, self.pixel_weight), "pair": (self.pair, self.pair_weight),
                 "holistic": (self.holistic, self.adv_weight)}
        return {name: w for name, (on, w) in terms.items() if on and w != 0}

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> "TrainConfig":
        if len(tuple(self.crop_size)) != 2:
            raise ValueError(f"crop_size: expected [height, width], got {self.crop_size!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp: expected 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.eval_mode not in ("whole", "sliding"):
            raise ValueError(f"eval_mode: expected 'whole' or 'sliding', got {self.eval_mode!r}")
        if self.adv_type not in ("wgan-gp", "hinge"):
            raise ValueError(f"adv_type: expected 'wgan-gp' or 'hinge', got {self.adv_type!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        self.crop_size = tuple(int(c) for c in self.crop_size)
        if self.eval_crop is not None:
            self.eval_crop = tuple(int(c) for c in self.eval_crop)
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_file(path) -> dict:
    """Read a config file: .yaml/.yml (PyYAML), .toml (tomllib), or .json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml), or use a .json/.toml config") from e
        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        import tomllib
        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: expected .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"config file {path}: unknown options {unknown}; known: {sorted(FIELDS)}")
    return data


def _flag_type(f: dataclasses.Field):
    default = f.default
    if f.name in ("crop_size", "eval_crop"):
        return dict(type=int, nargs=2, metavar=("H", "W"))
    if isinstance(default, bool):
        return dict(action=argparse.BooleanOptionalAction)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return dict(type=type(default))
    if f.name in ("d_input_size",):
        return dict(type=int)
    if f.name == "dataset_options":
        return dict(type=json.loads, metavar="JSON")
    return dict(type=str)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (`--pixel-weight`, `--pixel/--no-pixel`, ...); defaults None = not given."""
    parser.add_argument("--config", help="YAML/TOML/JSON file of options (flags override it)")
    group = parser.add_argument_group("options (override the config file)")
    for f in dataclasses.fields(TrainConfig):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, **_flag_type(f))


def build_config(args: Optional[argparse.Namespace] = None, base: Optional[dict] = None, **overrides) -> TrainConfig:
    """Defaults < `base` < config file (args.config) < flags given on the command line < `overrides`."""
    values: dict[str, Any] = dict(base or {})
    if args is not None and getattr(args, "config", None):
        values.update(load_file(args.config))
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    values.update(overrides)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown options {unknown}")
    return TrainConfig(**values).validate()
