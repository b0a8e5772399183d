"""SAGAN attention (softmax(q k^T) v, no 1/sqrt(d)): cases and baselines.

Passes: `fwd_bwd` (the output's backward) and `double_bwd` (the gradient penalty's: input gradients
with create_graph=True, then the backward of their squared norm). Baselines: the official Self_Attn
block (skd_kernels.reference.attention_reference, the N x N map materialised), eager and compiled
(inductor has no double backward), and F.scaled_dot_product_attention with scale=1 on every SDPA
backend that runs the case (the math backend alone has a double backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import skd_kernels as sk
from bench.harness import Case, Impl, Op, loss_step, official_baselines
from skd_kernels.reference import attention_reference

PASSES = ("fwd_bwd", "double_bwd")
NO_DOUBLE_BACKWARD = "not run: no double backward"
GPU_ONLY = ("cuda",)
# The GPU-only cases are the D's two blocks at a 512 x 512 input, batch 8 (issue #11): the GPU check
# runs them once in its few minutes, so they leave out what costs compile time or only restates the
# CPU fallback.
GPU_ONLY_SKIPS = {
    "official_compiled": "not run in the GPU-only cases: inductor compiles each shape for tens of seconds "
                         "(the smaller cases have it)",
    "skd_torch": "not run in the GPU-only cases: the torch backend is the CPU's fallback passes",
}
# The fused backends compute in float32 whatever the input: their half-precision rows differ from the
# float32 ones by two conversions. The slower one (cuda) is timed in float32 only.
GPU_ONLY_HALF_SKIPS = {"skd_cuda": "not run in the GPU-only half-precision cases: it computes in float32 like "
                                   "the float32 row, which times it"}


def _cases(b, n, dk, dv, modes, devices=("cpu", "cuda"), dtype="", series=""):
    suffix = f" {dtype}" if dtype else ""
    return [Case(f"{b}x{n}x{dk}x{dv} {p}{suffix}", size=n, params=dict(shape=(b, n, dk, dv), attention_pass=p),
                 series=f"{p}{series}{suffix}", modes=modes, flops=_flops(p, b, n, dk, dv), devices=devices,
                 dtype=dtype) for p in PASSES]


def _flops(attention_pass, b, n, dk, dv):
    """Compute-bound: the products over the N² pairs of positions, 2·B·N² flops per pair and vector
    width, S = q·kᵀ and dP = dO·vᵀ recomputed by each pass that needs them (the map is never stored):
    forward S, P·v: Dk + Dv; backward S, dP, dv = Pᵀ·dO, dq = dS·k, dk = dSᵀ·q: 3·Dk + 2·Dv; double
    backward (docs/ops/attention.md) S, gq·kᵀ, q·gkᵀ, dS·gk + dS2·k, dSᵀ·gq + dS2ᵀ·q: 7·Dk, and dP,
    dO·gvᵀ, Gᵀ·dO, G·v + P·gv: 5·Dv. fwd_bwd: 4·Dk + 3·Dv; double_bwd (forward, backward, double
    backward): 11·Dk + 8·Dv. The softmax's exponentials are not counted."""
    per_pair = 4 * dk + 3 * dv if attention_pass == "fwd_bwd" else 11 * dk + 8 * dv
    return 2 * b * n * n * per_pair


# (B, N, Dk, Dv): the official D's two blocks on 65x65 logits (N = 64 and 16), then large maps
# (a 512x512 input gives N = 4096 and 1024). On a GPU also both blocks at 512 x 512, batch 8, in
# float32 and in bfloat16 (whose official baseline is the block computed in bfloat16, as autocast runs it).
CASES = [
    *_cases(2, 16, 8, 16, ("tiny",)),
    *_cases(8, 16, 64, 512, ("quick", "full")),
    *_cases(8, 64, 32, 256, ("quick", "full")),
    *_cases(2, 1024, 32, 256, ("quick", "full")),
    *_cases(2, 4096, 32, 256, ("full",)),
    *[case for dtype in ("float32", "bfloat16")
      for shape in ((8, 4096, 32, 256), (8, 1024, 64, 512))
      for case in _cases(*shape, ("quick", "full"), GPU_ONLY, dtype, series=" 512² B=8")],
]


def make_inputs(case, device, dtype):
    b, n, dk, dv = case.params["shape"]
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, n, dk, generator=g).div_(dk**0.5).to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, n, dv, generator=g).to(device, dtype).requires_grad_()
    weights = torch.randn(b, n, dv, generator=g).to(device, dtype)
    return dict(q=q, k=k, v=v, weights=weights)


