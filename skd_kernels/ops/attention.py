"""Fused SAGAN self-attention: input checks, torch.library ops and their autograd. The math, the
double backward's derivation included: docs/ops/attention.md.

Three ops, each a pass over the attention map one tile of rows at a time (never N x N):
  skd::attention_forward(q, k, v)                        -> (out, lse)
  skd::attention_backward(q, k, v, lse, dout)            -> (dq, dk, dv)
  skd::attention_double_backward(q, k, v, lse, dout, gq, gk, gv) -> (grad q, grad k, grad v, grad dout)
The forward's autograd calls attention_backward; attention_backward's autograd calls
attention_double_backward, so `torch.autograd.grad(..., create_graph=True)` followed by a second
backward (a gradient penalty) is exact and memory-lean. A third derivative falls back to
differentiating the reference.

Arithmetic is float32 for float32/float16/bfloat16 input and float64 for float64: half inputs are
converted once to float32 (O(N*C) memory) and results rounded back to the input dtype. `lse` is
float64 (B, N) for every input dtype: at energies |q.k| ~ 1e3 a float32 lse is off by ~1e-4 absolute,
which exp(S - lse) turns into a relative error of P (docs/ops/attention.md, "Precision at large energies").

Eager calls run the same passes under torch.autograd.Function classes (the end of this file), not
through the dispatcher; torch.compile traces the ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as check
from ..backends import REFERENCE, passes, resolve
from ..reference import accumulation_dtype, attention_reference


def _check_inputs(q, k, v) -> None:
    check.check_float_tensor("q", q, 3, "(B, N, Dk)")
    check.check_float_tensor("k", k, 3, "(B, N, Dk)")
    check.check_float_tensor("v", v, 3, "(B, N, Dv)")
    check.check_same("q", q, "k", k)
    check.check_same("q", q, "v", v)
    if q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, N, Dk) with the same sizes; got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be (B, N, Dv) with the (B, N) of q = {tuple(q.shape[:2])}; got {tuple(v.shape)}")
    if min(q.shape) == 0 or v.shape[2] == 0:
        raise ValueError(f"q, k, v must be non-empty; got {tuple(q.shape)} and v {tuple(v.shape)}")
    check.check_finite("q", q)
    check.check_finite("k", k)
    check.check_finite("v", v)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """SAGAN attention without the N x N map: out[b, i] = sum_j softmax_j(q[b, i] . k[b, j]) v[b, j]
    (no 1/sqrt(d) scaling, as in the official Self_Attn).

    Args:
        q, k: (B, N, Dk); v: (B, N, Dv); float32/float16/bfloat16/float64, same dtype and device.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"auto"``; default: SKD_BACKEND
            or auto.

    Returns:
        out (B, N, Dv) in the inputs' dtype. Differentiable twice exactly (gradient penalties);
        memory O(B * N * (Dk + Dv)) plus one tile of the map, forward and backward. With the
        automatic choice and N <= backends.ONE_TILE the map is that one tile, computed by the
        reference formula under autograd.
    """
    _check_inputs(q, k, v)
    name = resolve("attention", q.device.type, backend, size=q.shape[1])
    if name == REFERENCE:
        return attention_reference(q, k, v)
    out, _ = _call_forward(q, k, v, name)
    return out


def _acc(x: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The passes take contiguous tensors in the accumulation dtype."""
    return None if x is None else x.to(dtype).contiguous()


# --- the ops --------------------------------------------------------------------------------------

