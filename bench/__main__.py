"""python -m bench: measure the ops, write CSVs and plots per op and device, regenerate the README.

    python -m bench                                   # --quick, every op, this machine's default device
    python -m bench --full --ops pairwise,attention --device cpu
    python -m bench --quick --device cuda --out /tmp/out/bench
    python -m bench --report                          # plots and README from the CSVs alone
    python -m bench --headline                        # the headline table, from the CSVs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from bench import report
from bench.harness import OPS, load_op, run_op

RESULTS = Path(__file__).resolve().parent / "results"


class _Lines:
    """The progress bar when tqdm is not installed: one line per case."""

    def __init__(self, total):
        self.done, self.total = 0, total

    def set_description(self, text):
        print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n):
        self.done += n

    def close(self):
        pass


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total)
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the official recipe's sizes and one larger case per op (default; minutes on a CPU)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every case, full resolution included (tens of minutes on a CPU)")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="toy sizes (tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch and OpenMP; default: torch's), the memory process's too")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds at most (default per mode)")
    parser.add_argument("--impls", default=None, help="comma-separated implementations to run (official always)")
    parser.add_argument("--report", action="store_true", help="only redraw the plots and README from the CSVs")
    parser.add_argument("--headline", action="store_true", help="only print the headline table from the CSVs")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    args.ops = [name.strip() for name in args.ops.split(",") if name.strip()]
    for name in args.ops:
        if name not in OPS:
            parser.error(f"--ops: expected names from {OPS}, got {name!r}")
    args.impls = args.impls.split(",") if args.impls else None
    return args


def measure(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the CPU memory process
    ops = [load_op(name) for name in args.ops]
    ops = [op for op in ops if args.dtype in op.dtypes or print(f"{op.name}: skipped, not benchmarked in {args.dtype}")]
    bar = _progress(sum(len(op.cases_for(args.mode, device.type)) for op in ops))
    start = time.time()
    for op in ops:
        rows = run_op(op, args.mode, device, args.dtype, rounds=args.rounds, only=args.impls, progress=bar)
        if not rows:
            continue
        csv_path, _ = report.result_paths(args.out, device.type, op.name, args.mode)
        report.write_csv(csv_path, rows)
        report.plot_csv(csv_path)
        report.write_readme(args.out)  # after every op: an interrupted run keeps what it measured
    bar.close()
    print(f"done in {time.time() - start:.0f} s; results in {args.out}", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.headline:
        for folder, ops in report.latest_results(args.out).items():
            print(f"{folder}:")
            rows_by_op = {op: report.read_csv(path) for op, (_, path) in ops.items()}
            print("\n".join(report.headline(rows_by_op, {op: mode for op, (mode, _) in ops.items()})))
        return
    if args.report:
        for folder, ops in report.latest_results(args.out).items():
            for _, path in ops.values():
                report.plot_csv(path)
        print(report.write_readme(args.out))
        return
    measure(args)


if __name__ == "__main__":
    main()
