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


class ConfigError(ValueError):
    """A mistake in the options; the message starts with the flag (`--data-root: ...`)."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _opt(default, help: str, choices: Optional[tuple] = None):
    """A field with its help text and allowed values: the one place they are written (--help reads them).
    Defaults are immutable (tuples, None), so the dataclass may share them."""
    return field(default=default, metadata={"help": help, "choices": choices})


# Names the options accept. The registries they mirror (skd_train.models.MODEL_NAMES,
# skd_train.data.DATASET_NAMES, skd_kernels.holistic.ADV_TYPES) import torch; tests hold them equal.
MODELS = ("pspnet_resnet101", "pspnet_resnet18", "mobilenetv2", "espnet")
DATASETS = ("cityscapes", "camvid", "ade20k", "brain", "procedural")
ON_DISK_DATASETS = ("cityscapes", "camvid", "ade20k")
ADV_TYPES = ("wgan-gp", "hinge")


@dataclass
class TrainConfig:
    # Data
    dataset: str = _opt("brain", "dataset; cityscapes, camvid and ade20k are read from --data-root", DATASETS)
    data_root: Optional[str] = _opt(None, "folder holding an on-disk dataset in its usual layout")
    crop_size: Sequence[int] = _opt((128, 128), "training crop, height and width")
    augment: bool = _opt(True, "random scale, crop and flip of the training samples")
    num_workers: int = _opt(0, "DataLoader worker processes (the data order does not depend on it)")
    dataset_options: Optional[dict] = _opt(None, "extra keyword arguments of the dataset as JSON, e.g. "
                                                 "'{\"scale_range\": [0.5, 2.0]}'")
    # Student
    model: str = _opt("pspnet_resnet18", "the student network", MODELS)
    width: float = _opt(1.0, "the student's channel multiplier (1.0: the paper's sizes)")
    pretrained_backbone: Optional[str] = _opt(None, "checkpoint whose backbone tensors initialise the student, "
                                                    "or 'imagenet' (MobileNetV2, width 1.0)")
    weights: Optional[str] = _opt(None, "initial student weights (ours or an official checkpoint); "
                                        "for eval: the weights to score")
    # Teacher (needed only when a distillation term is on)
    teacher: str = _opt("pspnet_resnet101", "the teacher network", MODELS)
    teacher_width: float = _opt(1.0, "the teacher's channel multiplier")
    teacher_weights: Optional[str] = _opt(None, "the trained teacher's weights (needed when a distillation "
                                                "term is on)")
    # Task loss: CE(main) + dsn_weight * CE(aux), both upsampled to the crop (bilinear, align_corners=True)
    dsn_weight: float = _opt(0.4, "weight of the auxiliary (deep supervision) cross-entropy")
    ohem: bool = _opt(False, "online hard example mining in the cross-entropy")
    ohem_thresh: float = _opt(0.7, "OHEM: keep pixels whose true-class probability is below this")
    ohem_min_kept: int = _opt(100000, "OHEM: keep at least this many hardest pixels")
    # Distillation switches and weights (a term is skipped entirely when off or weighted 0)
    pixel: bool = _opt(True, "pixel-wise distillation (KL of the score maps)")
    pixel_weight: float = _opt(10.0, "weight of the pixel-wise term")
    pair: bool = _opt(True, "pair-wise distillation (similarity of the feature nodes)")
    pair_weight: float = _opt(0.5, "weight of the pair-wise term")
    pair_scale: float = _opt(0.5, "pair-wise node pooling: fraction of the feature map per node side")
    holistic: bool = _opt(True, "holistic (adversarial) distillation with a discriminator")
    adv_weight: float = _opt(0.1, "weight of the student's adversarial term, -mean D(student)")
    d_weight: float = _opt(0.1, "weight of the discriminator's loss (adversarial + gradient penalty)")
    lambda_gp: float = _opt(10.0, "gradient penalty weight (wgan-gp)")
    d_conv_dim: int = _opt(64, "the discriminator's first width (official: 64)")
    adv_type: str = _opt("wgan-gp", "the discriminator's loss", ADV_TYPES)
    d_input_size: Optional[int] = _opt(None, "resize score maps to this square size before D (default: as "
                                             "they are, or 65 when smaller than D's minimum 64)")
    # Optimisation (official recipe)
    steps: int = _opt(40000, "training steps (the poly schedule spans them)")
    batch_size: int = _opt(8, "samples per step and process")
    lr: float = _opt(0.01, "the student's learning rate (SGD, poly schedule)")
    momentum: float = _opt(0.9, "the student's SGD momentum")
    weight_decay: float = _opt(5e-4, "the student's weight decay")
    poly_power: float = _opt(0.9, "power of the poly schedule, lr * (1 - step / steps) ** power")
    lr_d: float = _opt(4e-4, "the discriminator's learning rate")
    momentum_d: float = _opt(0.9, "the discriminator's SGD momentum")
    amp: str = _opt("none", "mixed precision on GPUs (fp16 uses a GradScaler)", ("none", "bf16", "fp16"))
    cuda_graph: bool = _opt(False, "replay the discriminator's step and the student's adversarial term from CUDA "
                                   "graphs captured at the first step (GPU only; the D input's shape must not change)")
    sync_bn: bool = _opt(True, "SyncBatchNorm when distributed on GPUs")
    seed: int = _opt(0, "seed of the weights, the data order and the augmentations")
    threads: int = _opt(0, "CPU threads of torch (0: torch's default); results are reproducible for a "
                           "given seed and thread count")
    deterministic: bool = _opt(True, "deterministic algorithms (torch.use_deterministic_algorithms)")
    device: str = _opt("auto", "where to train (auto: cuda when available)", ("auto", "cpu", "cuda"))
    # Evaluation
    eval_every: int = _opt(0, "evaluate every this many steps (0: only at the end)")
    eval_mode: str = _opt("whole", "whole images, or sliding windows of --eval-crop", ("whole", "sliding"))
    eval_crop: Optional[Sequence[int]] = _opt(None, "sliding window (or whole-image centre crop), height and "
                                                    "width (default: --crop-size for sliding)")
    eval_stride_ratio: float = _opt(2 / 3, "sliding windows start every this fraction of the window")
    eval_split: str = _opt("val", "the split scored at evaluation")
    # Output, checkpoints, logging
    out_dir: str = _opt("runs/default", "folder of last.pt, model.pt, log.csv, config.json, results.json")
    ckpt_every: int = _opt(0, "save last.pt every this many steps (0: only at the end)")
    resume: bool = _opt(False, "continue from --out-dir/last.pt (the options must be the checkpoint's)")
    log_every: int = _opt(1, "average the losses over this many steps per log.csv row")
    progress: bool = _opt(True, "show a progress bar")
    plot: bool = _opt(True, "plot the loss curves to curves.png (needs matplotlib)")
    stop_after: int = _opt(0, "testing aid: exit abruptly after this step, as if killed (0: off)")

    def distill_terms(self) -> dict:
        """The distillation terms that run, with their weights (off or 0-weighted terms are absent)."""
        terms = {"pixel": (self.pixel, self.pixel_weight), "pair": (self.pair, self.pair_weight),
                 "holistic": (self.holistic, self.adv_weight)}
        return {name: w for name, (on, w) in terms.items() if on and w != 0}

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> "TrainConfig":
        """Check the values; raises ConfigError naming the flag."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{flag(f.name)}: expected one of {', '.join(choices)}, "
                                  f"got {getattr(self, f.name)!r}")
        for name in ("crop_size", "eval_crop"):
            value = getattr(self, name)
            if value is not None:
                if len(tuple(value)) != 2 or any(int(c) < 1 for c in value):
                    raise ConfigError(f"{flag(name)}: expected a height and a width >= 1, got {value!r}")
                setattr(self, name, tuple(int(c) for c in value))
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)}: expected >= 1, got {getattr(self, name)}")
        for name in ("threads", "num_workers", "eval_every", "ckpt_every", "stop_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)}: expected >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every: expected >= 1, got {self.log_every}")
        if self.cuda_graph and self.device == "cpu":
            raise ConfigError("--cuda-graph: CUDA graphs need a GPU; this run has --device cpu")
        if self.cuda_graph and "holistic" not in self.distill_terms():
            raise ConfigError("--cuda-graph: captures the holistic term's steps, which this run does not have "
                              "(--holistic with a non-zero --adv-weight)")
        if self.dataset in ON_DISK_DATASETS and not self.data_root:
            raise ConfigError(f"--data-root: dataset {self.dataset!r} is read from disk; give the folder that "
                              f"holds it (or --dataset brain / procedural, which need no files)")
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
        raise ConfigError(f"--config {path}: unknown options {unknown}; known: {sorted(FIELDS)}")
    return data


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def _flag_type(f: dataclasses.Field) -> dict:
    default = f.default
    if f.name in ("crop_size", "eval_crop"):
        return dict(type=int, nargs=2, metavar=("H", "W"))
    if isinstance(default, bool):
        return dict(action=argparse.BooleanOptionalAction)
    if isinstance(default, (int, float)):
        return dict(type=type(default))
    if f.name == "d_input_size":
        return dict(type=int)
    if f.name == "dataset_options":
        return dict(type=_json_object, metavar="JSON")
    return dict(type=str)


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return str(value) if len(str(value)) <= 8 else f"{value:.4g}"
    return "none" if value is None else str(value)


def flag_help(f: dataclasses.Field) -> str:
    """The field's help text with its default; argparse lists the choices itself."""
    return f"{f.metadata['help']} (default: {_default_text(f.default)})".replace("%", "%%")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (`--pixel-weight`, `--pixel/--no-pixel`, ...); defaults None = not given."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML/TOML/JSON file of options named as the flags, with _ for - (flags override it)")
    group = parser.add_argument_group("options (override the config file)")
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices")
        group.add_argument(flag(f.name), dest=f.name, default=None, help=flag_help(f),
                           **({"choices": choices} if choices else {}), **_flag_type(f))


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
        raise ConfigError(f"unknown options {unknown}; known: {sorted(FIELDS)}")
    return TrainConfig(**values).validate()
