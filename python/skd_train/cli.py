"""The `skd-train` command.

  skd-train                          the default job: brain dataset, CPU, teacher / student / distilled table
  skd-train demo [--seeds 0 1 2]     the same, with options
  skd-train smoke                    the same three phases for a few steps on procedural shapes (< 1 min)
  skd-train train [--config F] [--option value ...]   one run (torchrun-compatible)
  skd-train eval --weights W [--config F] [...]       score weights on the validation split
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, add_config_arguments, build_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skd-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="teacher, student and distilled student on the embedded brain dataset")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="one plain and one distilled student "
                      "per seed (default: 0)")
    demo.add_argument("--out", default="runs/demo", help="folder of the runs (default: runs/demo)")
    demo.add_argument("--retrain-teacher", action="store_true", help="ignore the cached teacher")
    demo.add_argument("--steps", type=int, help="student steps (default: the student config's)")
    smoke = sub.add_parser("smoke", help="the demo's three phases for a few steps on procedural shapes")
    smoke.add_argument("--out", default="runs/smoke", help="folder of the runs (default: runs/smoke)")
    add_config_arguments(sub.add_parser("train", help="one training run"))
    add_config_arguments(sub.add_parser("eval", help="score --weights (a model.pt or official checkpoint)"))
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except ConfigError as err:  # a mistake in the options: one line naming the flag, no traceback
        parser.exit(2, f"skd-train: error: {err}\n")


def _run(args) -> int:
    if args.command in (None, "demo", "smoke"):
        from .demo import run_demo
        if args.command == "smoke":
            run_demo([0], args.out, recipe="smoke")
            return 0
        seeds = getattr(args, "seeds", [0])
        overrides = {"steps": args.steps} if getattr(args, "steps", None) else None
        run_demo(seeds, getattr(args, "out", "runs/demo"), getattr(args, "retrain_teacher", False), overrides)
        return 0
    cfg = build_config(args)
    if args.command == "train":
        from .train import miou_text, train
        result = train(cfg)
        if result.get("miou") is not None:
            _print_result(result, miou_text)
        return 0
    from .train import Trainer, miou_text
    if not cfg.weights:
        raise ConfigError("--weights: skd-train eval scores the weights given with --weights PATH")
    cfg.pixel = cfg.pair = cfg.holistic = False  # scoring needs no teacher
    _print_result(Trainer(cfg).evaluate(), miou_text)  # the Trainer loads cfg.weights into the student
    return 0


def _print_result(result, miou_text) -> None:
    names = result.get("class_names") or [str(i) for i in range(len(result["iou"]))]
    print(f"mIoU {miou_text(result['miou'])}  pixel accuracy {miou_text(result['pixel_acc'])}")
    for name, iou in zip(names, result["iou"]):
        print(f"  {name:>16}: {miou_text(iou)}")


if __name__ == "__main__":
    sys.exit(main())
