"""One harness, many cases: the declarations an op's bench file makes (Op, Case, Impl), and the timing,
peak memory, device limits and row assembly that every op shares.

Per case, the implementations run on the same inputs. Each is warmed up (builds, compiles, caches),
then timed in interleaved rounds (one step of each per round, the order rotated every round) so that
the noise of a shared machine hits every implementation alike; a row's `ms` is the median of its
rounds. On a GPU a step is timed with CUDA events after a synchronize, so it includes the host's
launch gaps but not earlier queued work. Peak memory is what a step allocates above what was live
when it started (its inputs, the warmed-up caches): on a GPU from the caching allocator, on the CPU
in a separate process (`cpu_memory.py`), because the CPU reading needs glibc settings that would also
slow down the timings.
"""
from __future__ import annotations

import datetime
import functools
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from skd_kernels.memory import CPU_MEASUREMENT_ENV, peak_memory_above_baseline

REPO = Path(__file__).resolve().parent.parent
OPS = ("pixelwise", "pairwise", "attention", "holistic")
MODES = ("tiny", "quick", "full")
OFFICIAL = "official"
COMPILED = "official_compiled"

# Per mode: rounds of timing at most, and the seconds a case's rounds may take (fewer rounds, at
# least MIN_ROUNDS, for slow cases).
ROUNDS = {"tiny": 2, "quick": 7, "full": 15}
CASE_BUDGET_S = {"tiny": 1.0, "quick": 3.0, "full": 60.0}
MIN_ROUNDS = {"tiny": 1, "quick": 3, "full": 3}

# glibc serves every block of 64 KiB or more with mmap and unmaps it on free, so the resident-set
# peak (VmHWM) follows the tensors; it must be set when the process starts.


# --- declarations --------------------------------------------------------------------------------

@dataclass
class Case:
    """One problem: `name` is unique within its op; `size` is its x in the plots; cases of one
    `series` form one line per implementation; `modes` are the runs that take it.

    The work a step must do, whatever the implementation (the op file writes the formula next to the
    case): `elements`, tensor elements it must read or write at least, each of the benchmark dtype's
    size (its bytes: elements times that size); `flops`, the floating-point operations it must do, in
    the arithmetic of `flop_dtype` ({device type: dtype name}, float32 where absent). 0: not declared.
    """
    name: str
    size: float
    params: dict = field(default_factory=dict)
    series: str = ""
    modes: tuple = ("full",)
    elements: int = 0
    flops: int = 0
    flop_dtype: dict = field(default_factory=dict)

    def bytes(self, dtype: torch.dtype) -> int:
        return self.elements * torch.empty((), dtype=dtype).element_size()


@dataclass
class Impl:
    """One implementation of a case: `build(case, inputs)` returns a step (one forward and
    backward, gradients cleared). With `unsupported` set it is not run: its row states why."""
    name: str
    build: Optional[Callable] = None
    unsupported: str = ""


@dataclass
class Op:
    """An op's benchmark: its cases, `make_inputs(case, device, dtype) -> {name: tensor}` shared by
    the implementations of a case, and `impls(case, device) -> [Impl]` whose first is the official
    formulation (ratios are taken against it). `notes` (markdown) go into the results README."""
    name: str
    title: str
    size_label: str
    cases: list
    make_inputs: Callable
    impls: Callable
    notes: str = ""
    dtypes: tuple = ("float32", "float16", "bfloat16")

    def cases_for(self, mode: str) -> list:
        return [case for case in self.cases if mode in case.modes]

    def case(self, name: str) -> Case:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(f"{self.name}: no case named {name!r}")


def load_op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {name!r}")
    return importlib.import_module(f"bench.bench_{name}").OP


# --- building steps ------------------------------------------------------------------------------

def clear_grads(inputs: dict) -> None:
    for tensor in inputs.values():
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.grad = None


