"""Shared test helpers: which backends run here, tolerances per dtype, comparisons, subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skd_kernels import backends
from skd_kernels.backends import triton_available, triton_interpreting

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()

# Tolerances against the float64 reference evaluated on the same (rounded) inputs.
# Loss: |got - ref| <= loss_atol * (1 + max|logit| / tau) + loss_rtol * |ref|; the loss is accumulated
#   and returned in float32 for every input dtype, hence fp32-level bounds even for fp16/bf16.
# Gradients: max|got - ref| <= grad_rtol * max|ref|; they are stored in the input dtype, so the
#   bound is that dtype's rounding (fp16: 11-bit, bf16: 8-bit significand; fp16 gradients of a mean
#   over many pixels are subnormal, whose spacing is 2^-24, hence grad_atol). The teacher's gradient,
#   q_t * (l_c - sum_c q_t l_c), subtracts terms as large as the logits, so its absolute error also
#   grows with them: callers add atol = loss_atol * max|logit| / tau * max|grad student|.
TOLERANCES = {
    torch.float64: dict(loss_rtol=1e-12, loss_atol=1e-12, grad_rtol=1e-12, grad_atol=0.0),
    torch.float32: dict(loss_rtol=2e-6, loss_atol=2e-6, grad_rtol=2e-6, grad_atol=0.0),
    torch.float16: dict(loss_rtol=2e-6, loss_atol=2e-6, grad_rtol=1e-3, grad_atol=2.0**-24),
    torch.bfloat16: dict(loss_rtol=2e-6, loss_atol=2e-6, grad_rtol=8e-3, grad_atol=0.0),
}


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


def assert_loss_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, logit_scale: float = 1.0):
    tol = TOLERANCES[dtype]
    got, ref = float(got.detach()), float(ref.detach())
    bound = tol["loss_atol"] * (1 + logit_scale) + tol["loss_rtol"] * abs(ref)
    assert abs(got - ref) <= bound, f"loss {got!r} vs fp64 reference {ref!r} (bound {bound:.3g})"


def assert_grad_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "gradient",
                      atol: float = 0.0):
    tol = TOLERANCES[dtype]
    assert got.shape == ref.shape and got.dtype == dtype, f"{name}: {got.shape} {got.dtype}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    error, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert torch.isfinite(got).all(), f"{name} has non-finite values"
    assert error <= tol["grad_rtol"] * scale + tol["grad_atol"] + atol + 1e-300, f"{name}: max error {error:.3g} vs max {scale:.3g}"


def run_python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)

# CPU peak-memory measurement reads /proc (Linux).
CPU_BACKENDS_HERE = Path("/proc/self/clear_refs").exists()
