"""What a run leaves behind: one CSV and one plot per op and device, and results/README.md generated
from every CSV in the results folder (tables, plots, devices and versions, the historical figures)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from bench.harness import COLUMNS, COMPILED, OFFICIAL, OPS, load_op

HISTORICAL = "historical"  # the old per-op scripts' CSVs, kept as they were written


def result_paths(out: Path, device_type: str, op: str, mode: str) -> tuple[Path, Path]:
    folder = out / device_type
    return folder / f"{op}_{mode}.csv", folder / f"{op}_{mode}.png"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# --- plots ---------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path, title: str, size_label: str) -> None:
    """Speed-up and memory ratio against the official code, over problem size: one panel row per
    series, one line per implementation, the official code the dashed line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    series = list(dict.fromkeys(row["series"] for row in rows))
    impls = [name for name in dict.fromkeys(row["impl"] for row in rows) if name != OFFICIAL]
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.6 * len(series)), squeeze=False)
    for (ax_speed, ax_memory), name in zip(axes, series):
        in_series = [row for row in rows if row["series"] == name]
        sizes = sorted({_number(row["size"]) for row in in_series})
        for ax, column, label in ((ax_speed, "speedup", "speed-up vs official (×)"),
                                  (ax_memory, "memory_ratio", "peak memory, official / impl (×)")):
            for index, impl in enumerate(impls):
                points = sorted((_number(r["size"]), _number(r[column])) for r in in_series if r["impl"] == impl)
                points = [(x, y) for x, y in points if not math.isnan(y)]
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl, color=f"C{index % 10}")  # one colour per impl
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=OFFICIAL)
            if len(sizes) > 1 and sizes[-1] / max(sizes[0], 1e-9) > 10:
                ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))  # 2, not 2×10^0
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(y)[0] in "25" else ""))
            ax.set_xlabel(size_label)
            ax.set_ylabel(label)
            ax.set_title(name, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        ax_speed.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_csv(csv_path: Path) -> Path:
    rows = read_csv(csv_path)
    op = load_op(rows[0]["op"])
    png = csv_path.with_suffix(".png")
    plot(rows, png, f"{op.title}: {rows[0]['device']}, {rows[0]['dtype']}, {csv_path.stem.split('_')[-1]}",
         op.size_label)
    return png


# --- tables --------------------------------------------------------------------------------------

def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell or "—" for cell in line) + " |" for line in lines)]


def _ms(text: str) -> str:
    """Milliseconds as written, or without the exponent an older CSV may have (1.428e+04 -> 14280)."""
    value = _number(text)
    return f"{value:.0f}" if "e" in text and not math.isnan(value) else text


def _ratio(text: str) -> str:
    return f"{text}×" if text else ""


def _percent(text: str) -> str:
    return f"{text}%" if text else ""


def results_table(rows: list[dict]) -> list[str]:
    # CSVs written before the efficiency columns existed have none of them (or empty ones).
    rates = any(row.get("pct_of_limit") for row in rows)
    header = ["case", "impl", "ms", "peak MB", "speed-up", "memory"]
    header += ["GB/s", "TFLOP/s", "% of limit"] if rates else []
    lines = []
    for row in rows:
        line = [row["case"], f"`{row['impl']}`", _ms(row["ms"]), row["peak_mb"], _ratio(row["speedup"]),
                _ratio(row["memory_ratio"])]
        if rates:
            line += [row["gb_per_s"], row["tflop_per_s"], _percent(row["pct_of_limit"])]
        if row["note"]:
            line[2] = row["note"]
        lines.append(line)
    return _table(header, lines)


def headline_rows(rows_by_op: dict, modes: dict | None = None) -> list[list[str]]:
    """Per op: its first case (the official recipe's size) and its largest case the official code
    ran, with the official eager and compiled times and our fastest implementation; `modes` ({op:
    mode}) adds which run each row comes from."""
    lines = []
    for op_name, rows in rows_by_op.items():
        cases = list(dict.fromkeys(row["case"] for row in rows))
        official = {row["case"]: row for row in rows if row["impl"] == OFFICIAL and row["ms"]}
        ran = [case for case in cases if case in official]
        if not ran:
            continue
        largest = max(ran, key=lambda case: _number(official[case]["size"]))
        for case in dict.fromkeys([ran[0], largest]):
            ours = [row for row in rows if row["case"] == case and row["impl"].startswith("skd_") and row["ms"]]
            if not ours:
                continue
            best = min(ours, key=lambda row: _number(row["ms"]))
            compiled = next((row["ms"] for row in rows if row["case"] == case and row["impl"] == COMPILED), "")
            run = [f"{(modes or {}).get(op_name, '')}, {best['device'].split(', ')[-1]}"] if modes else []
            lines.append([op_name, case, *run, _ms(official[case]["ms"]), _ms(compiled or ""), f"`{best['impl']}` {_ms(best['ms'])}",
                          _ratio(best["speedup"]), _ratio(best["memory_ratio"])])
    return lines