def loss_step(loss_fn: Callable, inputs: dict) -> Callable[[], None]:
    """A step: loss_fn(**inputs).backward(), then the inputs' gradients cleared."""
    def step():
        loss_fn(**inputs).backward()
        clear_grads(inputs)
    return step


def compiled(fn: Callable) -> Callable:
    # One specialisation per shape, as a training loop with a fixed crop gets.
    return torch.compile(fn, dynamic=False)


def official_baselines(loss_for: Callable[[Case], Callable], compile_unsupported: str = "") -> list:
    """The official formulation, eager and under torch.compile (inductor). `loss_for(case)` returns
    the official loss as a function of the case's inputs."""
    return [Impl(OFFICIAL, lambda case, inputs: loss_step(loss_for(case), inputs)),
            Impl(COMPILED, lambda case, inputs: loss_step(compiled(loss_for(case)), inputs),
                 unsupported=compile_unsupported)]


def build_steps(op: Op, case: Case, inputs: dict, device: torch.device, only=None, warmup: int = 2):
    """Build and warm up every implementation of `case`: ({name: step}, {name: ms of its last
    warm-up step}, {name: why it did not run})."""
    steps, warm_ms, notes = {}, {}, {}
    for impl in op.impls(case, device):
        if only and impl.name not in only and impl.name != OFFICIAL:
            continue
        if impl.unsupported:
            notes[impl.name] = impl.unsupported
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:  # why a kernel was refused, if it fails
                warnings.simplefilter("always")
                step = impl.build(case, inputs)
                ms = elapsed_ms(step, device)  # first call: builds and compiles
            for _ in range(warmup - 1 if ms < 2000 else 0):  # slow steps need no more warming
                ms = elapsed_ms(step, device)
        except Exception as error:  # a baseline that cannot run this case: its row says why
            why = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
            if caught:
                why += f" ({str(caught[-1].message).split(' (Triggered')[0][:200]})"
            notes[impl.name] = f"not run: {why}"
            clear_grads(inputs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        steps[impl.name], warm_ms[impl.name] = step, ms
    return steps, warm_ms, notes


# --- timing --------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(step: Callable, device: torch.device) -> float:
    """Milliseconds of one step; on a GPU between CUDA events, the queue drained before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def interleaved_medians(steps: dict, device: torch.device, rounds: int) -> dict:
    """Median ms of each step over `rounds` rounds of one step each, the order rotated per round."""
    names = list(steps)
    samples = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(elapsed_ms(steps[name], device))
    return {name: statistics.median(values) for name, values in samples.items()}


def rounds_for(warm_ms: dict, mode: str, rounds: Optional[int] = None) -> int:
    """As many rounds as the mode allows, fewer for slow cases (their budget), never below the minimum."""
    most = rounds or ROUNDS[mode]
    per_round = max(sum(warm_ms.values()), 1e-3)
    return max(min(most, MIN_ROUNDS[mode]), min(most, int(CASE_BUDGET_S[mode] * 1e3 / per_round)))


# --- peak memory ---------------------------------------------------------------------------------

def peak_bytes(step: Callable, device: torch.device) -> int:
    """Bytes allocated at the peak of step() beyond what was allocated when it started (the library's
    own measurement: the allocator on a GPU, VmHWM in a process started with CPU_MEASUREMENT_ENV)."""
    return peak_memory_above_baseline(step, device)


def cpu_peaks_mb(op: Op, dtype: str, ran: dict) -> tuple[dict, str]:
    """Peak MB of each (case, impl) in `ran` ({case name: [impl names]}), measured in one process
    started with CPU_MEASUREMENT_ENV: ({"case|impl": MB}, error text or "")."""
    spec = json.dumps(dict(op=op.name, dtype=dtype, cases=ran))
    env = {**os.environ, **CPU_MEASUREMENT_ENV,
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "bench.cpu_memory"], input=spec, env=env, cwd=REPO,
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {}, f"memory process failed (rc {result.returncode}): {result.stderr.strip()[-400:]}"
    return {key: value / 2**20 for key, value in json.loads(lines[-1]).items()}, ""


# --- the device and its limits -------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """The columns that say where a row was measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                name = re.search(r"model name\s*:\s*(.+)", cpuinfo.read()).group(1).strip()
        except (OSError, AttributeError):
            pass
        threads = torch.get_num_threads()
        name = f"{name}, {threads} thread{'s' if threads > 1 else ''}"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return dict(device=name, torch=torch.__version__, triton=triton_version,
                cuda=(torch.version.cuda or "") if device.type == "cuda" else "",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))


