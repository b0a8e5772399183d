"""Shared helpers of the trainer's tests: tiny configs on the procedural dataset, a random teacher."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from skd_train.checkpoint import atomic_save  # noqa: E402
from skd_train.config import build_config  # noqa: E402

TINY = dict(dataset="procedural", dataset_options={"num_samples": 12}, crop_size=(32, 32), batch_size=4,
            model="pspnet_resnet18", width=0.0625, teacher="pspnet_resnet18", teacher_width=0.125,
            d_conv_dim=8, steps=3, device="cpu", progress=False, plot=False, lr=0.01, threads=1)


def random_teacher(path: Path) -> str:
    """A randomly initialised teacher's weights: enough for finite, non-trivial distillation terms."""
    from skd_train.models import build_model
    torch.manual_seed(123)
    atomic_save(build_model(TINY["teacher"], 4, width=TINY["teacher_width"]).state_dict(), path)
    return str(path)


def tiny_config(tmp_path: Path, name: str = "run", **overrides):
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        random_teacher(teacher)
    values = {**TINY, "teacher_weights": str(teacher), "out_dir": str(tmp_path / name), **overrides}
    return build_config(**values)


def state_dicts_equal(a: dict, b: dict) -> list:
    """Names of the tensors that differ (bitwise)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]
