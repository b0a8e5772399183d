"""CUDA graphs of the holistic loss's two steps: the discriminator's step (adversarial loss, gradient
penalty, backward) and the student's adversarial term -mean D(S) with its input gradient. Each is
captured once and then replayed, one launch for the whole step. Why and when: docs/ops/holistic.md
("CUDA graphs").

    graphed = capture_d_step(loss, student, teacher)          # loss: a HolisticDistillLoss on the GPU
    for ...:
        discriminator.zero_grad(set_to_none=False)              # the graph accumulates into these .grad
        total, adversarial, penalty = graphed(student, teacher)  # = loss.d_step(student, teacher)
        optimizer_d.step()                                      # outside the graph

    adv_g = capture_g_loss(discriminator, d_input)             # d_input: what the student's G term feeds D
    loss = task + weight * adv_g(d_input)                     # differentiable w.r.t. d_input

What capture needs, and how it is met:
- Fixed memory: inputs are copied into buffers made at capture (a call with another shape, dtype or
  device raises); outputs are buffers each replay rewrites (copy them to keep them).
- No host sync in the step: d_step and g_loss read no tensor value on the host (tests/test_holistic.py).
- Warm-up on a side stream before capture, as the PyTorch CUDA-graphs recipe prescribes: it builds the
  extension, compiles and autotunes the Triton kernels and lets cuDNN and autograd settle. The warm-up
  steps change the discriminator (power iterations, BatchNorm statistics, gradients); capture undoes
  that, so capturing leaves the module as it found it (its .grad allocated, zero where there was none).
- Random numbers: the penalty's alpha is drawn inside the graph on the GPU (torch.rand on the default
  CUDA generator, which graph replays advance: each replay draws new alphas). Eager d_step draws alpha
  on the CPU generator as the official code does, so a captured and an eager step seeded alike draw
  different alphas from the same distribution; `GraphedDStep.alpha` holds the last replay's.
- Gradients: the graph adds into the .grad tensors that exist at capture, as d_step adds into .grad.
  Zero them in place (zero_grad(set_to_none=False)) before each replay; a replay after they were
  replaced or set to None raises instead of writing where nobody reads.
- Autocast: each step is captured under the caller's autocast state (without its weight-cast cache,
  which a graph cannot reuse across replays).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .holistic import HolisticDistillLoss, adversarial_g_loss
from .modules import first_output

WARMUP_STEPS = 3  # the PyTorch recipe's count; DDP needs 11, which this module does not capture


def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return repr(x)
    return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"


class StaticInputs:
    """The buffers a graph reads, made from example tensors (None: an input the step does not take).
    `fill(**tensors)` copies new values in, after checking each has its example's shape, dtype and
    device: a graph replays the memory addresses and sizes it was captured with."""

    def __init__(self, **examples: Optional[torch.Tensor]):
        self.buffers = {name: None if x is None else x.detach().clone() for name, x in examples.items()}

    def __getitem__(self, name: str) -> Optional[torch.Tensor]:
        return self.buffers[name]

    def fill(self, **tensors: Optional[torch.Tensor]) -> None:
        if set(tensors) != set(self.buffers):
            raise TypeError(f"expected the inputs {sorted(self.buffers)}, got {sorted(tensors)}")
        for name, x in tensors.items():
            buffer = self.buffers[name]
            if buffer is None and x is None:
                continue
            if (buffer is None or not isinstance(x, torch.Tensor) or x.shape != buffer.shape
                    or x.dtype != buffer.dtype or x.device != buffer.device):
                raise ValueError(f"{name}: the step was captured for {_describe(buffer)}, got {_describe(x)}; "
                                 f"a CUDA graph replays fixed shapes: capture again for new ones")
        with torch.no_grad():  # a buffer may be a leaf that requires grad (the G term's input)
            for name, x in tensors.items():
                if x is not None:
                    self.buffers[name].copy_(x.detach())


def _check_cuda(module: nn.Module, **tensors: Optional[torch.Tensor]) -> torch.device:
    """The device every tensor and the module's parameters share, which must be a GPU."""
    for name, x in tensors.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.device.type != "cuda":
            raise ValueError(f"{name} is on {x.device}: CUDA graphs capture GPU work only (on the CPU call "
                             f"HolisticDistillLoss.d_step / g_loss directly)")
    device = next(x for x in tensors.values() if x is not None).device
    for name, p in module.named_parameters():
        if p.device != device:
            raise ValueError(f"the discriminator's {name} is on {p.device}, the inputs on {device}")
    if not torch.cuda.is_available():  # only reachable with a CUDA tensor and no usable driver
        raise RuntimeError("CUDA graphs need a CUDA device; none is available")
    return device


@contextlib.contextmanager
def _module_state_kept(module: nn.Module):
    """Undo on exit what warm-up steps do to `module`: parameters, buffers and gradients are copied
    back (in place, so every tensor a graph captured stays the one the module holds)."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()  # the warm-up ran on a side stream
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)


def _autocast_of_caller(device: torch.device):
    """The caller's autocast state for `device`, weight-cast cache off (a cast cached during capture
    would be the captured weights' forever)."""
    kind = device.type
    return lambda: torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind),
                                  cache_enabled=False)


