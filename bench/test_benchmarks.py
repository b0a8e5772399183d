"""pytest-benchmark timings of the cases `python -m bench` runs (timings only: peak memory needs the
process settings of the harness's CPU measurement).

    pytest bench --benchmark-only                          # the quick cases
    SKD_BENCH_MODE=full pytest bench --benchmark-only -k pairwise

One test per op, case and implementation; a baseline that cannot run the case is skipped with why.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.harness import OPS, load_op

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODE = os.environ.get("SKD_BENCH_MODE", "quick")


def _params():
    for name in OPS:
        op = load_op(name)
        for case in op.cases_for(MODE, DEVICE.type):
            for impl in op.impls(case, DEVICE):
                yield pytest.param(op, case, impl, id=f"{op.name}-{case.name}-{impl.name}".replace(" ", "_"))


@pytest.mark.parametrize("op, case, impl", list(_params()))
def test_step(benchmark, op, case, impl):
    if impl.unsupported:
        pytest.skip(impl.unsupported)
    inputs = op.make_inputs(case, DEVICE, getattr(torch, case.dtype or "float32"))
    step = impl.build(case, inputs)
    try:
        step()  # builds, compiles
    except Exception as error:  # a baseline that cannot run this case
        pytest.skip(f"{impl.name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")

    def synchronized_step():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = f"{op.name} {case.name}"
    benchmark(synchronized_step)
