"""Where the time of one pair-wise forward+backward goes, on this device: wall time per step (median)
and the torch.profiler's per-step CPU and device time of each op, official formulation vs our backends.

    python bench/profile_pairwise.py [--case official|cirkd] [--steps 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_pairwise import CIRKD, OFFICIAL_DEFAULT, fused_backends, make_step  # noqa: E402
from common import time_ms  # noqa: E402

CASES = {"official": OFFICIAL_DEFAULT, "cirkd": CIRKD}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, default="official")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = CASES[args.case]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for impl in ["official", *fused_backends(device)]:
        step = make_step(impl, case, device)
        ms = time_ms(step, device, repeats=100, warmup=10)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize(device) if device.type == "cuda" else None
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events) / args.steps
        print(f"\n## {case[0]} | {impl}: wall {ms:.3f} ms/step, device busy {device_us / 1e3:.3f} ms/step")
        rows = sorted(events, key=lambda e: -e.cpu_time_total)[:args.rows]
        for e in rows:
            print(f"  {e.key[:60]:60s} calls/step {e.count / args.steps:5.1f}  cpu {e.cpu_time_total / args.steps:8.1f} us"
                  f"  self cpu {e.self_cpu_time_total / args.steps:8.1f} us  device {e.self_device_time_total / args.steps:8.1f} us")


if __name__ == "__main__":
    main()