HEADLINE_HEADER = ["op", "case", "official ms", "official compiled ms", "ours (fastest) ms", "speed-up",
                   "peak memory, official / ours"]


def headline(rows_by_op: dict, modes: dict | None = None) -> list[str]:
    header = HEADLINE_HEADER[:2] + (["run"] if modes else []) + HEADLINE_HEADER[2:]
    return _table(header, headline_rows(rows_by_op, modes))


# --- the README ----------------------------------------------------------------------------------

HOW_MEASURED = """\
Every figure comes from `python -m bench` (`bench/harness.py`); rerun it to refresh this page
(`python -m bench --report` rewrites it from the CSVs alone).

- **Step**: one forward and backward of the op (the holistic op: one discriminator step), gradients
  cleared after it; inputs made once per case and shared by its implementations.
- **Time** (`ms`): after warm-up (builds, torch.compile, caches), the implementations of a case are
  timed in interleaved rounds, one step each per round with the order rotated, so that noise hits all of
  them; the figure is the median over rounds. On a GPU each step is timed with CUDA events after a
  synchronize.
- **Peak memory** (`peak MB`): allocated at the step's peak above what was live before it (the inputs,
  warmed-up caches). GPU: `torch.cuda.max_memory_allocated`. CPU: the resident-set peak (VmHWM) in a
  separate process started with `MALLOC_MMAP_THRESHOLD_=65536`, so that glibc maps and unmaps every
  large block (the timings run in a normal process, which that setting would slow down).
- **Ratios**: `speed-up` is the official code's ms over the row's, `memory` its peak over the row's;
  above 1, the row is faster or needs less.
- **Share of the device's limit**: each case declares the work a step must do whatever the
  implementation, with its formula next to the case in `bench_<op>.py`: the bytes it must move (pixel-wise:
  read S and T, write grad S, 3·B·K·H·W elements; pair-wise: the node passes read S and T and write
  grad S) and/or the flops it must do (attention: the N² products of the forward, backward and double
  backward; pair-wise: the similarity core by the exact algorithm with fewer flops). `GB/s` and `TFLOP/s`
  are that work over the row's time (for every row of a case alike, so an effective rate for algorithms
  that do less). The limits are measured in the same run, on the same device: a device-to-device copy
  (bytes read + written over its time; 256 MiB on a GPU, 128 MiB on the CPU) and a square matmul in
  float32 and in float64 (4096³ on a GPU, 1024³ on the CPU), all in the CSV. `% of limit` is the larger
  of the two shares (`pct_of_bandwidth`, `pct_of_matmul` in the CSV, the flops against the matmul rate
  of their dtype): the time the declared work needs at this run's limits over the row's time. The
  holistic op declares no work (convolutions dominate it): no rates.
- **Implementations**: `official` the official formulation (`skd_kernels.reference`) in eager PyTorch;
  `official_compiled` the same under `torch.compile` (inductor, one specialisation per shape);
  `skd_<backend>` this library with `backend=<backend>` (`skd_d_step`: the holistic `d_step`); `sdpa_*`
  PyTorch's scaled-dot-product attention per backend; `liger_kl` Liger-Kernel's KL divergence (GPU).
  A row whose `ms` says "not run" names why.
"""

NOISE = """\
The `cpu` figures were taken on a 2-core machine shared with other jobs (load averages around 20
during the runs of 2026-12-02): their timings are noisy and many times slower than on an idle machine,
so read the ratios within one case (its implementations were interleaved) rather than the absolute
times, and expect them to move between runs. The full run used one thread (`--threads 1`, in the device
column) so that OpenMP threads did not wait on each other under that load. Peak memory does not depend
on the load: those figures are exact."""


def latest_results(out: Path) -> dict:
    """{device folder: {op: (mode, csv path)}}: the full run, else the quick one, else the tiny one."""
    found = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name != HISTORICAL):
        for op in OPS:
            for mode in ("full", "quick", "tiny"):
                path = folder / f"{op}_{mode}.csv"
                if path.exists():
                    found.setdefault(folder.name, {})[op] = (mode, path)
                    break
    return found


