"""The training loop of the official recipe (networks/kd_model.py): a frozen teacher, the student
step (task + pixel + pair + holistic G term), then one discriminator step on the detached maps;
poly learning rates, checkpoints, exact resume, DDP. Entry point: `train(cfg)`."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from . import distributed as D
from .checkpoint import atomic_save, load_checkpoint, rng_state, seed_everything, set_rng_state
from .config import ConfigError, TrainConfig, flag
from .evaluate import evaluate
from .log import CsvLog, Progress, plot_log
from .losses import DistillLosses, TaskLoss
from .sampling import ResumableSampler, SeededDataset


CHECKPOINT, WEIGHTS = "last.pt", "model.pt"  # in out_dir: everything a resume needs; the student alone
# Options that steer a session but not what is trained: a resume may change them.
SESSION_OPTIONS = ("resume", "progress", "plot", "stop_after", "num_workers", "out_dir", "threads")


class SimulatedKill(RuntimeError):
    """Raised after `cfg.stop_after` steps, with nothing saved since the last checkpoint (tests)."""


def config_differences(saved: dict, current: dict) -> list:
    """'--flag saved (now current)' for each option that differs, but those that only steer the session."""
    out = []
    for name in sorted(set(saved) | set(current)):
        if name in SESSION_OPTIONS:
            continue
        a, b = saved.get(name), current.get(name)
        a, b = (list(v) if isinstance(v, tuple) else v for v in (a, b))
        if a != b:
            out.append(f"{flag(name)} {a!r} (now {b!r})")
    return out


def poly_lambda(steps: int, power: float):
    """The official lr_poly: base_lr * (1 - step / steps) ** power, evaluated before each step."""
    return lambda step: max(0.0, 1 - step / steps) ** power


@contextlib.contextmanager
def flag_errors(name: str):
    """A missing or unfitting file given by an option becomes a ConfigError naming the flag."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{flag(name)}: {err}") from err


