"""Shared bench machinery: timing, peak memory, CSV rows, a printed table."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from skd_kernels.memory import CPU_MEASUREMENT_ENV, peak_memory_above_baseline

RESULTS = Path(__file__).resolve().parent / "results"


TIMINGS_ENV = "SKD_BENCH_TIMINGS"


def cpu_timings_then_memory(time_all) -> dict | None:
    """On CPU, time in this process and measure peak memory in a re-exec.

    The peak-memory reading needs glibc to mmap every large block (CPU_MEASUREMENT_ENV), which
    also makes every large allocation fault its pages in afresh: timings taken that way would
    charge page faults that a normal process does not pay. So: `time_all()` -> {key: ms} runs
    here, the process re-executes itself with the measurement settings and the timings in the
    environment, and the second process (where this returns them) measures memory.
    """
    import json

    if os.environ.get(TIMINGS_ENV):
        return json.loads(os.environ[TIMINGS_ENV])
    timings = time_all()
    env = {**os.environ, **CPU_MEASUREMENT_ENV, TIMINGS_ENV: json.dumps(timings)}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def ensure_cpu_measurement_env() -> None:
    """CPU peak memory needs glibc settings fixed at process start: re-exec once with them."""
    if any(os.environ.get(k) != v for k, v in CPU_MEASUREMENT_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_MEASUREMENT_ENV})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def elapsed_ms(fn, device: torch.device) -> float:
    """Wall time of one fn() in milliseconds, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed_ms(fn, device) for _ in range(repeats))


def peak_mb(fn, device: torch.device) -> float:
    fn()  # warm: builds, caches, allocator pools
    return peak_memory_above_baseline(fn, device) / 2**20


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))
