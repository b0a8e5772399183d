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
from bench.harness import (COLUMNS, COMPILED, CPU_MEASUREMENT_ENV, OFFICIAL, OPS, interleaved_medians,  # noqa: E402
                           load_op, rounds_for)


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


def test_tiny_run_writes_a_png_per_op_and_the_readme(tiny_run):
    for op in ("pixelwise", "attention"):
        png = tiny_run / "cpu" / f"{op}_tiny.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (tiny_run / "README.md").read_text()
    for op in ("pixelwise", "attention"):
        assert f"cpu/{op}_tiny.png" in readme and f"cpu/{op}_tiny.csv" in readme
        assert load_op(op).title in readme
    assert "| op | case | run | official ms |" in readme  # the headline table


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
