"""What every op's tests check, written once: values and gradients against the float64 reference
with tolerances per dtype, gradcheck and gradgradcheck, torch.compile against eager, and the CPU
peak memory of a step measured in a fresh interpreter. Each op's test file states its cases and its
op's bounds; the checks live here."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pytest
import torch

from conftest import run_python

# Storage rounding of a result kept in a half-precision dtype, relative to max|ref|: fp16 has an 11-bit,
# bf16 an 8-bit significand. fp16 results of a mean over many elements can be subnormal, whose
# spacing is 2^-24: an absolute floor on top. float32 and float64 bounds are the op's own (its
# accumulation), so each op states them: see `stored_rtol` and `loss_rtol`.
HALF_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
SUBNORMAL_ATOL = {torch.float16: 2.0**-24}


def stored_rtol(float64: float, float32: float) -> dict[torch.dtype, float]:
    """Relative bounds per input dtype for a result stored in the input dtype (outputs, gradients)."""
    return {torch.float64: float64, torch.float32: float32, **HALF_RTOL}


def loss_rtol(float64: float, float32: float) -> dict[torch.dtype, float]:
    """Relative bounds per input dtype for a loss, accumulated and returned in float32 for every input
    dtype but float64: half-precision inputs get the float32 bound."""
    return {torch.float64: float64, torch.float32: float32, torch.float16: float32, torch.bfloat16: float32}


def loss_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is returned in: float64 for float64 inputs, else float32."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def assert_near(got: torch.Tensor, ref: torch.Tensor, name: str, *, rtol: float, atol: float = 0.0,
                floor: float = 0.0, dtype: torch.dtype | None = None) -> None:
    """max|got - ref| <= rtol * max(max|ref|, floor) + atol, got finite, of ref's shape (and `dtype`).

    `floor` stands for the size the result would have were it not ~0 by cancellation (a gradient that
    rounding leaves behind where the exact one vanishes)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    assert dtype is None or got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{name} has non-finite values"
    error, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    bound = rtol * max(scale, floor) + atol
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g} (max |fp64 reference| {scale:.3g})"


def assert_loss_near(loss: torch.Tensor, ref: torch.Tensor, input_dtype: torch.dtype, *, rtol: float,
                     atol: float) -> None:
    """A scalar loss in `loss_dtype(input_dtype)`: |loss - ref| <= rtol * |ref| + atol."""
    assert loss.dim() == 0 and loss.dtype == loss_dtype(input_dtype), f"loss: {loss.dtype} {tuple(loss.shape)}"
    assert_near(loss, ref, "loss", rtol=rtol, atol=atol)


def assert_grads_near(grads: Sequence, ref_grads: Sequence, names: Sequence[str], dtype: torch.dtype, *,
                      rtol: float, atol: float = 0.0, floor: float = 0.0) -> None:
    """Each gradient in the input `dtype` within `assert_near`'s bound; None exactly where the
    reference's is (an input that does not require grad)."""
    for name, got, ref in zip(names, grads, ref_grads, strict=True):
        if ref is None:
            assert got is None, f"{name}: a gradient where the reference has none"
        else:
            assert_near(got, ref, name, rtol=rtol, atol=atol, floor=floor, dtype=dtype)


def value_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], *, wrt: Sequence[bool] | None = None,
                    cotangent: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    parameters: Iterable[torch.Tensor] = ()) -> tuple:
    """(fn(*inputs), d/d input for each input, d/d parameter for each parameter): the inputs become
    fresh leaves (cast to `dtype`), requiring grad where `wrt` says (default: all); None for the others."""
    wrt = [True] * len(inputs) if wrt is None else wrt
    leaves = [x.detach().to(dtype or x.dtype).clone().requires_grad_(w) for x, w in zip(inputs, wrt, strict=True)]
    parameters = list(parameters)
    out = fn(*leaves)
    if cotangent is not None:
        cotangent = cotangent.to(out.dtype)
    targets = [x for x in leaves + parameters if x.requires_grad]
    found = iter(torch.autograd.grad(out, targets, cotangent))
    return (out, *(next(found) if x.requires_grad else None for x in leaves + parameters))