# Sizes of the limit measurements: a copy well beyond the last-level cache, a square matmul that
# keeps every core busy. The CPU's are smaller so that a quick run stays quick.
LIMIT_COPY_BYTES = {"cuda": 2**28, "cpu": 2**27}
LIMIT_MATMUL_N = {"cuda": 4096, "cpu": 1024}
LIMIT_REPEATS = {"cuda": 10, "cpu": 3}


@functools.lru_cache(maxsize=None)
def device_limits(device: torch.device) -> dict:
    """What this device reaches in this run (measured once per process and device): GB/s of a
    device-to-device copy (bytes read + written over its time) and TFLOP/s of a square matmul in
    float32 and in float64 (2 n^3 flops over its time); medians of a few repeats after one warm-up."""
    kind = device.type
    src = torch.empty(LIMIT_COPY_BYTES[kind], dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    n = LIMIT_MATMUL_N[kind]
    rates = {}

    def median_ms(fn):
        fn()
        return statistics.median(elapsed_ms(fn, device) for _ in range(LIMIT_REPEATS[kind]))

    rates["copy_gb_per_s"] = 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6
    del src, dst
    for name in ("float32", "float64"):
        # At torch's default float32 matmul precision ("highest"): no TF32, which our kernels do not use.
        a, b = (torch.randn(n, n, dtype=getattr(torch, name), device=device) for _ in range(2))
        rates[f"matmul_{name}_tflop_per_s"] = 2 * n**3 / median_ms(lambda: a @ b) / 1e9
    return rates


def efficiency(case: Case, ms: float, limits: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The rates a row reaches on the case's declared work and the share of this run's limits:
    gb_per_s and pct_of_bandwidth (the declared bytes), tflop_per_s and pct_of_matmul (the declared
    flops, against the matmul rate of their dtype), pct_of_limit the larger share (the roofline:
    the time the work needs at the limits over the row's time). '' where nothing is declared."""
    row = dict(gb_per_s="", tflop_per_s="", pct_of_bandwidth="", pct_of_matmul="", pct_of_limit="")
    if not ms or not limits:
        return row
    shares = []
    if case.elements:
        gb_per_s = case.bytes(dtype) / ms / 1e6
        shares.append(100 * gb_per_s / limits["copy_gb_per_s"])
        row.update(gb_per_s=_sig(gb_per_s), pct_of_bandwidth=_sig(shares[-1]))
    if case.flops:
        tflop_per_s = case.flops / ms / 1e9
        limit = limits[f"matmul_{case.flop_dtype.get(device.type, 'float32')}_tflop_per_s"]
        shares.append(100 * tflop_per_s / limit)
        row.update(tflop_per_s=_sig(tflop_per_s), pct_of_matmul=_sig(shares[-1]))
    if shares:
        row["pct_of_limit"] = _sig(max(shares))
    return row


# --- one op, all its cases -----------------------------------------------------------------------

COLUMNS = ["op", "case", "series", "size", "impl", "dtype", "ms", "peak_mb", "speedup", "memory_ratio",
           "gb_per_s", "tflop_per_s", "pct_of_bandwidth", "pct_of_matmul", "pct_of_limit", "copy_gb_per_s",
           "matmul_float32_tflop_per_s", "matmul_float64_tflop_per_s", "note", "device", "torch", "triton", "cuda",
           "date"]


# Below this a peak is a few pages, not a tensor: no memory ratio against it.
MIN_PEAK_MB = 0.05


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _sig(value) -> str:
    """Three significant digits, no exponent (3350, 41.2, 0.00123)."""
    if value is None or value == 0 or not math.isfinite(value):
        return _fmt(value, ".3g")
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def _fmt_ms(ms) -> str:
    return _fmt(ms, ".0f" if ms is not None and ms >= 1000 else ".4g")  # 4 significant digits, no exponent


def run_op(op: Op, mode: str, device: torch.device, dtype: str = "float32", *, rounds: Optional[int] = None,
           only: Optional[list] = None, progress=None) -> list[dict]:
    """Measure every case of `op` in `mode`; rows in COLUMNS order (numbers formatted, '' when absent).

    speedup and memory_ratio are the official formulation's ms and peak over the row's (above 1: the
    row is faster / needs less). gb_per_s, tflop_per_s and the pct_of_* columns are the case's declared
    work over the row's time and its share of the limits measured in this run (`efficiency`).
    `only`: implementation names to run (the official always).
    `progress`: a tqdm-like bar, told each case (set_description) and its end (update).
    """
    if dtype not in op.dtypes:
        raise ValueError(f"dtype: {op.name} is benchmarked in {op.dtypes}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    env = environment(device)
    if progress:
        progress.set_description(f"{op.name} device limits")
    limits = device_limits(device)
    measured = []  # (case, {impl: ms}, {impl: MB}, {impl: note})
    for case in op.cases_for(mode):
        if progress:
            progress.set_description(f"{op.name} {case.name}")
        inputs = op.make_inputs(case, device, torch_dtype)
        steps, warm_ms, notes = build_steps(op, case, inputs, device, only)
        times = interleaved_medians(steps, device, rounds_for(warm_ms, mode, rounds)) if steps else {}
        peaks = {name: peak_bytes(step, device) / 2**20 for name, step in steps.items()} if device.type == "cuda" else {}
        measured.append((case, times, peaks, notes))
        del steps, inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress:
            progress.update(1)
    if device.type == "cpu":
        if progress:
            progress.set_description(f"{op.name} peak memory")
        peaks, error = cpu_peaks_mb(op, dtype, {case.name: list(times) for case, times, *_ in measured if times})
        if error:
            print(f"{op.name}: {error}", file=sys.stderr)
        for case, times, case_peaks, notes in measured:
            case_peaks.update({name: peaks[f"{case.name}|{name}"] for name in times if f"{case.name}|{name}" in peaks})
    rows = []
    for case, times, peaks, notes in measured:
        base_ms, base_mb = times.get(OFFICIAL), peaks.get(OFFICIAL)
        for name in [*times, *notes]:
            ms, mb = times.get(name), peaks.get(name)
            row = dict(op=op.name, case=case.name, series=case.series, size=f"{case.size:.10g}", impl=name,
                       dtype=dtype, ms=_fmt_ms(ms), peak_mb=_fmt(mb, ".2f"),
                       speedup=_fmt(base_ms / ms if base_ms and ms else None, ".2f"),
                       memory_ratio=_fmt(base_mb / mb if base_mb is not None and mb and mb >= MIN_PEAK_MB else None,
                                         ".2f"),
                       **efficiency(case, ms, limits, device, torch_dtype),
                       copy_gb_per_s=_sig(limits["copy_gb_per_s"]),
                       matmul_float32_tflop_per_s=_sig(limits["matmul_float32_tflop_per_s"]),
                       matmul_float64_tflop_per_s=_sig(limits["matmul_float64_tflop_per_s"]),
                       note=notes.get(name, ""), **env)
            rows.append({column: row[column] for column in COLUMNS})
    return rows
