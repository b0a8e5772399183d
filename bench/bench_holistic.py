"""Holistic D step (forward + loss + gradient penalty + backward): fused attention vs the naive blocks.

    python bench/bench_holistic.py [--quick] [--device cpu|cuda] [--backend torch|cpu|...]

Rows, per input (B, 19, H, W) of score maps, all with the official discriminator (preprocess BN,
conv_dim 64, wgan-gp, lambda_gp 10), same weights:
- naive: the official D step: naive attention (N x N maps), D(T), D(S) and the penalty's graphs
  alive at one backward of the summed loss (`HolisticDistillLoss.d_loss(...).backward()`);
- fused: the same step with the fused attention op;
- fused_d_step: fused attention and `HolisticDistillLoss.d_step` (one graph alive at a time).
Time (median, ms) and peak memory above the inputs (MB); `speedup` and `memory_ratio` are naive / row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import skd_kernels as sk  # noqa: E402
from common import RESULTS, device_name, ensure_cpu_measurement_env, peak_mb, print_table, time_ms, write_csv  # noqa: E402

OFFICIAL = (8, 19, 65, 65)      # 1/8-resolution logits of a 512 crop: N = 64 at attn1
FULL_RESOLUTION = (19, 512, 512)  # N = 4096 at attn1, 1024 at attn2; batch from --large-batch
IMPLS = ("naive", "fused", "fused_d_step")


def make_step(impl: str, shape, device, backend):
    torch.manual_seed(0)
    d = sk.Discriminator(1, shape[1], 8, 65, attention="naive" if impl == "naive" else "fused",
                         backend=backend).to(device)
    loss = sk.HolisticDistillLoss(d, "wgan-gp", lambda_gp=10.0, weight=0.1)
    student = torch.randn(shape, device=device) * 3
    teacher = torch.randn(shape, device=device) * 3

    def step():
        if impl == "fused_d_step":
            loss.d_step(student, teacher)
        else:
            loss.d_loss(student, teacher).backward()
        d.zero_grad(set_to_none=True)

    return step


def run(shapes, device: torch.device, backend, repeats: int, path: Path) -> list[dict]:
    """Measure every shape; the CSV is rewritten after each, so a long run interrupted keeps its rows."""
    rows = []
    for shape in shapes:
        # Large inputs take seconds per step on a CPU: fewer samples there.
        reps = repeats if shape[-1] * shape[-2] * shape[0] < 2**20 else 1
        measured = {}
        for impl in IMPLS:
            step = make_step(impl, shape, device, backend)
            measured[impl] = (time_ms(step, device, reps, warmup=1), peak_mb(step, device))
            del step
        naive_ms, naive_mb = measured["naive"]
        for impl, (ms, mb) in measured.items():
            rows.append(dict(device=device_name(device), shape="x".join(map(str, shape)), dtype="float32",
                             impl=impl, backend=backend or "auto", ms=f"{ms:.1f}", peak_mb=f"{mb:.1f}",
                             speedup=f"{naive_ms / ms:.2f}", memory_ratio=f"{naive_mb / max(mb, 1e-9):.2f}"))
            print(rows[-1], flush=True)
        write_csv(path, rows)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="fused attention backend (default: auto)")
    parser.add_argument("--quick", action="store_true", help=f"{OFFICIAL} and batch 1 at 512x512 only")
    parser.add_argument("--large-batch", type=int, default=8,
                        help="batch at 512x512 besides 1 (the naive step needs ~1.2 GB per image on CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        ensure_cpu_measurement_env()
    shapes = [OFFICIAL, (1, *FULL_RESOLUTION)] + ([] if args.quick else [(args.large_batch, *FULL_RESOLUTION)])
    path = args.csv or RESULTS / f"holistic_{device.type}{'_quick' if args.quick else ''}.csv"
    rows = run(shapes, device, args.backend, args.repeats or (3 if args.quick else 5), path)
    print_table(rows, ["shape", "impl", "backend", "ms", "peak_mb", "speedup", "memory_ratio"])
    print(f"\n{rows[0]['device']}; written to {path}")


if __name__ == "__main__":
    main()
