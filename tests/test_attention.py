"""Fused SAGAN attention: every backend against the float64 reference, to the second derivative."""
from __future__ import annotations

import functools

import pytest
import torch

import skd_kernels as sk
from skd_kernels.backends import ONE_TILE
from skd_kernels.reference import attention_reference

from conftest import backend_device
from op_contract import (assert_compiles_like_eager, assert_gradcheck, assert_near, cpu_peak_memory,
                         fused_and_fp64_reference, needs_cpu_peak_memory, stored_rtol, value_and_grads)

BACKENDS = ["cpu", "torch", "triton", "cuda"]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
# (B, N, Dk, Dv): N = 1; N not a multiple of any tile (CPU strips of 64 rows, Triton tiles of 16/32);
# Dk != Dv; and the official D's first block (N = 64, Dk = 32, Dv = 256).
SHAPES = [(1, 1, 3, 5), (2, 7, 3, 5), (2, 65, 8, 16), (2, 64, 32, 256)]

# Bound on max|got - ref| as a fraction of max|ref|, for results in the input dtype from
# float32 accumulation (float64 for float64). The softmax's relative error grows with the energies
# (exp(S) amplifies an absolute error of S), hence the factor (1 + max|S|) applied to each. Inputs
# are O(1), so a reference that is exactly 0 (N = 1: P = 1) is met to O(eps): scales below 1 count as 1.
RTOL = stored_rtol(float64=1e-13, float32=2e-6)


def make_qkv(shape, dtype, device, scale=1.0, seed=0):
    b, n, dk, dv = shape
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, dk, generator=g) * scale for _ in range(2))
    v, dout = (torch.randn(b, n, dv, generator=g) for _ in range(2))
    return [x.to(dtype).to(device) for x in (q, k, v, dout)]


def energy_factor(q, k) -> float:
    return 1.0 + torch.bmm(q.double(), k.double().transpose(1, 2)).abs().max().item()


def assert_close(got, ref, dtype, factor, name):
    assert_near(got, ref, name, rtol=RTOL[dtype] * factor, floor=1.0, dtype=dtype)


def first_order(fn, q, k, v, dout):
    """(out, dq, dk, dv) for the cotangent dout."""
    return value_and_grads(fn, (q, k, v), cotangent=dout)


