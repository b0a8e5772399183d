"""`skd-train` with no arguments: on the embedded brain dataset, on CPU, train (or reuse a cached)
teacher, then the student without and with distillation, and print their mIoUs side by side.
`skd-train smoke` runs the same three phases for a few steps on the procedural shapes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import build_config, load_file
from .log import duration_text
from .train import CHECKPOINT, WEIGHTS, miou_text, train

CONFIGS = Path(__file__).parent / "configs"
NO_DISTILL = dict(pixel=False, pair=False, holistic=False)
# recipe name -> (teacher config, student config, the table's title)
RECIPES = {
    "brain": ("brain_teacher.yaml", "brain_student.yaml", "brain tissue segmentation (3 classes)"),
    "smoke": ("smoke_teacher.yaml", "smoke_student.yaml", "smoke test on procedural shapes (figures mean nothing)"),
}
# Options that do not change what a teacher learns: left out of its cache key.
NOT_IN_TEACHER_KEY = ("out_dir", "progress", "plot", "resume", "num_workers")


def cache_dir() -> Path:
    return Path(os.environ.get("SKD_TRAIN_CACHE", Path.home() / ".cache" / "skd_train"))


def announce(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def teacher_config(out_dir: Path, recipe: str = "brain", **overrides):
    """The teacher is trained as a plain (non-distilled) run of the recipe's teacher config."""
    return build_config(base=load_file(CONFIGS / RECIPES[recipe][0]), out_dir=str(out_dir), **NO_DISTILL,
                        **overrides)


def cached_teacher(out_root: Path, retrain: bool = False, recipe: str = "brain", **overrides) -> tuple[Path, float]:
    """Path to the teacher's weights and its mIoU: from the cache (keyed by the teacher's config), or
    trained now and cached."""
    cfg = teacher_config(out_root / "teacher", recipe, **overrides)
    key_fields = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_TEACHER_KEY}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    weights, meta = cache_dir() / f"teacher-{key}.pt", cache_dir() / f"teacher-{key}.json"
    if weights.exists() and meta.exists() and not retrain:
        miou = json.loads(meta.read_text())["miou"]
        announce(f"teacher: reusing {weights} (mIoU {miou_text(miou)})")
        return weights, miou
    announce(f"teacher: training {cfg.model} (width {cfg.width}) for {cfg.steps} steps -> {cfg.out_dir}")
    result = train(resuming(cfg))
    announce(f"teacher: mIoU {miou_text(result['miou'])} in {duration_text(result['seconds'])}; cached as {weights}")
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(cfg.out_dir) / WEIGHTS, weights)
    meta.write_text(json.dumps({"miou": result["miou"], "config": cfg.to_dict()}, indent=1))
    return weights, result["miou"]


def resuming(cfg):
    """The run continues from its checkpoint when an earlier demo left one (an interrupted run goes on,
    a finished one is only scored; other options than the checkpoint's are refused)."""
    cfg.resume = (Path(cfg.out_dir) / CHECKPOINT).exists()
    return cfg


def _phase(name: str, cfg) -> dict:
    """One student run, announced before and after (the bar in between shows the steps)."""
    terms = cfg.distill_terms()
    how = " + ".join(f"{w:g} {k}" for k, w in terms.items()) if terms else "no distillation"
    cfg = resuming(cfg)
    action = "resuming" if cfg.resume else "training"  # resuming a finished run only scores it
    announce(f"{name}: {action} {cfg.model} (width {cfg.width}) for {cfg.steps} steps, seed {cfg.seed}, "
             f"{how} -> {cfg.out_dir}")
    result = train(cfg)
    announce(f"{name}: mIoU {miou_text(result['miou'])} in {duration_text(result['seconds'])}")
    return result


def run_demo(seeds: Sequence[int] = (0,), out_root: str = "runs/demo", retrain_teacher: bool = False,
             student_overrides: Optional[dict] = None, recipe: str = "brain") -> list[dict]:
    """Teacher once, then for each seed a plain and a distilled student; prints and returns the rows."""
    t0 = time.time()
    out = Path(out_root)
    teacher_cfg = teacher_config(out / "teacher", recipe)
    weights, teacher_miou = cached_teacher(out, retrain=retrain_teacher, recipe=recipe)
    base = load_file(CONFIGS / RECIPES[recipe][1])
    base.update(teacher=teacher_cfg.model, teacher_width=teacher_cfg.width, teacher_weights=str(weights))
    base.update(student_overrides or {})
    rows = []
    for seed in seeds:
        plain = _phase("student", build_config(base=base, seed=seed, out_dir=str(out / f"student-seed{seed}"),
                                               **NO_DISTILL))
        distilled = _phase("distilled", build_config(base=base, seed=seed, out_dir=str(out / f"distilled-seed{seed}")))
        rows.append({"seed": seed, "teacher": teacher_miou, "student": plain["miou"], "distilled": distilled["miou"],
                     "student_iou": plain["iou"], "distilled_iou": distilled["iou"]})
    print_table(rows, teacher_cfg, build_config(base=base), time.time() - t0, RECIPES[recipe][2])
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows


def print_table(rows, teacher_cfg, student_cfg, seconds, title=RECIPES["brain"][2]) -> None:
    print(f"\n{title}, validation mIoU (%), {seconds / 60:.1f} min")
    print(f"  teacher:   {teacher_cfg.model} width {teacher_cfg.width}, {teacher_cfg.steps} steps")
    print(f"  student:   {student_cfg.model} width {student_cfg.width}, {student_cfg.steps} steps; "
          f"distilled: + {' + '.join(f'{w:g} {k}' for k, w in student_cfg.distill_terms().items())}")
    print(f"  {'seed':>4}  {'teacher':>8}  {'student':>8}  {'distilled':>9}  {'gain':>6}")
    for r in rows:
        print(f"  {r['seed']:>4}  {miou_text(r['teacher']):>8}  {miou_text(r['student']):>8}  "
              f"{miou_text(r['distilled']):>9}  {_gain(r['distilled'] - r['student']):>6}")
    if len(rows) > 1:
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        print(f"  {'mean':>4}  {miou_text(mean('teacher')):>8}  {miou_text(mean('student')):>8}  "
              f"{miou_text(mean('distilled')):>9}  {_gain(mean('distilled') - mean('student')):>6}")


def _gain(value: float) -> str:
    return f"{100 * value:+.2f}"
