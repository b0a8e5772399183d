"""Pixel-wise distillation: fused forward+backward against the official formulation, same process.

    python bench/bench_pixelwise.py [--quick] [--device cpu|cuda]      # table + CSV in bench/results/
    pytest bench/bench_pixelwise.py --benchmark-only                   # pytest-benchmark timings

Rows: time (median, ms) and peak memory above the inputs (MB, and in logits-sized tensors) for the
official CriterionPixelWise formula and each fused backend on this device; `speedup` and
`memory_ratio` are official / fused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import skd_kernels as sk  # noqa: E402
from common import RESULTS, device_name, ensure_cpu_measurement_env, peak_mb, print_table, time_ms, write_csv  # noqa: E402
from skd_kernels.reference import pixelwise_official  # noqa: E402

OFFICIAL_DEFAULT = (8, 19, 65, 65)  # 1/8-resolution logits of a 512 crop: must not be slower here
DONE_WHEN = (8, 19, 256, 512)
FULL_RESOLUTION = [(8, 19, 512, 512), (8, 150, 512, 512), (8, 19, 512, 1024)]


def fused_backends(device: torch.device) -> list[str]:
    return [b for b in sk.available_backends(device) if b != "torch"]


def make_step(impl: str, shape, device, dtype=torch.float32):
    """One forward+backward of `impl` ('official' or a backend name) on fresh logits."""
    student = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(shape, device=device, dtype=dtype)

    def step():
        if impl == "official":
            loss = pixelwise_official(student, teacher)
        else:
            loss = sk.pixelwise_distill_loss(student, teacher, backend=impl)
        loss.backward()
        student.grad = None

    return step


def run(shapes, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        logits_mb = torch.Size(shape).numel() * 4 / 2**20
        measured = {}
        for impl in ["official", *fused_backends(device)]:
            step = make_step(impl, shape, device)
            measured[impl] = (time_ms(step, device, repeats), peak_mb(step, device))
            del step
        official_ms, official_mb = measured["official"]
        for impl, (ms, mb) in measured.items():
            rows.append(dict(device=device_name(device), shape="x".join(map(str, shape)), dtype="float32",
                             impl=impl, ms=f"{ms:.2f}", peak_mb=f"{mb:.1f}", peak_logits=f"{mb / logits_mb:.2f}",
                             speedup=f"{official_ms / ms:.2f}", memory_ratio=f"{official_mb / max(mb, 1e-9):.2f}"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the official default and (8, 19, 256, 512) only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        ensure_cpu_measurement_env()
    shapes = [OFFICIAL_DEFAULT, DONE_WHEN] + ([] if args.quick else FULL_RESOLUTION)
    repeats = args.repeats or (5 if args.quick else 10)
    rows = run(shapes, device, repeats)
    print_table(rows, ["shape", "impl", "ms", "peak_mb", "peak_logits", "speedup", "memory_ratio"])
    suffix = "quick" if args.quick else "full"
    path = args.csv or RESULTS / f"pixelwise_{device.type}_{suffix}.csv"
    write_csv(path, rows)
    print(f"\n{rows[0]['device']}; written to {path}")


# pytest-benchmark: timings only (peak memory needs the process-wide settings of main()).
@pytest.mark.parametrize("shape", [OFFICIAL_DEFAULT, DONE_WHEN], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["official", "fused"])
def test_pixelwise_forward_backward(benchmark, impl, shape):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = make_step("official" if impl == "official" else "auto", shape, device)
    benchmark.group = f"pixelwise {'x'.join(map(str, shape))}"
    benchmark(step)


if __name__ == "__main__":
    main()
