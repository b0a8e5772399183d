"""The benchmark harness (bench/): a run on toy cases writes CSVs with the documented columns and
consistent ratios, a PNG per op and the results README; its timing and memory readings work."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))  # the bench package lives at the repository root

from bench import report  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.harness import (COLUMNS, COMPILED, CPU_MEASUREMENT_ENV, OFFICIAL, OPS, Case, efficiency,  # noqa: E402
                           interleaved_medians, load_op, rounds_for)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m bench --tiny` on the CPU for two ops (the compiled baseline left out: it compiles for
    tens of seconds; the quick run has it)."""
    out = tmp_path_factory.mktemp("bench")
    main(["--tiny", "--ops", "pixelwise,attention", "--device", "cpu", "--out", str(out),
          "--impls", "skd_cpu,skd_torch,sdpa_math"])
    return out


def _rows(out, op):
    with open(out / "cpu" / f"{op}_tiny.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tiny_run_writes_csv_with_every_column_and_the_environment(tiny_run):
    for op in ("pixelwise", "attention"):
        with open(tiny_run / "cpu" / f"{op}_tiny.csv", newline="") as handle:
            assert next(csv.reader(handle)) == COLUMNS
        rows = _rows(tiny_run, op)
        assert {row["op"] for row in rows} == {op}
        assert {row["impl"] for row in rows} >= {OFFICIAL, "skd_cpu"}
        for row in rows:
            assert row["device"] and row["torch"] == torch.__version__ and row["date"]
            assert row["note"] or float(row["ms"]) > 0, row
            assert row["note"] or float(row["peak_mb"]) >= 0, row


def test_ratios_are_the_official_figures_over_the_rows(tiny_run):
    for op in ("pixelwise", "attention"):
        rows = _rows(tiny_run, op)
        official = {row["case"]: row for row in rows if row["impl"] == OFFICIAL}
        assert official, "no official rows"
        for row in rows:
            if row["note"]:
                continue
            base = official[row["case"]]
            expected = float(base["ms"]) / float(row["ms"])
            assert float(row["speedup"]) == pytest.approx(expected, rel=2e-3, abs=6e-3), row
            if float(row["peak_mb"]) >= 0.05 and base["peak_mb"]:
                expected_memory = float(base["peak_mb"]) / float(row["peak_mb"])
                rounding = 0.005 / float(row["peak_mb"]) + 0.005 / max(float(base["peak_mb"]), 0.005)  # 2 decimals
                assert float(row["memory_ratio"]) == pytest.approx(expected_memory, rel=rounding + 0.01), row
            else:  # a peak of a few pages: no ratio against it
                assert row["memory_ratio"] == "", row


LIMIT_COLUMNS = ("copy_gb_per_s", "matmul_float32_tflop_per_s", "matmul_float64_tflop_per_s")


def test_rows_carry_the_limits_measured_in_this_run(tiny_run):
    rows = _rows(tiny_run, "pixelwise") + _rows(tiny_run, "attention")
    for column in LIMIT_COLUMNS:
        assert {row[column] for row in rows} == {rows[0][column]}, column  # measured once per run
        assert float(rows[0][column]) > 0, column


def test_rates_are_the_declared_work_over_the_rows_time_and_their_share_of_the_limits(tiny_run):
    for op_name, rate, share, limit, work in (
            ("pixelwise", "gb_per_s", "pct_of_bandwidth", "copy_gb_per_s",
             lambda case: case.bytes(torch.float32) / 1e6),
            ("attention", "tflop_per_s", "pct_of_matmul", "matmul_float32_tflop_per_s",
             lambda case: case.flops / 1e9)):
        op = load_op(op_name)
        for row in _rows(tiny_run, op_name):
            if row["note"]:
                assert row[rate] == row["pct_of_limit"] == "", row
                continue
            expected = work(op.case(row["case"])) / float(row["ms"])
            assert float(row[rate]) == pytest.approx(expected, rel=1e-2), row  # 3 significant digits
            assert float(row[share]) == pytest.approx(100 * expected / float(row[limit]), rel=1e-2), row
            assert row["pct_of_limit"] == row[share], row  # one declared quantity: its share


def test_efficiency_takes_the_larger_share_and_the_matmul_rate_of_the_declared_dtype():
    case = Case("c", 1, elements=10**6, flops=2 * 10**9, flop_dtype={"cpu": "float64"})
    limits = dict(copy_gb_per_s=10.0, matmul_float32_tflop_per_s=8.0, matmul_float64_tflop_per_s=4.0)
    row = efficiency(case, 1.0, limits, torch.device("cpu"), torch.float32)  # 1 ms
    assert row["gb_per_s"] == "4.00" and row["pct_of_bandwidth"] == "40.0"  # 4 MB in 1 ms of 10 GB/s
    assert row["tflop_per_s"] == "2.00" and row["pct_of_matmul"] == "50.0"  # against float64's 4 TFLOP/s
    assert row["pct_of_limit"] == "50.0"
    assert efficiency(case, 1.0, limits, torch.device("cpu"), torch.float64)["gb_per_s"] == "8.00"
    assert efficiency(case, 1.0, limits, torch.device("cuda"), torch.float32)["pct_of_matmul"] == "25.0"
    assert set(efficiency(Case("none", 1), 1.0, limits, torch.device("cpu"), torch.float32).values()) == {""}


def test_memory_bound_cases_declare_their_inputs_read_once_and_gradients_written_once():
    for op_name in ("pixelwise", "pairwise"):
        op = load_op(op_name)
        for case in op.cases_for("tiny"):
            inputs = op.make_inputs(case, torch.device("cpu"), torch.float32)
            tensors = [t for t in inputs.values() if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() for t in tensors) + sum(t.numel() for t in tensors if t.requires_grad)
            assert case.elements == moved, (op_name, case.name)
        assert all(case.elements > 0 for case in op.cases), op_name


def test_attention_flops_are_at_least_the_official_steps_matmuls():
    # The official block stores the N x N map; ours recomputes S = q k^T and dP = dO v^T in each pass:
    # more products, but less than twice as many.
    from torch.utils.flop_counter import FlopCounterMode

    op = load_op("attention")
    for case in op.cases_for("tiny") + op.cases_for("quick")[:2]:
        inputs = op.make_inputs(case, torch.device("cpu"), torch.float32)
        step = op.impls(case, torch.device("cpu"))[0].build(case, inputs)
        with FlopCounterMode(display=False) as counter:
            step()
        assert counter.get_total_flops() <= case.flops < 2 * counter.get_total_flops(), case.name
    assert all(case.flops > 0 for case in op.cases)


def test_tiny_run_writes_a_png_per_op_and_the_readme(tiny_run):
    for op in ("pixelwise", "attention"):
        png = tiny_run / "cpu" / f"{op}_tiny.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (tiny_run / "README.md").read_text()
    for op in ("pixelwise", "attention"):
        assert f"cpu/{op}_tiny.png" in readme and f"cpu/{op}_tiny.csv" in readme
        assert load_op(op).title in readme
    assert "| op | case | run | official ms |" in readme  # the headline table
    assert "| GB/s | TFLOP/s | % of limit |" in readme  # the rates and shares of the limits


def test_headline_names_our_fastest_implementation_per_op(tiny_run):
    rows_by_op = {op: _rows(tiny_run, op) for op in ("pixelwise", "attention")}
    lines = report.headline_rows(rows_by_op)
    assert {line[0] for line in lines} == {"pixelwise", "attention"}
    for line in lines:
        assert line[4].startswith("`skd_")


def test_every_op_declares_official_first_a_compiled_baseline_and_cases_per_mode():
    for name in OPS:
        op = load_op(name)
        for mode in ("tiny", "quick", "full"):
            assert op.cases_for(mode), f"{name}: no {mode} case"
        impls = op.impls(op.cases_for("quick")[0], torch.device("cpu"))
        assert impls[0].name == OFFICIAL
        assert COMPILED in [impl.name for impl in impls]
        assert any(impl.name.startswith("skd_") for impl in impls)


def test_interleaved_medians_time_every_step_every_round_in_rotating_order():
    calls = []

    def sleeper(name, seconds):
        def step():
            calls.append(name)
            time.sleep(seconds)
        return step

    medians = interleaved_medians({"a": sleeper("a", 0.001), "b": sleeper("b", 0.02)}, torch.device("cpu"), 4)
    assert calls.count("a") == calls.count("b") == 4
    assert calls[0::2] != ["a"] * 4  # the order rotates: "a" does not always go first
    assert 20 <= medians["b"] and medians["a"] < medians["b"]


def test_rounds_shrink_for_slow_cases_but_not_below_the_minimum():
    assert rounds_for({"x": 1.0}, "quick") == 7
    assert rounds_for({"x": 1000.0, "y": 1000.0}, "quick") == 3
    assert rounds_for({"x": 1e6}, "full") == 3


def test_cpu_peak_memory_sees_a_tensor_allocated_in_the_step():
    code = ("import torch; from bench.harness import peak_bytes\n"
            "keep = []\n"
            "step = lambda: keep.append(torch.ones(100 * 2**20 // 4))\n"
            "print(peak_bytes(step, torch.device('cpu')) / 2**20)")
    env = {**os.environ, **CPU_MEASUREMENT_ENV, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) == pytest.approx(100, abs=5)


def test_cpu_peak_memory_refuses_a_process_without_the_settings(monkeypatch):
    from bench.harness import peak_bytes

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with pytest.raises(RuntimeError, match="MALLOC_MMAP_THRESHOLD_"):
        peak_bytes(lambda: None, torch.device("cpu"))
