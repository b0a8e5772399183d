"""Benchmarks of skd-kernels' ops against the official formulation and other baselines.

    python -m bench [--ops pixelwise,pairwise,attention,holistic] [--quick | --full] [--device cpu|cuda]
                    [--dtype float32] [--out bench/results]
    pytest bench --benchmark-only                 # pytest-benchmark timings of the same cases

Layout: `harness.py` times and measures (one harness, many cases), `cpu_memory.py` measures CPU peak
memory in a process started with the settings that make it measurable, `report.py` writes the CSVs,
plots and `results/README.md`. Each `bench_<op>.py` only declares the op's cases and baselines;
`test_benchmarks.py` hands the same declarations to pytest-benchmark, `profile_pairwise.py` to the
torch profiler. `scripts/gpu_check.sh` runs `python -m bench --quick --device cuda` on a lent GPU.
"""
