#!/usr/bin/env bash
# The whole GPU check in one call, for a lent GPU machine (see the developers' guide): build the
# CUDA extension, run the GPU tests, the benchmark (`python -m bench --quick`, every op), the pair-wise
# profile and a short trainer run, each stage time-boxed so that the call ends inside its limit. Logs go
# to $OUT; the benchmark's CSVs, plots and README to $OUT/bench, packed into $OUT/bench.tgz (few files
# come back from a lent machine). To refresh the GPU tables and plots from it:
#   tar -xzf bench.tgz -C /tmp && cp /tmp/bench/cuda/* bench/results/cuda/ && python -m bench --report
#
#   OUT=/tmp/gpu_out bash scripts/gpu_check.sh [seconds]    # default budget 540 s
#   STAGES="build bench" TEST_FILES="tests/test_pairwise.py" ...      # a subset
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
BUDGET=${1:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/skd_ext
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"

STAGES=${STAGES:-build tests bench profile_pairwise train}

# stage NAME SECONDS LOG COMMAND...: run with min(SECONDS, what is left of the budget), if in STAGES.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    [[ " $STAGES " == *" $name "* ]] || return 0
    local left=$((BUDGET - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name: skipped, budget spent" >>"$SUMMARY"
        return
    fi
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s)" >>"$log"
    timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - t0))s (limit ${limit}s)" >>"$SUMMARY"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    nproc
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$SUMMARY" 2>&1

stage build 180 "$OUT/build.log" env SKD_VERBOSE_BUILD=1 "$PY" -c "
import time, torch
from skd_kernels._extension import load_extension
t = time.time(); module = load_extension('cuda'); print('cuda extension:', module, f'{time.time() - t:.0f} s')
assert module is not None, 'the CUDA extension did not build'
torch.ones(1, device='cuda')"

read -r -a GPU_TESTS <<<"${TEST_FILES:-tests/test_pixelwise.py tests/test_pairwise.py tests/test_attention.py tests/test_backends.py tests/test_extension.py}"
stage tests 170 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -n 8 --timeout 120 --tb=short -rfE \
    -k "cuda or triton" "${GPU_TESTS[@]}"

# The benchmark writes each op's CSV and plot as soon as the op is done: a run cut short keeps those.
stage bench 230 "$OUT/bench.log" env TQDM_MININTERVAL=5 "$PY" -m bench --quick --device cuda --out "$OUT/bench"
# The limits the benchmark measured in this run (every row's % of limit is a share of them).
[[ -d "$OUT/bench" ]] && "$PY" -c "
import csv, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob('*/*.csv'))[:1]:
    row = next(csv.DictReader(open(path)))
    print(f\"limits: copy {row['copy_gb_per_s']} GB/s, matmul {row['matmul_float32_tflop_per_s']} TFLOP/s float32, \"
          f\"{row['matmul_float64_tflop_per_s']} float64 ({path.name})\")" "$OUT/bench" >>"$SUMMARY" 2>&1
[[ -d "$OUT/bench" ]] && tar -czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
stage profile_pairwise 40 "$OUT/bench.log" "$PY" -m bench.profile_pairwise --steps 20 --rows 12

TRAIN=(--dataset procedural --crop-size 129 129 --batch-size 8 --steps 30 --no-progress --no-plot --device cuda)
stage train 60 "$OUT/bench.log" bash -c "
$PY -m skd_train train ${TRAIN[*]} --model pspnet_resnet18 --width 0.5 --no-pixel --no-pair --no-holistic --out-dir /tmp/t &&
$PY -m skd_train train ${TRAIN[*]} --model pspnet_resnet18 --width 0.25 --teacher pspnet_resnet18 --teacher-width 0.5 \
    --teacher-weights /tmp/t/model.pt --amp bf16 --out-dir /tmp/s"

echo "total $(($(date +%s) - START))s" >>"$SUMMARY"
cat "$SUMMARY"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -5
