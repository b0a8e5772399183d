"""Where the time of one pair-wise step goes, on this device: wall time per step (median) and the
torch.profiler's per-step CPU and device time of each op, for every implementation of a case
declared in bench_pairwise.py.

    python -m bench.profile_pairwise [--case "official default"] [--steps 20] [--rows 12]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_pairwise import OP
from bench.harness import build_steps, elapsed_ms, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[case.name for case in OP.cases], default="official default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = OP.case(args.case)
    inputs = OP.make_inputs(case, device, torch.float32)
    steps, _, notes = build_steps(OP, case, inputs, device)
    for name, note in notes.items():
        print(f"\n## {case.name} | {name}: {note}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, step in steps.items():
        ms = statistics.median(elapsed_ms(step, device) for _ in range(100))
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            synchronize(device)
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events) / args.steps
        print(f"\n## {case.name} | {name}: wall {ms:.3f} ms/step, device busy {device_us / 1e3:.3f} ms/step")
        for e in sorted(events, key=lambda e: -e.cpu_time_total)[:args.rows]:
            print(f"  {e.key[:60]:60s} calls/step {e.count / args.steps:5.1f}  cpu {e.cpu_time_total / args.steps:8.1f} us"
                  f"  self cpu {e.self_cpu_time_total / args.steps:8.1f} us  device {e.self_device_time_total / args.steps:8.1f} us")


if __name__ == "__main__":
    main()