def write_readme(out: Path) -> Path:
    latest = latest_results(out)
    lines = ["# Benchmark results", "",
             "Generated by `python -m bench` from the CSVs in this folder; do not edit by hand.", ""]
    if latest:
        lines += ["## Devices and runs", ""]
        device_lines = []
        for folder, ops in latest.items():
            for op, (mode, path) in ops.items():
                first = read_csv(path)[0]
                device_lines.append([f"[`{folder}/{path.name}`]({folder}/{path.name})", first["device"], first["torch"],
                                     first["triton"], first["cuda"], first["date"]])
        lines += _table(["CSV", "device", "torch", "Triton", "CUDA", "date"], device_lines) + [""]
        lines += ["## Headline", ""]
        for folder, ops in latest.items():
            rows_by_op = {op: read_csv(path) for op, (_, path) in ops.items()}
            first = next(iter(rows_by_op.values()))[0]
            lines += [f"`{folder}/` ({first['device'].split(',')[0]}, {first['dtype']}):", "",
                      *headline(rows_by_op, {op: mode for op, (mode, _) in ops.items()}), ""]
    if (out / "aot" / "aot.md").exists():  # scripts/aot_check.py's table
        lines += ["Every kernel compiled ahead of time for sm_90a, registers, spills and instruction counts: "
                  "[`aot/aot.md`](aot/aot.md), what it shows: [`aot/README.md`](aot/README.md).", ""]
    lines += ["## How these figures are measured", "", HOW_MEASURED, NOISE, ""]
    for op_name in OPS:
        op = load_op(op_name)
        per_device = [(folder, ops[op_name]) for folder, ops in latest.items() if op_name in ops]
        if not per_device:
            continue
        lines += [f"## {op.title}", "", op.notes, ""]
        for folder, (mode, path) in per_device:
            rows = read_csv(path)
            first = rows[0]
            lines += [f"### {first['device']}, {first['dtype']}, {mode} run ({first['date']})", "",
                      f"torch {first['torch']}" + (f", Triton {first['triton']}" if first["triton"] else "")
                      + (f", CUDA {first['cuda']}" if first["cuda"] else "")
                      + (f"; this run's limits: copy {first['copy_gb_per_s']} GB/s, matmul "
                         f"{first.get('matmul_float32_tflop_per_s')} TFLOP/s in float32, "
                         f"{first.get('matmul_float64_tflop_per_s')} in float64"
                         if first.get("matmul_float32_tflop_per_s") else "")
                      + f". [`{folder}/{path.name}`]({folder}/{path.name})", ""]
            png = path.with_suffix(".png")
            if png.exists():
                lines += [f"![{op.title}, {first['device']}]({folder}/{png.name})", ""]
            lines += [*results_table(rows), ""]
            if not any(row.get("pct_of_limit") for row in rows) and op.name != "holistic":
                lines += ["This run predates the GB/s, TFLOP/s and % of limit columns: rerun it for them.", ""]
    lines += historical_section(out)
    path = out / "README.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


HISTORICAL_NOTES = """\
What those runs showed (NVIDIA H100 80GB HBM3, torch 2.11 + CUDA 13.0, Triton 3.6; CPU: the 2-core
machine). Pixel-wise, CPU: the fused kernel at 5–12× the official speed with 4.5–4.9× less memory (about
one logits-sized tensor above the inputs against five). Pair-wise, CPU: at 65 × 65 nodes 14× the official
speed and 18× less memory (the official similarity matrices take 2.2 GB); per image there about 16.5 ms of
Gram, 11 ms of gradient GEMM, 10 ms of node forward (half of it first-touch page faults of fresh float64
node buffers), 3 ms of centring and 2 ms of node backward. Pair-wise, H100: at the official default
(3 × 3 nodes) the `cuda` backend was at parity with the official code (0.567 against 0.590 ms in the
100-step profile, `pairwise_cuda_profile.txt`) and Triton slower, its five kernel launches costing about
45 µs each on the host, which is why `auto` takes `cuda` for the pixel-wise and pair-wise ops on a GPU;
the CIRKD 2 × 2 case ran at 0.66–0.74× the official speed (small-window node passes, not tuned); at 65 × 65
nodes 2.7–3.3× faster. After those runs the GPU backends' centring stopped making node-sized float64
temporaries, so the 1254.9 MB GPU peak at 65 × 65 nodes predates that change. Holistic: at the official
8 × 19 × 65 × 65 input fused and naive attention are at parity; at 512 × 512 the fused attention and
`d_step` need 2.4–3.5× less memory at 0.7–0.95× the speed."""


def historical_section(out: Path) -> list[str]:
    folder = out / HISTORICAL
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not csvs:
        return []
    lines = ["## Historical figures (the old per-op scripts)", "",
             "Written by the per-op bench scripts that `python -m bench` replaced, before its baselines "
             "(torch.compile, SDPA backends, Liger) existed: their `speedup` and `memory_ratio` are also "
             "the official (for attention: naive) code's over the row's, medians of 5–10 steps (attention: "
             "the minimum). The GPU runs and what they found are told in "
             f"[`{HISTORICAL}/gpu_h100_runs.md`]({HISTORICAL}/gpu_h100_runs.md), the benchmark diaries and "
             f"trainer runs once in the top-level README in [`{HISTORICAL}/history.md`]({HISTORICAL}/history.md). "
             "They are not comparable "
             "with the tables above timing for timing: other code, other runs.", "", HISTORICAL_NOTES, ""]
    for path in csvs:
        rows = read_csv(path)
        columns = [c for c in rows[0] if c not in ("device", "dtype")]
        lines += [f"### `{HISTORICAL}/{path.name}`: {rows[0]['device']}, {rows[0].get('dtype', '')}", "",
                  *_table(columns, [[row[c] for c in columns] for row in rows]), ""]
    return lines
