"""SAGAN attention: fused forward+backward and double backward against the naive block and SDPA.

    python bench/bench_attention.py [--quick] [--device cpu|cuda]      # table + CSV in bench/results/
    pytest bench/bench_attention.py --benchmark-only                   # pytest-benchmark timings

Implementations: `naive` (bmm / softmax / bmm, the official Self_Attn block = attention_reference),
`sdpa` (F.scaled_dot_product_attention with scale=1; its math backend for the double backward, the
only one that supports it), and each fused backend here (`torch` = the row-block PyTorch fallback).
Passes: `fwd_bwd` (out.backward) and `double_bwd` (gradient penalty: input gradients with
create_graph=True, then backward of their squared norm). Rows: median time (ms) and peak memory
above the inputs (MB); `speedup` and `memory_ratio` are naive / impl. Times are the minimum over
repeats, the implementations of a shape interleaved: on a shared, loaded machine the median mostly
measures the other processes, the minimum the least-disturbed run.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import skd_kernels as sk  # noqa: E402
from common import (RESULTS, device_name, elapsed_ms, ensure_cpu_measurement_env, peak_mb, print_table,  # noqa: E402
                    write_csv)
from skd_kernels.reference import attention_reference  # noqa: E402

# (B, N, Dk, Dv): the official D's two attention blocks on 65x65 logits, then large maps.
OFFICIAL = [(8, 64, 32, 256), (8, 16, 64, 512)]
LARGE = [(2, 1024, 32, 256), (2, 4096, 32, 256)]
PASSES = ("fwd_bwd", "double_bwd")


def sdpa(q, k, v, double: bool):
    # SDPA's fused CPU/GPU kernels have no double backward; the math backend does.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    context = sdpa_kernel(SDPBackend.MATH) if double else contextlib.nullcontext()
    with context:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def attention_fn(impl: str, double: bool):
    if impl == "naive":
        return attention_reference
    if impl == "sdpa":
        return lambda q, k, v: sdpa(q, k, v, double)
    return lambda q, k, v: sk.fused_attention(q, k, v, backend=impl)


def make_step(impl: str, shape, device, attention_pass: str, dtype=torch.float32):
    b, n, dk, dv = shape
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, n, dk, generator=g).div_(dk**0.5).to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, n, dv, generator=g).to(device, dtype).requires_grad_()
    weights = torch.randn(b, n, dv, generator=g).to(device, dtype)
    double = attention_pass == "double_bwd"
    fn = attention_fn(impl, double)

    def step():
        out = fn(q, k, v)
        if double:
            grads = torch.autograd.grad((out * weights).sum(), (q, k, v), create_graph=True)
            sum(g.pow(2).sum() for g in grads).backward()
        else:
            out.backward(weights)
        q.grad = k.grad = v.grad = None

    return step


def impls(device: torch.device) -> list[str]:
    return ["naive", "sdpa", *[b for b in sk.available_backends(device) if b != "triton" or device.type == "cuda"]]


def best_ms(steps: dict, device: torch.device, repeats: int) -> dict:
    """Minimum wall time (ms) of each step over `repeats` rounds, the steps interleaved per round."""
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            best[name] = min(best[name], elapsed_ms(step, device))
    return best


def run(shapes, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for shape in shapes:
        for attention_pass in PASSES:
            steps = {impl: make_step(impl, shape, device, attention_pass) for impl in impls(device)}
            for step in steps.values():  # warm-up: builds, caches
                step()
            times = best_ms(steps, device, repeats if shape[1] <= 1024 else max(2, repeats // 4))
            measured = {impl: (times[impl], peak_mb(step, device)) for impl, step in steps.items()}
            del steps
            naive_ms, naive_mb = measured["naive"]
            for impl, (ms, mb) in measured.items():
                rows.append(dict(device=device_name(device), shape="x".join(map(str, shape)), dtype="float32",
                                 attention_pass=attention_pass, impl=impl, ms=f"{ms:.2f}", peak_mb=f"{mb:.1f}",
                                 speedup=f"{naive_ms / ms:.2f}", memory_ratio=f"{naive_mb / max(mb, 1e-3):.2f}"))
            print_table(rows[-len(measured):], ["shape", "attention_pass", "impl", "ms", "peak_mb", "speedup",
                                                 "memory_ratio"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the official shapes and N=1024 only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch and OpenMP); 1 gives stable figures on a shared machine")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        ensure_cpu_measurement_env()
    shapes = OFFICIAL + (LARGE[:1] if args.quick else LARGE)
    repeats = args.repeats or (10 if args.quick else 20)
    rows = run(shapes, device, repeats)
    print()
    print_table(rows, ["shape", "attention_pass", "impl", "ms", "peak_mb", "speedup", "memory_ratio"])
    path = args.csv or RESULTS / f"attention_{device.type}{'_quick' if args.quick else ''}.csv"
    write_csv(path, rows)
    print(f"\n{rows[0]['device']}; written to {path}")


# pytest-benchmark: timings only (peak memory needs the process-wide settings of main()).
@pytest.mark.parametrize("shape", OFFICIAL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("attention_pass", PASSES)
@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_attention(benchmark, impl, attention_pass, shape):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = make_step("naive" if impl == "naive" else "auto", shape, device, attention_pass)
    benchmark.group = f"attention {attention_pass} {'x'.join(map(str, shape))}"
    benchmark(step)


if __name__ == "__main__":
    main()