def _capture(step, device: torch.device, warmup: int):
    """Warm `step` up on a side stream, then capture it: (graph, its outputs, bytes its private pool
    reserved)."""
    autocast = _autocast_of_caller(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast():
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # torch.cuda.graph empties it on entry too: measure the pool from there
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast():
        outputs = step()
    torch.cuda.synchronize(device)
    return graph, outputs, torch.cuda.memory_reserved(device) - reserved


class GraphedDStep:
    """`HolisticDistillLoss.d_step` captured in a CUDA graph; made by :func:`capture_d_step`.

    graphed(student, teacher[, image]) -> (total, adversarial, penalty), the d_step's terms, in buffers
    the next replay rewrites; the step's gradients are added into the discriminator's .grad.
    `alpha` (B,): the penalty's interpolation weights of the last replay (None for hinge).
    `held_bytes`: GPU memory the graph's private pool holds between replays.
    """

    def __init__(self, loss: HolisticDistillLoss, student: torch.Tensor, teacher: torch.Tensor,
                 image: Optional[torch.Tensor] = None, warmup: int = WARMUP_STEPS):
        if not isinstance(loss, HolisticDistillLoss):
            raise TypeError(f"loss must be a HolisticDistillLoss, got {type(loss).__name__}")
        d = loss.discriminator
        device = _check_cuda(d, student=student, teacher=teacher, image=image)
        self.params = [p for p in d.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the discriminator has no parameter that requires grad, so the D step would compute "
                             "no gradient: call discriminator.requires_grad_(True) before capturing")
        self.inputs = StaticInputs(student=student, teacher=teacher, image=image)
        batch = student.shape[0]
        draws_alpha = loss.adv_type == "wgan-gp"

        def step():
            alpha = torch.rand(batch, device=device) if draws_alpha else None
            terms = loss.d_step(self.inputs["student"], self.inputs["teacher"], self.inputs["image"], alpha=alpha)
            return (*terms, alpha)

        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        with _module_state_kept(d):
            self.graph, outputs, self.held_bytes = _capture(step, device, warmup)
        *self.terms, self.alpha = outputs

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, image: Optional[torch.Tensor] = None):
        self.inputs.fill(student=student, teacher=teacher, image=image)
        for p, grad in zip(self.params, self.grads):
            if p.grad is not grad:
                raise RuntimeError("a discriminator parameter's .grad was replaced or set to None since capture "
                                   "(zero_grad(set_to_none=True)?): the graph adds into the tensors it captured; "
                                   "zero them with zero_grad(set_to_none=False)")
        self.graph.replay()
        return tuple(self.terms)


def capture_d_step(loss: HolisticDistillLoss, student: torch.Tensor, teacher: torch.Tensor,
                   image: Optional[torch.Tensor] = None, *, warmup: int = WARMUP_STEPS) -> GraphedDStep:
    """Capture `loss.d_step` on score maps shaped like `student`, `teacher` (B, K, H, W) (and `image`
    for an image-conditioned discriminator), all on one GPU with the discriminator. The module is left
    as it was; the gradients of every replay are added into the .grad tensors it holds now (allocated
    as zeros where absent). See the module docstring for the contract."""
    return GraphedDStep(loss, student, teacher, image, warmup)


class _ReplayWithInputGradient(torch.autograd.Function):
    """The captured G term as an autograd node: forward replays the graph (loss and input gradient
    in one launch), backward scales the input gradient the replay computed."""

    @staticmethod
    def forward(ctx, student, image, graphed):
        loss, grad = graphed.replay(student, image)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad_loss * grad, None, None


class GraphedGLoss:
    """-mean D(student), the student's adversarial term (unweighted), captured in a CUDA graph together
    with its gradient with respect to `student`; made by :func:`capture_g_loss`.

    graphed(student[, image]) -> the loss (a scalar), differentiable w.r.t. student: its backward
    uses the gradient the replay computed, so no D graph is built or kept. D's parameters get no
    gradient (the student's step does not train D).
    """

    def __init__(self, discriminator: nn.Module, student: torch.Tensor, image: Optional[torch.Tensor] = None,
                 warmup: int = WARMUP_STEPS):
        device = _check_cuda(discriminator, student=student, image=image)
        self.inputs = StaticInputs(student=student, image=image)
        x = self.inputs["student"].requires_grad_(True)
        conditioned = bool(getattr(discriminator, "image_conditioned", False))

        def step():
            out = discriminator(x, self.inputs["image"]) if conditioned else discriminator(x)
            loss = adversarial_g_loss(first_output(out))
            (grad,) = torch.autograd.grad(loss, x)
            return loss.detach(), grad

        with _module_state_kept(discriminator):
            self.graph, (self.loss, self.grad), self.held_bytes = _capture(step, device, warmup)

    def replay(self, student: torch.Tensor, image: Optional[torch.Tensor] = None):
        """Run the graph on new values: (loss, input gradient), copied out of the graph's buffers."""
        self.inputs.fill(student=student, image=image)
        self.graph.replay()
        return self.loss.clone(), self.grad.clone()

    def __call__(self, student: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _ReplayWithInputGradient.apply(student, image, self)


def capture_g_loss(discriminator: nn.Module, student: torch.Tensor, image: Optional[torch.Tensor] = None, *,
                   warmup: int = WARMUP_STEPS) -> GraphedGLoss:
    """Capture -mean D(student) and its gradient w.r.t. `student` (what D is fed: score maps
    (B, K, H, W), plus `image` for an image-conditioned D), on the GPU that holds them and D. Multiply
    by the term's weight outside. The module is left as it was."""
    return GraphedGLoss(discriminator, student, image, warmup)
