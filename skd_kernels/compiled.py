"""The compiled backends (`cpu`: C++/OpenMP, `cuda`: CUDA C++) behind each op's pass API.

The extension's entry points write into buffers the caller allocates (see csrc/bindings/); these
adapters give them the same Python signatures as `pytorch/<op>.py` and `triton/<op>.py`, so an op
calls every backend alike. `backends.passes` builds one per (op, backend), once.
"""
from __future__ import annotations

import types

import torch

from .ops.pairwise.types import Centred, CentredPair


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The CUDA pixel-wise kernel's last-block ticket on `device`: zeroed once, left 0 by every launch.
    (Launches of the op on two streams of one device at once would share it: not supported.)"""
    if device not in _TICKETS:
        _TICKETS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[device]


def pixelwise(module, device_type: str) -> types.SimpleNamespace:
    def loss_and_grad(student, teacher, labels, ignore_index, inv_tau, kl, constant, pixel_loss, grad_student,
                      grad_teacher):
        """CPU: fills pixel_loss, returns None. CUDA: sums the pixel losses in the kernel and returns the
        sum (a 0-d float64 tensor); pixel_loss is not written."""
        if device_type != "cuda":
            module.pixelwise_loss_and_grad(student, teacher, labels, ignore_index, inv_tau, int(kl), constant,
                                           pixel_loss, grad_student, grad_teacher, None, None)
            return None
        loss_sum = torch.empty(1, dtype=torch.float64, device=student.device)
        module.pixelwise_loss_and_grad(student, teacher, labels, ignore_index, inv_tau, int(kl), constant,
                                       pixel_loss, grad_student, grad_teacher, loss_sum, _ticket(student.device))
        return loss_sum[0]

    return types.SimpleNamespace(loss_and_grad=loss_and_grad)


def pairwise(module, device_type: str) -> types.SimpleNamespace:
    passes = types.SimpleNamespace(nodes_forward=module.pairwise_nodes_forward,
                                   nodes_backward=module.pairwise_nodes_backward)
    if device_type == "cpu":  # fused centring is CPU code; `cuda` borrows the stock one (backends.py)
        passes.centre = lambda u, out: _centre(module, u, out)
        passes.centre_pair = lambda us, ut, out: _centre_pair(module, us, ut, out)
    return passes


def _centre(module, u: torch.Tensor, out: torch.Tensor) -> Centred:
    b, c, m = u.shape
    f64 = dict(dtype=torch.float64, device=u.device)
    result = Centred(out, torch.empty((b, c), **f64), torch.empty((b, m), **f64), torch.empty((b, c), **f64))
    module.pairwise_centre(u, *result)
    return result


def _centre_pair(module, us: torch.Tensor, ut: torch.Tensor, out: torch.Tensor) -> CentredPair:
    b, c, m = us.shape
    f64 = dict(dtype=torch.float64, device=us.device)
    pair = CentredPair(out, torch.empty((b, c), **f64), torch.empty((b, c), **f64), torch.empty((b, m), **f64),
                       torch.empty((b, m), **f64), torch.empty((b, 2 * c), **f64))
    module.pairwise_centre_pair(us, ut, *pair)
    return pair


def attention(module, device_type: str) -> types.SimpleNamespace:
    # CPU kernels only: on a GPU the cuda backend borrows the torch passes (backends.py).
    def forward(q, k, v):
        out = q.new_empty((*q.shape[:2], v.shape[2]))
        lse = q.new_empty(q.shape[:2], dtype=torch.float64)
        module.attention_forward(q, k, v, out, lse)
        return out, lse

    def backward(q, k, v, lse, dout):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        module.attention_backward(q, k, v, lse, dout, dq, dk, dv)
        return dq, dk, dv

    def double_backward(q, k, v, lse, dout, gq, gk, gv):
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(dout))
        module.attention_double_backward(q, k, v, lse, dout, gq, gk, gv, *grads)
        return grads

    return types.SimpleNamespace(forward=forward, backward=backward, double_backward=double_backward)


PASSES = {"pixelwise": pixelwise, "pairwise": pairwise, "attention": attention}
