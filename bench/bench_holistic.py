"""Holistic distillation, the discriminator's step: cases and baselines.

Step: one D step of the official recipe on score maps (B, 19, H, W): the SAGAN discriminator
(preprocess BN, conv_dim 64), wgan-gp loss and gradient penalty (lambda_gp 10, weight 0.1), backward.
Baselines: the official step (naive attention blocks, `d_loss(...).backward()` with the three graphs
alive at once); torch.compile cannot run it (the penalty's double backward). Ours: the fused blocks,
d_step (one graph alive at a time) and, on a GPU, d_step captured in a CUDA graph.
"""
from __future__ import annotations

import torch

import skd_kernels as sk
from bench.harness import COMPILED, OFFICIAL, Case, Impl, Op


GPU_ONLY = ("cuda",)


def _case(b, h, w, modes, devices=("cpu", "cuda")):
    return Case(f"{b}x19x{h}x{w}", size=b * h * w, params=dict(shape=(b, 19, h, w)), series="19 classes",
                modes=modes, devices=devices)


CASES = [
    _case(1, 64, 64, ("tiny",)),
    _case(8, 65, 65, ("quick", "full")),   # 1/8-resolution logits of a 512 crop: N = 64 and 16
    _case(1, 256, 256, ("full",)),
    _case(1, 512, 512, ("full",)),         # full resolution: N = 4096 and 1024
    _case(2, 512, 512, ("full",)),
    _case(8, 512, 512, ("quick", "full"), GPU_ONLY),  # issue #11: full resolution at the recipe's batch
]


def make_inputs(case, device, dtype):
    g = torch.Generator().manual_seed(0)
    shape = case.params["shape"]
    return dict(student=(torch.randn(shape, generator=g) * 3).to(device, dtype),
                teacher=(torch.randn(shape, generator=g) * 3).to(device, dtype))


def _discriminator_and_loss(case, inputs, attention, backend=None):
    torch.manual_seed(0)
    d = sk.Discriminator(1, case.params["shape"][1], 8, 65, attention=attention, backend=backend)
    return d, sk.HolisticDistillLoss(d.to(inputs["student"].device), "wgan-gp", lambda_gp=10.0, weight=0.1)


def _d_step(attention, backend=None, one_graph_at_a_time=False):
    def build(case, inputs):
        d, loss = _discriminator_and_loss(case, inputs, attention, backend)

        def step():
            if one_graph_at_a_time:
                loss.d_step(inputs["student"], inputs["teacher"])
            else:
                loss.d_loss(inputs["student"], inputs["teacher"]).backward()
            d.zero_grad(set_to_none=True)
        return step
    return build


def _graphed_d_step(case, inputs):
    """d_step captured in a CUDA graph (skd_kernels.graphs): the step zeroes the gradients in place,
    copies the inputs in and replays. Its peak is the graph's private pool (reserved at capture)."""
    from skd_kernels.graphs import capture_d_step

    d, loss = _discriminator_and_loss(case, inputs, "fused")
    graphed = capture_d_step(loss, inputs["student"], inputs["teacher"])

    def step():
        d.zero_grad(set_to_none=False)
        graphed(inputs["student"], inputs["teacher"])
    step.held_bytes = graphed.held_bytes
    return step


def impls(case, device):
    found = [Impl(OFFICIAL, _d_step("naive")),
             Impl(COMPILED, unsupported="not run: torch.compile has no double backward (the gradient penalty)")]
    backends = [b for b in sk.available_backends(device)
                if b not in ("torch", "triton") or (b == "triton" and device.type == "cuda")]
    if case.devices == GPU_ONLY:
        # The GPU check's minutes: one plain fused row, the backend auto prefers at N = 4096 (the
        # attention rows compare the backends at these sizes).
        preferred = "triton" if "triton" in backends else "cuda"
        for backend in backends:
            if backend != preferred:
                why = f"not run in the GPU-only case: skd_{preferred} is its plain fused row (the attention rows " \
                      "compare the backends)"
                found.append(Impl(f"skd_{backend}", unsupported=why))
        backends = [preferred]
    for backend in backends:
        found.append(Impl(f"skd_{backend}", _d_step("fused", backend)))
    found.append(Impl("skd_d_step", _d_step("fused", one_graph_at_a_time=True)))
    found.append(Impl("skd_d_step_graph", _graphed_d_step) if device.type == "cuda" else
                 Impl("skd_d_step_graph", unsupported="not run: CUDA graphs need a GPU"))
    return found


NOTES = """\
One discriminator step of the official recipe: the SAGAN critic on teacher and student score maps,
wgan-gp loss, gradient penalty (create_graph=True through the whole critic), backward. `official` uses
the naive attention blocks and `d_loss(...).backward()`, with the graphs of D(T), D(S) and the penalty
alive at once; `skd_<backend>` the same step with the fused attention op; `skd_d_step` fused attention
and `HolisticDistillLoss.d_step`, which backpropagates each term right after its forward (one graph
alive at a time, the same gradients); `skd_d_step_graph` that d_step captured once in a CUDA graph and
replayed (`skd_kernels.graphs.capture_d_step`; GPU only): one launch for the whole step, the host's
launch gaps gone; its peak is the memory its graph holds between replays. torch.compile cannot run
the step: inductor has no double backward. The convolutions dominate the time; the gain is memory at
full resolution (N = 4096 at the first attention block of a 512 × 512 input). On a GPU the quick run also takes 8 × 19 × 512 × 512 (the
recipe's batch at full resolution). `size` is pixels per batch (B·H·W)."""

OP = Op(name="holistic", title="Holistic distillation (discriminator step)", size_label="pixels per batch (B·H·W)",
        cases=CASES, make_inputs=make_inputs, impls=impls, notes=NOTES, dtypes=("float32",))