def second_order(fn, q, k, v, dout, cotangents):
    """First gradients (create_graph=True), then the gradients of sum <cotangent, first gradient>
    with respect to q, k, v and dout: what a gradient penalty needs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, dout)]
    first = torch.autograd.grad(fn(*leaves[:3]), leaves[:3], leaves[3], create_graph=True)
    total = sum((f * c).sum() for f, c in zip(first, cotangents) if c is not None)
    return first, torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)


def fused(backend):
    return lambda q, k, v: sk.fused_attention(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_fp64_reference(backend, shape):
    device = backend_device(backend)
    q, k, v, dout = make_qkv(shape, torch.float64, device)
    got, ref = fused_and_fp64_reference(fused(backend), attention_reference, (q, k, v), cotangent=dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float64, energy_factor(q, k), name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_within_stated_tolerance(backend, dtype, shape):
    device = backend_device(backend)
    q, k, v, dout = make_qkv(shape, dtype, device, scale=0.7)
    got, ref = fused_and_fp64_reference(fused(backend), attention_reference, (q, k, v), cotangent=dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, dtype, energy_factor(q, k), name)


COTANGENTS = {"all": (1, 1, 1), "dv_only": (0, 0, 1), "dq_dk_only": (1, 1, 0), "dk_only": (0, 1, 0)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", COTANGENTS)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 65, 8, 16)], ids=lambda s: "x".join(map(str, s)))
def test_double_backward_matches_fp64_reference(backend, which, shape):
    device = backend_device(backend)
    q, k, v, dout = make_qkv(shape, torch.float64, device)
    g = torch.Generator().manual_seed(5)
    cotangents = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(device) if use else None
                  for x, use in zip((q, k, v), COTANGENTS[which])]
    first, grads = second_order(fused(backend), q, k, v, dout, cotangents)
    ref_first, ref_grads = second_order(attention_reference, q, k, v, dout, cotangents)
    factor = energy_factor(q, k)
    for name, a, b in zip(("q", "k", "v", "dout"), grads, ref_grads):
        assert_close(a, b, torch.float64, factor, f"second-order gradient of {name}")
    for name, a, b in zip(("dq", "dk", "dv"), first, ref_first):
        assert_close(a, b, torch.float64, factor, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    device = backend_device(backend)
    q, k, v, _ = make_qkv((1, 3, 2, 3), torch.float64, device)  # small: Triton runs interpreted here
    assert_gradcheck(fused(backend), (q, k, v), orders=(1, 2))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_third_derivative_falls_back_exactly(backend):
    backend_device(backend)
    q, k, v, _ = make_qkv((1, 4, 2, 3), torch.float64, "cpu")

    def input_gradient(q, k, v):  # a function whose gradgradcheck needs third derivatives
        out = sk.fused_attention(q, k, v, backend=backend)
        return torch.autograd.grad((out**2).sum(), (q, k, v), create_graph=True)

    assert_gradcheck(input_gradient, (q, k, v), orders=(2,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_keeps_the_second_order_term(backend):
    """dv = P^T dout depends on an upstream parameter W (q = x W) only through P, so the gradient of
    the penalty |dv|^2 with respect to W is exactly the second-order term that SDPA's fused kernels
    and flash-attention kernels drop: it must be non-zero and match the reference."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64).to(device)
    k, v, weights = (torch.randn(2, 33, d, generator=g, dtype=torch.float64).to(device) for d in (4, 7, 7))

    def penalty_gradient(fn):
        w_leaf, v_leaf = w.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(x @ w_leaf, k, v_leaf)
        (dv,) = torch.autograd.grad((out * weights).sum(), v_leaf, create_graph=True)
        return torch.autograd.grad(dv.pow(2).sum(), w_leaf)[0]

    got, ref = penalty_gradient(fused(backend)), penalty_gradient(attention_reference)
    assert ref.abs().max() > 1e-3
    assert_close(got, ref, torch.float64, energy_factor(x @ w, k), "penalty gradient of W")


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_softmax_stays_finite_and_exact(backend):
    """Energies q.k ~ 1e3: exp overflows unless every pass subtracts the row maximum / lse."""
    device = backend_device(backend)
    q, k, v, dout = make_qkv((2, 9, 4, 6), torch.float64, device, scale=20.0)
    assert torch.bmm(q, k.transpose(1, 2)).abs().max() > 500
    cot = [torch.randn_like(x) for x in (q, k, v)]
    got = second_order(fused(backend), q, k, v, dout, cot)
    ref = second_order(attention_reference, q, k, v, dout, cot)
    factor = energy_factor(q, k)
    for a, b in zip((*got[0], *got[1]), (*ref[0], *ref[1])):
        assert_close(a, b, torch.float64, factor, "saturated")
    out32 = sk.fused_attention(q.float(), k.float(), v.float(), backend=backend)
    assert torch.isfinite(out32).all()
    assert_close(out32, attention_reference(q, k, v), torch.float32, factor, "saturated fp32 out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=str)
def test_saved_lse_is_float64_for_every_dtype(backend, dtype):
    """The row log-sum-exp the backward passes read is float64 (B, N) whatever the input dtype (a
    float32 lse costs P ~|lse| eps of relative precision), in the op and in its fake (tracing)."""
    device = backend_device(backend)
    q, k, v, _ = make_qkv((2, 33, 4, 6), dtype, device, scale=3.0)
    _, lse = torch.ops.skd.attention_forward(q, k, v, backend)
    assert lse.dtype == torch.float64 and lse.shape == (2, 33)
    torch.library.opcheck(torch.ops.skd.attention_forward.default, (q, k, v, backend), test_utils=("test_faketensor",))
    if dtype == torch.float64:
        exact = torch.logsumexp(torch.bmm(q, k.transpose(1, 2)), -1)
        assert_close(lse, exact, torch.float64, energy_factor(q, k), "lse")


# --- float32 at large energies ---------------------------------------------------------------------
# An un-scaled SAGAN block's energies q.k grow as D trains (|q.k| ~ 1e2 to 1e4). The naive block loses
# float32 precision there too (S = q.k is itself rounded to ~eps |q| |k|), so the fused path is held to
# the naive block's float32 error at each energy: a float32 lse, or a statistic with cancellation,
# costs it 10-60 times that.
ENERGIES = [1.0, 1e2, 1e3, 1e4]
NAIVE_FACTOR = 2.0
FLOAT32_FLOOR = 1e-6  # relative to max|fp64|: a few float32 roundings, where the naive error is ~0 by luck
RESULTS = ("out", "dq", "dk", "dv", "grad q", "grad k", "grad v", "grad dout")


def energy_case(max_energy, shape=(2, 80, 16, 24), seed=0):
    """float64 q, k, v, dout and cotangents of (dq, dk, dv) with max|q.k| = max_energy. The keys share
    an offset, as a SAGAN block's 1x1 convolution bias gives: it moves each row's lse away from 0
    without changing P, the case where a float32 lse cancels worst."""
    b, n, dk, dv = shape
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, dk, generator=g, dtype=torch.float64) for _ in range(2))
    k += torch.randn(dk, generator=g, dtype=torch.float64)
    scale = (max_energy / torch.bmm(q, k.transpose(1, 2)).abs().max().item()) ** 0.5
    v, dout = (torch.randn(b, n, dv, generator=g, dtype=torch.float64) for _ in range(2))
    cotangents = [torch.randn(b, n, d, generator=g, dtype=torch.float64) for d in (dk, dk, dv)]
    return q * scale, k * scale, v, dout, cotangents


