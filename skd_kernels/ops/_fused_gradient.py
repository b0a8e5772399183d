"""Autograd shared by the ops whose forward returns the loss together with its gradients.

Such an op is `op(student, teacher, *options, grad_student, grad_teacher, backend) -> (loss,
d loss / d student or empty, d loss / d teacher or empty)`: the fused kernel gets the gradients for
little more than the loss. Autograd keeps those buffers and the backward only scales them by the
incoming gradient, in place (they belong to this graph alone). A second backward (retain_graph=True)
recomputes them; create_graph=True differentiates the op's reference instead, so second derivatives
are exact.

Eager calls skip the torch.library dispatcher: its Python autograd wrapper costs about 80 us a call
on a CPU, as much as the whole official loss at its default size on a GPU. They run the same device
kernels under a torch.autograd.Function with the same context and backward; torch.compile still
traces the op.
"""
from __future__ import annotations

import torch

from ..reference import accumulation_dtype


def _fake_outputs(student, teacher, *options_and_flags):
    """Shapes and dtypes of the op's outputs, for tracing."""
    grad_student, grad_teacher = options_and_flags[-3], options_and_flags[-2]
    empty = student.new_empty(0)  # "not computed"; a custom op may not return one tensor twice
    return (student.new_empty((), dtype=accumulation_dtype(student)),
            torch.empty_like(student) if grad_student else empty,
            torch.empty_like(teacher) if grad_teacher else empty.clone())


def register_fused_gradient_op(op, fused_forward, reference_loss, scale_in_place=None):
    """Registers the fake and the autograd of `op`, whose body is `fused_forward`, and returns the
    function to call it with (the op's arguments).

    `fused_forward(student, teacher, *options, grad_student, grad_teacher, backend)` returns the op's
    outputs; `reference_loss(student, teacher, *options)` is its reference, for double backward;
    `scale_in_place(backend)`, if given, returns a function (gradient, grad_loss) -> gradient that
    scales on the device (skipping an incoming 1 there), or None for the plain `mul_`.
    """
    op.register_fake(_fake_outputs)

    def setup_context(ctx, inputs, output):
        _, gs, gt = output
        ctx.mark_non_differentiable(gs, gt)
        ctx.set_materialize_grads(False)
        ctx.tensor_slots = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        grad_student, grad_teacher = inputs[-3], inputs[-2]
        ctx.fused = (gs if grad_student else None, gt if grad_teacher else None)

    def backward(ctx, grad_loss, _grad_gs, _grad_gt):
        nothing = (None,) * (len(ctx.others) - 2)
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None or not (need_s or need_t):
            return (None, None, *nothing)
        inputs = list(ctx.others)
        for slot, tensor in zip(ctx.tensor_slots, ctx.saved_tensors):
            inputs[slot] = tensor
        student, teacher, arguments, backend = inputs[0], inputs[1], inputs[:-3], inputs[-1]
        if torch.is_grad_enabled():
            # create_graph=True: the fused gradient is a constant to autograd, so differentiate the
            # reference; second derivatives are then exact (at the reference's memory cost).
            loss = reference_loss(*arguments)
            wanted = [x for x, need in ((student, need_s), (teacher, need_t)) if need]
            grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
            return (next(grads) if need_s else None, next(grads) if need_t else None, *nothing)
        gs, gt = ctx.fused
        ctx.fused = (None, None)
        if (need_s and gs is None) or (need_t and gt is None):  # a second backward (retain_graph=True)
            _, gs, gt = op(*arguments, need_s, need_t, backend)
        # loss.backward() on the CPU passes exactly 1 (checked without a device sync, and not while
        # tracing, where the value is unknown): then there is nothing to scale.
        if torch.compiler.is_compiling() or not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            scale = scale_in_place(backend) if scale_in_place is not None and not torch.compiler.is_compiling() else None
            scale = scale or (lambda g, factor: g.mul_(factor))
            gs = scale(gs, grad_loss) if need_s else None
            gt = scale(gt, grad_loss) if need_t else None
        return (gs if need_s else None, gt if need_t else None, *nothing)

    op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = fused_forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, grad_loss, grad_gs, grad_gt):
            return backward(ctx, grad_loss, grad_gs, grad_gt)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        if not (torch.is_grad_enabled() and (inputs[0].requires_grad or inputs[1].requires_grad)):
            return fused_forward(*inputs)
        return Eager.apply(*inputs)

    return call