def _as_loss(attention, attention_pass):
    """The step's loss from an attention function: <out, weights>, or the squared norm of its input
    gradients taken with create_graph=True (what the gradient penalty differentiates)."""
    def fwd_bwd(q, k, v, weights):
        return (attention(q, k, v) * weights).sum()

    def double_bwd(q, k, v, weights):
        grads = torch.autograd.grad((attention(q, k, v) * weights).sum(), (q, k, v), create_graph=True)
        return sum(grad.pow(2).sum() for grad in grads)

    return fwd_bwd if attention_pass == "fwd_bwd" else double_bwd


def _official_in_input_dtype(q, k, v):
    """The official block's formula in the inputs' own dtype (bf16 bmm and softmax): the naive
    baseline of a half-precision case. attention_reference computes in float32 whatever the input."""
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)


def _official(case):
    half = case.dtype in ("float16", "bfloat16")
    return _official_in_input_dtype if half else attention_reference


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def attention(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)[:, 0]
    return attention


def _sdpa_backends(device):
    from torch.nn.attention import SDPBackend

    names = ["MATH", "FLASH_ATTENTION"] + (["EFFICIENT_ATTENTION", "CUDNN_ATTENTION"] if device.type == "cuda" else [])
    return [getattr(SDPBackend, name) for name in names if hasattr(SDPBackend, name)]


def _fused(backend):
    return lambda q, k, v: sk.fused_attention(q, k, v, backend=backend)


def impls(case, device):
    attention_pass = case.params["attention_pass"]
    double = attention_pass == "double_bwd"
    found = official_baselines(lambda case: _as_loss(_official(case), attention_pass),
                               compile_unsupported="not run: torch.compile has no double backward" if double else "")
    for backend in _sdpa_backends(device):
        name = f"sdpa_{backend.name.lower().replace('_attention', '')}"
        if double and backend.name != "MATH":
            found.append(Impl(name, unsupported=NO_DOUBLE_BACKWARD))
        else:
            found.append(Impl(name, lambda case, inputs, b=backend: loss_step(_as_loss(_sdpa(b), attention_pass), inputs)))
    for backend in sk.available_backends(device):
        if backend != "triton" or device.type == "cuda":
            found.append(Impl(f"skd_{backend}",
                              lambda case, inputs, b=backend: loss_step(_as_loss(_fused(b), attention_pass), inputs)))
    if case.devices == GPU_ONLY:
        skips = {**GPU_ONLY_SKIPS, **(GPU_ONLY_HALF_SKIPS if case.dtype != "float32" else {})}
        found = [Impl(impl.name, unsupported=skips[impl.name]) if impl.name in skips and not impl.unsupported
                 else impl for impl in found]
    return found


NOTES = """\
The discriminator's self-attention alone: q, k (B, N, Dk), v (B, N, Dv), out = softmax(q kᵀ) v with no
1/√d (SAGAN's), in the two passes the holistic loss needs: `fwd_bwd`, and `double_bwd`, the gradient
penalty's (input gradients with create_graph=True, then the backward of their squared norm). The official
block materialises the N × N map (and, for the double backward, its graph); the fused op keeps
row tiles only. `sdpa_*` is `F.scaled_dot_product_attention(scale=1)` on each SDPA backend (only the math
backend has a double backward; GPU flash kernels need half precision); torch.compile (inductor) has no
double backward either. `size` is N; the official D has N = 64 and 16 on 65 × 65 logits, 4096 and 1024
on 512 × 512. At the official sizes every map is one tile and the platform GEMM behind the naive block
is hard to beat; the fused op is about memory at large N. On a GPU the series `… 512² B=8` are both
blocks of the D at a 512 × 512 input, batch 8 (N = 4096, Dk = 32, Dv = 256 and N = 1024, Dk = 64,
Dv = 512), in float32 and in bfloat16; the bfloat16 `official` is the block computed in bfloat16 (as
autocast runs it), and `sdpa_efficient` / `sdpa_cudnn` are the SDPA kernels that accept `scale=1` with
Dk ≠ Dv (flash needs Dk = Dv); a row whose kernel refuses the case says so in its note."""

OP = Op(name="attention", title="SAGAN attention", size_label="positions N", cases=CASES,
        make_inputs=make_inputs, impls=impls, notes=NOTES)