def both_orders(fn, q, k, v, dout, cotangents):
    """Dict of out, (dq, dk, dv) for dout, and the second-order gradients of RESULTS."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, dout)]
    out = fn(*leaves[:3])
    first = torch.autograd.grad(out, leaves[:3], leaves[3], create_graph=True)
    total = sum((f * c).sum() for f, c in zip(first, cotangents))
    second = torch.autograd.grad(total, leaves)
    return {name: x.detach().double().cpu() for name, x in zip(RESULTS, (out, *first, *second))}


@functools.lru_cache(maxsize=None)
def float32_at_energy(backend, max_energy):
    """(fused float32, naive float32, float64 reference) results of `both_orders` (cached: three tests
    read them; the Triton interpreter is slow)."""
    device = backend_device(backend)
    q, k, v, dout, cotangents = energy_case(max_energy)
    ref = both_orders(attention_reference, q, k, v, dout, cotangents)
    low = [x.float().to(device) for x in (q, k, v, dout)], [c.float().to(device) for c in cotangents]
    return both_orders(fused(backend), *low[0], low[1]), both_orders(attention_reference, *low[0], low[1]), ref


def relative_error(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_energy", ENERGIES, ids=lambda e: f"E{e:.0e}")
def test_float32_error_within_twice_the_naive_blocks_at_every_energy(backend, max_energy):
    fused32, naive32, ref = float32_at_energy(backend, max_energy)
    for name in RESULTS:
        fused_error, naive_error = relative_error(fused32[name], ref[name]), relative_error(naive32[name], ref[name])
        assert fused_error <= NAIVE_FACTOR * naive_error + FLOAT32_FLOOR, (
            f"{name}: fused float32 error {fused_error:.2e}, naive {naive_error:.2e} (of max|fp64|)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_energy", ENERGIES, ids=lambda e: f"E{e:.0e}")
def test_key_bias_gradient_vanishes_as_in_the_naive_block(backend, max_energy):
    """sum_j dk_j is the gradient of the key projection's bias: 0 in exact arithmetic, as each row of dS
    (and of dS2) sums to 0. It stays at the naive block's rounding level, first and second order."""
    fused32, naive32, ref = float32_at_energy(backend, max_energy)
    for name in ("dk", "grad k"):
        def key_bias(x):
            return (x.sum(1).abs().max() / ref[name].abs().max()).item()

        assert key_bias(ref[name]) < 1e-12
        got, naive = key_bias(fused32[name]), key_bias(naive32[name])
        assert got <= NAIVE_FACTOR * naive + FLOAT32_FLOOR, f"sum_j {name}_j: fused {got:.2e}, naive {naive:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_rows_of_the_double_backward_match_fp64(backend):
    """Rows whose softmax is one-hot to float64 precision: there dS and dS2 vanish, so their second-order
    gradients (q, dout) are what the cotangents give alone; a statistic with cancellation (C - 2 D Abar
    with D Abar ~ |dP| |k| |gq|) leaves rounding noise of that size instead."""
    fused32, naive32, ref = float32_at_energy(backend, 1e4)
    q, k, *_ = energy_case(1e4)
    s = torch.bmm(q, k.transpose(1, 2))
    saturated = torch.softmax(s, -1).amax(-1) > 1 - 1e-15  # (B, N)
    assert saturated.sum() >= 10, "the case must have saturated rows"
    for name in ("grad q", "grad dout"):
        got, naive, exact = fused32[name][saturated], naive32[name][saturated], ref[name][saturated]
        error, naive_error = (got - exact).abs().max().item(), (naive - exact).abs().max().item()
        assert error <= NAIVE_FACTOR * naive_error + FLOAT32_FLOOR * ref[name].abs().max().item(), (
            f"{name} on saturated rows: error {error:.2e}, naive {naive_error:.2e}, max|fp64| "
            f"{ref[name].abs().max().item():.2e}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_torch_compile_traces_forward_and_backward_without_graph_breaks(backend):
    q, k, v, dout = make_qkv((2, 9, 3, 5), torch.float32, "cpu")
    got = assert_compiles_like_eager(fused(backend), (q, k, v), cotangent=dout)
    ref = first_order(attention_reference, *(x.double() for x in (q, k, v, dout)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float32, energy_factor(q, k), name)


BAD_INPUTS = {
    "q_not_3d": (lambda q, k, v: (q[0], k, v), ValueError, "q must be 3-d"),
    "integer_q": (lambda q, k, v: (q.long(), k, v), TypeError, "q must be float32"),
    "mixed_dtypes": (lambda q, k, v: (q, k.double(), v), TypeError, "q is torch.float32 but k"),
    "k_other_dk": (lambda q, k, v: (q, k[..., :2], v), ValueError, "q and k must both be"),
    "v_other_n": (lambda q, k, v: (q, k, v[:, :3]), ValueError, "v must be (B, N, Dv)"),
    "empty_dv": (lambda q, k, v: (q, k, v[..., :0]), ValueError, "non-empty"),
    "not_a_tensor": (lambda q, k, v: (q, k, v.tolist()), TypeError, "v must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(case):
    transform, error, message = BAD_INPUTS[case]
    q, k, v, _ = make_qkv((2, 5, 3, 4), torch.float32, "cpu")
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        sk.fused_attention(*transform(q, k, v))


def test_unknown_backend_is_named():
    q, k, v, _ = make_qkv((1, 2, 3, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="'bogus' is not a backend"):
        sk.fused_attention(q, k, v, backend="bogus")


MEMORY_SETUP = """
import torch
from skd_kernels import fused_attention
from skd_kernels.reference import attention_reference
g = torch.Generator().manual_seed(0)
q, k, v = [torch.randn(2, 4096, d, generator=g).requires_grad_() for d in (32, 32, 256)]
dout = torch.randn(2, 4096, 256, generator=g)
def step(fn):
    def run():
        fn(q, k, v).backward(dout)
        q.grad = k.grad = v.grad = None
    return run
"""


@needs_cpu_peak_memory
def test_forward_backward_memory_is_linear_in_n_at_n_4096():
    """B=2, N=4096, Dk=32, Dv=256: q, k, v are 10.5 MB (out and the gradients as much again); one
    N x N float32 map is 64 MB per image. The fused step stays O(N * C): at most 4 times the inputs
    (out, gradients, transposed operands, per-thread strips), below half a map; the reference holds several."""
    peaks = cpu_peak_memory(MEMORY_SETUP, {"cpu": 'step(lambda *a: fused_attention(*a, backend="cpu"))',
                                           "reference": "step(attention_reference)"})
    one_map, inputs = 4096 * 4096 * 4, 2 * 4096 * (32 + 32 + 256) * 4
    assert peaks["cpu"] < min(4 * inputs, 0.5 * one_map), peaks
    assert peaks["reference"] > 2 * one_map, peaks  # the measurement does see N x N buffers


@pytest.mark.parametrize("threads", [1, 8], ids=["one_pass", "row_and_column_passes"])
def test_cpu_kernel_paths_match_fp64_reference(threads):
    """The C++ kernel sums dk, dv inside the row pass when every thread owns whole images (B >= threads)
    and runs a separate column pass otherwise: both paths, to the second derivative."""
    backend_device("cpu")
    q, k, v, dout = make_qkv((3, 70, 5, 9), torch.float64, "cpu")
    cot = [torch.randn_like(x) for x in (q, k, v)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = second_order(fused("cpu"), q, k, v, dout, cot)
    finally:
        torch.set_num_threads(saved)
    ref = second_order(attention_reference, q, k, v, dout, cot)
    for name, a, b in zip(("dq", "dk", "dv", "q", "k", "v", "dout"), (*got[0], *got[1]), (*ref[0], *ref[1])):
        assert_close(a, b, torch.float64, energy_factor(q, k), name)


def test_cpu_column_passes_keep_float32_precision_at_large_energies():
    """The column passes (fewer images than threads) recompute P from the saved lse and use the row
    pass's statistics: at |q.k| ~ 1e4 they too stay within twice the naive block's float32 error."""
    backend_device("cpu")
    q, k, v, dout, cotangents = energy_case(1e4)
    ref = both_orders(attention_reference, q, k, v, dout, cotangents)
    low = [x.float() for x in (q, k, v, dout)], [c.float() for c in cotangents]
    naive = both_orders(attention_reference, *low[0], low[1])
    saved = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        got = both_orders(fused("cpu"), *low[0], low[1])
    finally:
        torch.set_num_threads(saved)
    for name in RESULTS:
        fused_error, naive_error = relative_error(got[name], ref[name]), relative_error(naive[name], ref[name])
        assert fused_error <= NAIVE_FACTOR * naive_error + FLOAT32_FLOOR, (name, fused_error, naive_error)


@pytest.mark.parametrize("n", [64, ONE_TILE["attention"] + 1])
def test_automatic_choice_uses_one_platform_tile_only_up_to_one_tile(n, monkeypatch):
    """Small maps (the official discriminator's N = 64 and 16) run as one tile on the platform GEMM;
    larger ones on the tiled kernels; both agree with an explicit backend."""
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, d, generator=g, dtype=torch.float64) for d in (4, 4, 6))
    auto = sk.fused_attention(q.requires_grad_(), k, v)
    one_tile = type(auto.grad_fn).__name__.startswith("Bmm")
    assert one_tile == (n <= ONE_TILE["attention"])
    assert torch.allclose(auto, sk.fused_attention(q, k, v, backend="cpu"), rtol=1e-12, atol=1e-12)
