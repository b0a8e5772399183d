"""Pair-wise distillation: fused forward+backward against the official formulation, same process.

    python bench/bench_pairwise.py [--quick] [--device cpu|cuda]      # table + CSV in bench/results/
    pytest bench/bench_pairwise.py --benchmark-only                   # pytest-benchmark timings

Rows: time (median, ms; on CPU in a process with glibc's usual allocator) and peak memory above the
inputs (MB; on CPU in a re-exec that measures it, see bench/common.py) for the official
CriterionPairWiseforWholeFeatAfterPool formula (it builds the M x M similarity matrices) and each
fused backend on this device; `speedup` and `memory_ratio` are official / fused. Features are
post-ReLU (as the PSP bottleneck's), student and teacher independent, or the teacher a 1e-3
perturbation of the student (`near`: the plain low-rank form's hard case, which the core's
difference form keeps exact in float32 when Cs == Ct; see skd_kernels/ops/pairwise.py). The official formulation is skipped where its similarity
matrices alone would exceed --official-limit-gb.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import skd_kernels as sk  # noqa: E402
from common import RESULTS, cpu_timings_then_memory, device_name, peak_mb, print_table, time_ms, write_csv  # noqa: E402
from skd_kernels.reference import pairwise_distill_reference  # noqa: E402

# (name, B, Cs, Ct, H, W, options, features)
OFFICIAL_DEFAULT = ("official default", 8, 128, 512, 65, 65, dict(scale=0.5), "independent")
DONE_WHEN = ("65x65 nodes", 8, 512, 512, 65, 65, dict(node_size=1), "independent")
NEAR = ("65x65 nodes, near", 8, 512, 512, 65, 65, dict(node_size=1), "near")
CIRKD = ("CIRKD 2x2 paper", 8, 128, 512, 65, 65, dict(node_size=2, normalization="paper"), "independent")
LARGE = ("129x129 nodes", 2, 256, 256, 129, 129, dict(node_size=1), "independent")
QUICK = [OFFICIAL_DEFAULT, ("33x33 nodes", 8, 512, 512, 33, 33, dict(node_size=1), "independent")]
FULL = [OFFICIAL_DEFAULT, CIRKD, DONE_WHEN, NEAR, LARGE]


def fused_backends(device: torch.device) -> list[str]:
    return sk.available_backends(device)  # "torch": our algorithm on stock PyTorch node passes


def make_features(case, device):
    _, b, cs, ct, h, w, _, kind = case
    g = torch.Generator().manual_seed(0)
    student = torch.randn((b, cs, h, w), generator=g).relu_()
    if kind == "near":
        teacher = student + 1e-3 * torch.randn((b, ct, h, w), generator=g)
    else:
        teacher = torch.randn((b, ct, h, w), generator=g).relu_()
    return student.to(device).requires_grad_(), teacher.to(device)


def official_matrix_gb(case) -> float:
    _, b, cs, ct, h, w, options, _ = case
    k = options.get("node_size", 1)
    if "scale" in options:
        k = int(h * options["scale"])
    nodes = -(-h // k) * -(-w // k)
    return 2 * b * nodes**2 * 4 / 2**30  # A_s and A_t in float32


def make_step(impl: str, case, device):
    student, teacher = make_features(case, device)
    options = case[6]

    def step():
        if impl == "official":
            loss = pairwise_distill_reference(student, teacher, **options)
        else:
            loss = sk.pairwise_distill_loss(student, teacher, backend=impl, **options)
        loss.backward()
        student.grad = None

    return step


def _impls(case, device, official_limit_gb):
    impls = ["official", *fused_backends(device)]
    if official_matrix_gb(case) > official_limit_gb:
        impls.remove("official")
    return impls


def time_all(cases, device, repeats, official_limit_gb) -> dict:
    timings = {}
    for case in cases:
        for impl in _impls(case, device, official_limit_gb):
            step = make_step(impl, case, device)
            few = repeats if impl != "official" or official_matrix_gb(case) < 0.1 else max(1, repeats // 3)
            timings[f"{case[0]}|{impl}"] = time_ms(step, device, few, warmup=1)
            del step
    return timings


def run(cases, device: torch.device, repeats: int, official_limit_gb: float) -> list[dict]:
    if device.type == "cpu":
        timings = cpu_timings_then_memory(lambda: time_all(cases, device, repeats, official_limit_gb))
    else:
        timings = time_all(cases, device, repeats, official_limit_gb)
    rows = []
    for case in cases:
        measured = {}
        for impl in _impls(case, device, official_limit_gb):
            step = make_step(impl, case, device)
            measured[impl] = (timings[f"{case[0]}|{impl}"], peak_mb(step, device))
            del step
        official_ms, official_mb = measured.get("official", (float("nan"), float("nan")))
        name, b, cs, ct, h, w, options, kind = case
        for impl, (ms, mb) in measured.items():
            rows.append(dict(device=device_name(device), case=name, shape=f"{b}x{cs}/{ct}x{h}x{w}",
                             options=" ".join(f"{k}={v}" for k, v in options.items()), features=kind,
                             dtype="float32", impl=impl, ms=f"{ms:.2f}", peak_mb=f"{mb:.1f}",
                             official_matrices_gb=f"{official_matrix_gb(case):.2f}",
                             speedup=f"{official_ms / ms:.2f}", memory_ratio=f"{official_mb / max(mb, 1e-9):.2f}"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the official default and 33x33 nodes only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--official-limit-gb", type=float, default=4.0)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)
    rows = run(QUICK if args.quick else FULL, device, repeats, args.official_limit_gb)
    print_table(rows, ["case", "shape", "features", "impl", "ms", "peak_mb", "speedup", "memory_ratio"])
    suffix = "quick" if args.quick else "full"
    path = args.csv or RESULTS / f"pairwise_{device.type}_{suffix}.csv"
    write_csv(path, rows)
    print(f"\n{rows[0]['device']}; written to {path}")


# pytest-benchmark: timings only (peak memory needs the process-wide settings of main()).
@pytest.mark.parametrize("case", QUICK, ids=lambda c: c[0].replace(" ", "_"))
@pytest.mark.parametrize("impl", ["official", "fused"])
def test_pairwise_forward_backward(benchmark, impl, case):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = make_step("official" if impl == "official" else "auto", case, device)
    benchmark.group = f"pairwise {case[0]}"
    benchmark(step)


if __name__ == "__main__":
    main()
