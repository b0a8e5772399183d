"""Shared test helpers: which backends run here, and a fresh interpreter. What each op's tests check
(the fp64 comparison, gradcheck, torch.compile, peak memory) is in op_contract.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skd_kernels import backends
from skd_kernels.backends import triton_available, triton_interpreting

# op_contract.py holds the asserts of every op's tests: show their operands on failure, as here.
pytest.register_assert_rewrite("op_contract")

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_backend_choice():
    """Backend choices are cached and SKD_BACKEND is read once: each test starts without either."""
    backends.reset()
    yield
    backends.reset()


def backend_device(backend: str) -> torch.device:
    """The device a backend's tests run on here, or skip with the reason."""
    if backend in ("torch", "cpu"):
        return torch.device("cpu")
    if backend == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU")
        return torch.device("cuda")
    if not triton_available():
        pytest.skip("Triton is not installed")
    if HAS_CUDA:
        return torch.device("cuda")
    if triton_interpreting():
        return torch.device("cpu")
    pytest.skip("Triton on CPU runs under TRITON_INTERPRET=1 in a subprocess: test_triton_interpreter.py")


def run_python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
