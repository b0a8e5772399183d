"""CPU peak memory of an op's steps, in a process started with the settings that make it measurable.

    echo '{"op": "pixelwise", "dtype": "float32", "cases": {"8x19x65x65": ["official", "skd_cpu"]}}' |
        MALLOC_MMAP_THRESHOLD_=65536 python -m bench.cpu_memory

Prints {"case|impl": bytes} as one JSON line. `harness.cpu_peaks_mb` runs this after the timings,
which were taken in a normal process: with every large block mmapped afresh, as here, each step would
also pay the page faults of its allocations.
"""
from __future__ import annotations

import gc
import json
import sys

import torch

from bench.harness import load_op, peak_bytes


def main() -> None:
    spec = json.load(sys.stdin)
    op = load_op(spec["op"])
    device, dtype = torch.device("cpu"), getattr(torch, spec["dtype"])
    peaks = {}
    for case_name, names in spec["cases"].items():
        case = op.case(case_name)
        inputs = op.make_inputs(case, device, getattr(torch, case.dtype) if case.dtype else dtype)
        for impl in op.impls(case, device):
            if impl.name not in names:
                continue
            step = impl.build(case, inputs)
            step()  # warm: builds, compiles, caches
            peaks[f"{case_name}|{impl.name}"] = peak_bytes(step, device)
            del step
            gc.collect()
        del inputs
        gc.collect()
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
