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


def _cases(b, n, dk, dv, modes):
    return [Case(f"{b}x{n}x{dk}x{dv} {p}", size=n, params=dict(shape=(b, n, dk, dv), attention_pass=p),
                 series=p, modes=modes, flops=_flops(p, b, n, dk, dv)) for p in PASSES]


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
# (a 512x512 input gives N = 4096 and 1024).
CASES = [
    *_cases(2, 16, 8, 16, ("tiny",)),
    *_cases(8, 16, 64, 512, ("quick", "full")),
    *_cases(8, 64, 32, 256, ("quick", "full")),
    *_cases(2, 1024, 32, 256, ("quick", "full")),
    *_cases(2, 4096, 32, 256, ("full",)),
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
    found = official_baselines(lambda case: _as_loss(attention_reference, attention_pass),
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
is hard to beat; the fused op is about memory at large N."""

OP = Op(name="attention", title="SAGAN attention", size_label="positions N", cases=CASES,
        make_inputs=make_inputs, impls=impls, notes=NOTES)