@torch.library.custom_op("skd::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated input -> (out (B, N, Dv) in the input dtype, row log-sum-exp (B, N), float64)."""
    return _forward_passes(q, k, v, backend)


def _forward_passes(q, k, v, backend):
    acc = accumulation_dtype(q)
    out, lse = passes("attention", backend).forward(_acc(q, acc), _acc(k, acc), _acc(v, acc))
    return out.to(q.dtype), lse


@attention_forward.register_fake
def _(q, k, v, backend):
    return q.new_empty((*q.shape[:2], v.shape[2])), q.new_empty(q.shape[:2], dtype=torch.float64)


@torch.library.custom_op("skd::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the attention for the incoming gradient dout (B, N, Dv), in the input dtype.

    Every backend forms D_i = sum_j P_ij dP_ij from the recomputed map rather than dout_i . out_i: see
    docs/ops/attention.md, "First derivatives"."""
    return _backward_passes(q, k, v, lse, dout, backend)


def _backward_passes(q, k, v, lse, dout, backend):
    acc = accumulation_dtype(q)
    grads = passes("attention", backend).backward(_acc(q, acc), _acc(k, acc), _acc(v, acc), _acc(lse, torch.float64),
                                                  _acc(dout, acc))
    return tuple(g.to(q.dtype) for g in grads)


@attention_backward.register_fake
def _(q, k, v, lse, dout, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("skd::attention_double_backward", mutates_args=())
def attention_double_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                              dout: torch.Tensor, gq: Optional[torch.Tensor], gk: Optional[torch.Tensor],
                              gv: Optional[torch.Tensor], backend: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients with respect to (q, k, v, dout) of <gq, dq> + <gk, dk> + <gv, dv>, where (dq, dk, dv)
    is attention_backward's result; gq, gk (B, N, Dk), gv (B, N, Dv) or None for zero."""
    return _double_backward_passes(q, k, v, lse, dout, gq, gk, gv, backend)


def _double_backward_passes(q, k, v, lse, dout, gq, gk, gv, backend):
    acc = accumulation_dtype(q)
    inputs = (_acc(x, torch.float64 if x is lse else acc) for x in (q, k, v, lse, dout, gq, gk, gv))
    grads = passes("attention", backend).double_backward(*inputs)
    return tuple(g.to(q.dtype) for g in grads)


@attention_double_backward.register_fake
def _(q, k, v, lse, dout, gq, gk, gv, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(dout)


# --- autograd -------------------------------------------------------------------------------------

def _forward_setup(ctx, inputs, output):
    q, k, v, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, lse)
    ctx.backend = backend


def _forward_backward(ctx, dout, _dlse):
    if dout is None:
        return None, None, None, None
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = _call_backward(q, k, v, lse, dout.contiguous(), ctx.backend)
    return dq, dk, dv, None


attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output):
    q, k, v, lse, dout, backend = inputs
    ctx.save_for_backward(q, k, v, lse, dout)
    ctx.backend = backend


def _backward_backward(ctx, gq, gk, gv):
    # `lse` is a function of q and k: the formulas differentiate through it, so it gets no gradient of
    # its own (that would count its dependence twice).
    q, k, v, lse, dout = ctx.saved_tensors
    need_q, need_k, need_v, _, need_dout, _ = ctx.needs_input_grad
    if not (need_q or need_k or need_v or need_dout) or (gq is None and gk is None and gv is None):
        return (None,) * 6
    if torch.is_grad_enabled():
        grads = _third_order_via_reference(q, k, v, dout, gq, gk, gv)
    else:
        double_backward = (attention_double_backward if torch.compiler.is_compiling()
                           else _double_backward_passes)
        grads = double_backward(q, k, v, lse, dout, gq, gk, gv, ctx.backend)
    grad_q, grad_k, grad_v, grad_dout = grads
    return (grad_q if need_q else None, grad_k if need_k else None, grad_v if need_v else None, None,
            grad_dout if need_dout else None, None)


def _third_order_via_reference(q, k, v, dout, gq, gk, gv):
    """The double backward as a differentiable graph (create_graph=True twice), from the reference:
    materialises N x N, but only a third derivative ever comes here."""
    leaves = [x if x.requires_grad else x.detach().requires_grad_() for x in (q, k, v, dout)]
    out = attention_reference(*leaves[:3])
    first = torch.autograd.grad(out, leaves[:3], leaves[3], create_graph=True)
    total = sum((f * g).sum() for f, g in zip(first, (gq, gk, gv)) if g is not None)
    return torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True, materialize_grads=True)


attention_backward.register_autograd(_backward_backward, setup_context=_backward_setup)


# --- eager calls ----------------------------------------------------------------------------------
# Eager calls skip the torch.library dispatcher (its Python autograd wrapper costs tens of us a call,
# and a D step makes dozens): the same passes and the same autograd functions, under
# torch.autograd.Function. torch.compile traces the ops.

class _EagerForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, backend):
        output = _forward_passes(q, k, v, backend)
        _forward_setup(ctx, (q, k, v, backend), output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _forward_backward(ctx, dout, dlse)


class _EagerBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lse, dout, backend):
        grads = _backward_passes(q, k, v, lse, dout, backend)
        _backward_setup(ctx, (q, k, v, lse, dout, backend), grads)
        return grads

    @staticmethod
    def backward(ctx, gq, gk, gv):
        return _backward_backward(ctx, gq, gk, gv)


def _recording(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _call_forward(q, k, v, backend):
    if torch.compiler.is_compiling():
        return attention_forward(q, k, v, backend)
    return _EagerForward.apply(q, k, v, backend) if _recording(q, k, v) else _forward_passes(q, k, v, backend)


def _call_backward(q, k, v, lse, dout, backend):
    if torch.compiler.is_compiling():
        return attention_backward(q, k, v, lse, dout, backend)
    if _recording(q, k, v, dout):
        return _EagerBackward.apply(q, k, v, lse, dout, backend)
    return _backward_passes(q, k, v, lse, dout, backend)
