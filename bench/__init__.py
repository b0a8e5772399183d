"""Benchmarks of skd-kernels' ops against the official formulation and other baselines.

    python -m bench [--ops pixelwise,pairwise,attention,holistic] [--quick | --full] [--device cpu|cuda]
                    [--dtype float32] [--out bench/results]
    pytest bench --benchmark-only                 # pytest-benchmark timings of the same cases

Layout: `harness.py` times and measures (one harness, many cases), `cpu_memory.py` measures CPU peak
memory in a process started with the settings that make it measurable, `report.py` writes the CSVs,
plots and `results/README.md`. Each `bench_<op>.py` only declares the op's cases and baselines;
`test_benchmarks.py` hands the same declarations to pytest-benchmark, `profile_pairwise.py` to the
torch profiler. `scripts/gpu_check.sh` runs `python -m bench --quick --device cuda` on a lent GPU.
Each case declares the bytes and/or flops a step must move or do; every row reports them as GB/s and
TFLOP/s and as a share of the copy and matmul rates measured in the same run (`harness.device_limits`).
`scripts/aot_check.py` compiles every kernel for sm_90a without a GPU (its table: results/aot/).
"""