def make_reproducible(cfg: TrainConfig) -> None:
    """Fix what the results depend on besides the seed: the CPU thread count (the blocking of torch's
    and oneDNN's reductions follows it; our kernels' reductions have a fixed order) and, with
    --deterministic, the choice of algorithms (GPU: no cuDNN autotuning, deterministic kernels, and a
    warning for ops that have none)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def build_data(cfg: TrainConfig):
    from .data import build_dataset
    options = dict(cfg.dataset_options or {})
    train_ds = build_dataset(cfg.dataset, root=cfg.data_root, split="train", crop_size=cfg.crop_size,
                             augment=cfg.augment, seed=cfg.seed, **options)
    # Whole-image mode scores the full images (or a centre crop of eval_crop); sliding mode tiles them.
    val_ds = build_dataset(cfg.dataset, root=cfg.data_root, split=cfg.eval_split,
                           crop_size=None if cfg.eval_mode == "sliding" else cfg.eval_crop, augment=False,
                           seed=cfg.seed, **options)
    return train_ds, val_ds


def build_teacher(cfg: TrainConfig, num_classes: int, device) -> torch.nn.Module:
    """The frozen teacher: eval mode (BatchNorm running statistics, no dropout), no gradients."""
    from .models import build_model, load_weights
    if not cfg.teacher_weights:
        raise ConfigError("--teacher-weights: distillation is on (pixel/pair/holistic) but no teacher weights "
                          "were given; train a teacher first (skd-train train --model pspnet_resnet101 --no-pixel "
                          "--no-pair --no-holistic) or switch the terms off")
    teacher = build_model(cfg.teacher, num_classes, width=cfg.teacher_width)
    with flag_errors("teacher_weights"):
        load_weights(teacher, cfg.teacher_weights)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Trainer:
    """Holds the models, optimisers and data order of one run; `run()` trains to cfg.steps."""

    def __init__(self, cfg: TrainConfig, env: Optional[D.DistEnv] = None):
        from .models import build_model, load_backbone_weights, load_weights
        make_reproducible(cfg)
        self.cfg, self.env = cfg, env or D.setup(cfg.device)
        self.device = self.env.device
        if cfg.cuda_graph and self.device.type != "cuda":
            raise ConfigError(f"--cuda-graph: CUDA graphs need a GPU; this run's device is {self.device}")
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.train_ds, self.val_ds = build_data(cfg)
        k = self.num_classes = self.train_ds.num_classes
        self.ignore_index = self.train_ds.ignore_index
        student = build_model(cfg.model, k, width=cfg.width)
        if cfg.pretrained_backbone:
            with flag_errors("pretrained_backbone"):
                load_backbone_weights(student, cfg.pretrained_backbone)
        if cfg.weights:
            with flag_errors("weights"):
                load_weights(student, cfg.weights)
        if self.env.distributed and cfg.sync_bn and self.device.type == "cuda":
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = student.to(self.device)
        self.model = self.student
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        self.task_loss = TaskLoss(self.ignore_index, cfg.dsn_weight, cfg.ohem, cfg.ohem_thresh, cfg.ohem_min_kept)
        self.distill = DistillLosses(cfg, k).to(self.device)
        self.teacher = build_teacher(cfg, k, self.device) if self.distill.needs_teacher else None
        self.opt = torch.optim.SGD(self.student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, poly_lambda(cfg.steps, cfg.poly_power))
        self.opt_d = self.sched_d = None
        if self.distill.D is not None:
            D.broadcast_buffers(self.distill.D, self.env)
            self.opt_d = torch.optim.SGD(self.distill.D.parameters(), lr=cfg.lr_d, momentum=cfg.momentum_d)
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, poly_lambda(cfg.steps, cfg.poly_power))
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.pos = 0, 0, 0
        # Reseed after building: the teacher and D drew from the generator, and dropout of the first steps
        # should not depend on which terms are on (a baseline and a distilled run differ only there).
        seed_everything(cfg.seed + 1)
        self.out_dir = Path(cfg.out_dir)
        self.batches_per_epoch = len(self.train_ds) // self.env.world_size // cfg.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} x {self.env.world_size} process(es) exceeds the "
                             f"{len(self.train_ds)} training samples of {cfg.dataset!r}")

    def _amp_dtype(self):
        if self.cfg.amp == "none":
            return None
        if self.device.type != "cuda":
            print(f"amp={self.cfg.amp!r} applies to GPUs only: training in float32 on {self.device}", file=sys.stderr)
            return None
        return torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "config": self.cfg.to_dict(),
                 "model": self.student.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state()}
        if self.distill.D is not None:
            state.update(D=self.distill.D.state_dict(), optimizer_D=self.opt_d.state_dict(),
                         scheduler_D=self.sched_d.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.distill.D is not None:
            if "D" not in state:
                raise ValueError("the checkpoint has no discriminator but holistic distillation is on")
            self.distill.D.load_state_dict(state["D"])
            self.opt_d.load_state_dict(state["optimizer_D"])
            self.sched_d.load_state_dict(state["scheduler_D"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        set_rng_state(state["rng"])

    def save(self) -> None:
        """CHECKPOINT (everything a resume needs) and WEIGHTS (the student's), rank 0 only."""
        if self.env.is_main:
            atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)
            atomic_save(self.student.state_dict(), self.out_dir / WEIGHTS)

    # --- data ---------------------------------------------------------------------------------
    def _epoch_loader(self):
        """This epoch's batches from the current position: the order and every sample's augmentation
        depend only on (seed, epoch, position), so a resumed epoch continues the same sequence."""
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(self.epoch)
        sampler = ResumableSampler(self.train_ds, self.env.world_size, self.env.rank, self.cfg.seed, self.epoch,
                                   start=self.pos * self.cfg.batch_size)
        # The loader's own generator (worker seeds) is seeded per epoch: creating it must not draw from
        # the global generator, whose state is part of the checkpoint.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        return DataLoader(SeededDataset(self.train_ds), batch_size=self.cfg.batch_size, sampler=sampler,
                          num_workers=self.cfg.num_workers, drop_last=True, generator=gen,
                          pin_memory=self.device.type == "cuda")

    def _val_loader(self):
        idx = list(range(self.env.rank, len(self.val_ds), self.env.world_size))
        return DataLoader(Subset(self.val_ds, idx), batch_size=1 if self.cfg.eval_mode == "sliding" else
                          self.cfg.batch_size, num_workers=self.cfg.num_workers)

    # --- one step -----------------------------------------------------------------------------
    def train_step(self, images, labels) -> dict:
        cfg = self.cfg
        self.model.train()
        d_net = self.distill.D
        if d_net is not None:
            d_net.requires_grad_(False)  # the G term needs gradients w.r.t. the student only
        with self.autocast():
            preds_S = self.model(images)
            losses = {"task": self.task_loss(preds_S, labels)}
            preds_T = None
            if self.teacher is not None:
                with torch.no_grad():
                    preds_T = self.teacher(images)
                losses.update(self.distill.student_terms(preds_S, preds_T))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: non-finite student loss {float(loss)} "
                                     f"({ {k: float(v) for k, v in losses.items()} })")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        if d_net is not None:
            d_net.requires_grad_(True)
            # A captured D step adds into the .grad tensors it captured: zero them in place.
            self.opt_d.zero_grad(set_to_none=not cfg.cuda_graph)
            # The D step in float32: the gradient penalty differentiates twice, fragile in half precision.
            with torch.autocast(self.device.type, enabled=False):
                d_loss = self.distill.d_step(preds_S, preds_T)
            if not torch.isfinite(d_loss):
                raise FloatingPointError(f"step {self.step}: non-finite discriminator loss {float(d_loss)}")
            D.average_gradients(d_net, self.env)
            self.opt_d.step()
            self.sched_d.step()
            D.broadcast_buffers(d_net, self.env)
            values["d_loss"] = float(d_loss.detach())
        return values

    # --- the run ------------------------------------------------------------------------------
    def resume_if_asked(self) -> Optional[int]:
        """Load out_dir/last.pt when --resume is on; its options must be this run's (the optimiser and
        schedule come from it, and config.json must describe what was trained)."""
        path = self.out_dir / CHECKPOINT
        if not self.cfg.resume:
            return None
        if not path.exists():
            if self.env.is_main:
                print(f"resume: no checkpoint at {path}: starting from step 0", file=sys.stderr)
            return None
        state = load_checkpoint(path, map_location=self.device)
        differing = config_differences(state["config"], self.cfg.to_dict())
        if differing:
            raise ConfigError(f"--resume: {path} was trained with other options: {', '.join(differing)}; "
                              f"resume with the checkpoint's options or train into a new --out-dir")
        self.load_state_dict(state)
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)
        return self.step

    def evaluate(self) -> dict:
        return evaluate(self.student, self._val_loader(), self.num_classes, self.ignore_index,
                        mode=self.cfg.eval_mode, window=self.cfg.eval_crop or self.cfg.crop_size,
                        stride_ratio=self.cfg.eval_stride_ratio, device=self.device,
                        class_names=getattr(self.val_ds, "class_names", None), distributed=self.env.distributed)

    def run(self) -> dict:
        cfg = self.cfg
        resumed_at = self.resume_if_asked()
        finished = self.step >= cfg.steps
        if finished and self.env.is_main:
            print(f"resume: the run finished at step {self.step} already: evaluating its weights", file=sys.stderr)
        log = CsvLog(self.out_dir / "log.csv", resume_step=resumed_at) if self.env.is_main else None
        if self.env.is_main:
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        bar = Progress(cfg.steps, self.step, desc=Path(cfg.out_dir).name, enabled=cfg.progress and self.env.is_main)
        running, t0 = {}, time.time()
        try:
            while self.step < cfg.steps:
                for images, labels in self._epoch_loader():
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                    values = self.train_step(images, labels)
                    self.step += 1
                    self.pos += 1
                    if self.pos == self.batches_per_epoch:
                        self.epoch, self.pos = self.epoch + 1, 0
                    for k, v in values.items():
                        running[k] = running.get(k, 0.0) + v
                    bar.update(values)
                    row = {}
                    if log is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                        row = {k: v / n for k, v in running.items()}
                        row["lr"] = self.sched.get_last_lr()[0]
                        running = {}
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        row["miou"] = self.evaluate()["miou"]
                    if log is not None and row:
                        log.append(self.step, row)
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save()
                    if cfg.stop_after and self.step == cfg.stop_after:
                        raise SimulatedKill(f"stopped after step {self.step} (stop_after)")
                    if self.step >= cfg.steps:
                        break
        finally:
            bar.close()
        if not finished:
            self.save()
        result = self.evaluate()
        result.update(steps=self.step, seconds=time.time() - t0, out_dir=str(self.out_dir),
                      threads=torch.get_num_threads())
        if self.env.is_main:
            if not log.has(self.step, "miou"):  # a finished run's final row is there already
                log.append(self.step, {"miou": result["miou"]})
            summary = {k: v for k, v in result.items() if k != "confusion"}
            summary["confusion"] = result["confusion"].tolist()
            (self.out_dir / "results.json").write_text(json.dumps(summary, indent=1))
            if cfg.plot:
                plot_log(self.out_dir / "log.csv", self.out_dir / "curves.png")
        return result


def train(cfg: TrainConfig, env: Optional[D.DistEnv] = None) -> dict:
    """Train one run described by `cfg`; returns the final evaluation
    {"miou", "iou", "pixel_acc", "confusion", "class_names", "steps", "seconds", "out_dir"}.
    Writes out_dir/{last.pt, model.pt, log.csv, config.json, results.json, curves.png}."""
    return Trainer(cfg, env).run()


def miou_text(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"
