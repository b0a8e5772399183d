"""Peak memory of a callable, above what was live before it, on CPU or CUDA.

CUDA: the caching allocator's peak statistic. CPU: torch has no allocator statistics, so this reads
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs; Linux only). That is
exact for tensors only when glibc serves every large block with mmap and returns it on free: run
with MALLOC_MMAP_THRESHOLD_=65536 in the environment (see `CPU_MEASUREMENT_ENV`), as the tests and
bench/ do in a subprocess.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import torch

CPU_MEASUREMENT_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) * 1024


def peak_memory_above_baseline(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes allocated at the peak of `fn()` beyond what was allocated when it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        raise RuntimeError("CPU peak memory needs MALLOC_MMAP_THRESHOLD_=65536 set before the process starts")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base