def fused_and_fp64_reference(fused: Callable, reference: Callable, inputs: Sequence[torch.Tensor], *,
                             wrt: Sequence[bool] | None = None, cotangent: torch.Tensor | None = None) -> tuple:
    """`value_and_grads` of the fused op on the inputs as they are, and of the reference on the same
    (rounded) values in float64."""
    return (value_and_grads(fused, inputs, wrt=wrt, cotangent=cotangent),
            value_and_grads(reference, inputs, wrt=wrt, cotangent=cotangent, dtype=torch.float64))


def assert_gradcheck(fn: Callable, inputs: Sequence[torch.Tensor], *, orders: Sequence[int] = (1,),
                     fast_mode: bool = False) -> None:
    """Finite differences in float64 against the analytic derivatives of `fn`, to each of `orders`
    (1: gradcheck, 2: gradgradcheck), with respect to every input."""
    leaves = tuple(x.detach().clone().requires_grad_() for x in inputs)
    assert all(x.dtype == torch.float64 for x in leaves), "finite differences need float64 inputs"
    if 1 in orders:
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast_mode)
    if 2 in orders:
        assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=fast_mode)


def assert_compiles_like_eager(fn: Callable, inputs: Sequence[torch.Tensor], *, compiler: str = "aot_eager",
                               parameters: Iterable[torch.Tensor] = (), cotangent: torch.Tensor | None = None,
                               wrt: Sequence[bool] | None = None, rtol: float = 1e-6, atol: float = 1e-8,
                               grad_rtol: float = 1e-5, grad_atol: float = 1e-9) -> tuple:
    """torch.compile(fn, fullgraph=True) traces without a graph break, and its value and gradients
    (inputs per `wrt`, `parameters`) equal eager's elementwise. Returns the compiled (value, *grads)."""
    torch._dynamo.reset()
    parameters = list(parameters)
    eager = value_and_grads(fn, inputs, wrt=wrt, cotangent=cotangent, parameters=parameters)
    compiled = value_and_grads(torch.compile(fn, fullgraph=True, backend=compiler), inputs, wrt=wrt,
                               cotangent=cotangent, parameters=parameters)
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol)
    for got, ref in zip(compiled[1:], eager[1:]):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=grad_rtol, atol=grad_atol)
    return compiled


# CPU peak memory is the process's peak resident set, reset through /proc/self/clear_refs (Linux).
PEAK_MEMORY_MEASURABLE = Path("/proc/self/clear_refs").exists()
needs_cpu_peak_memory = pytest.mark.skipif(not PEAK_MEMORY_MEASURABLE, reason="needs Linux /proc for CPU peak memory")

_MEASURE_STEP = """
_measured = {make_step}
_measured()  # warm-up: the extension's build, caches
print({name!r}, peak_memory_above_baseline(_measured))
"""


def cpu_peak_memory(setup: str, steps: Mapping[str, str], timeout: float = 600) -> dict[str, int]:
    """Bytes above baseline at the peak of each step, measured in a fresh interpreter whose glibc
    returns every large block on free (skd_kernels.memory.CPU_MEASUREMENT_ENV), so that the peak
    resident set is the peak of live tensors. `setup` is code to run first; `steps` maps a name to an
    expression, evaluated after it, giving the step to measure (a callable of no argument)."""
    from skd_kernels.memory import CPU_MEASUREMENT_ENV

    code = "from skd_kernels.memory import peak_memory_above_baseline\n" + textwrap.dedent(setup)
    code += "".join(_MEASURE_STEP.format(name=name, make_step=make) for name, make in steps.items())
    result = run_python(code, env=CPU_MEASUREMENT_ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: int(value) for name, value in (line.split() for line in result.stdout.strip().splitlines())}
