"""Holistic distillation, the discriminator's step: cases and baselines.

Step: one D step of the official recipe on score maps (B, 19, H, W): the SAGAN discriminator
(preprocess BN, conv_dim 64), wgan-gp loss and gradient penalty (lambda_gp 10, weight 0.1), backward.
Baselines: the official step (naive attention blocks, `d_loss(...).backward()` with the three graphs
alive at once); torch.compile cannot run it (the penalty's double backward).
"""
from __future__ import annotations

import torch

import skd_kernels as sk
from bench.harness import COMPILED, OFFICIAL, Case, Impl, Op


def _case(b, h, w, modes):
    return Case(f"{b}x19x{h}x{w}", size=b * h * w, params=dict(shape=(b, 19, h, w)), series="19 classes",
                modes=modes)


CASES = [
    _case(1, 64, 64, ("tiny",)),
    _case(8, 65, 65, ("quick", "full")),   # 1/8-resolution logits of a 512 crop: N = 64 and 16
    _case(1, 256, 256, ("full",)),
    _case(1, 512, 512, ("full",)),         # full resolution: N = 4096 and 1024
    _case(2, 512, 512, ("full",)),
]


def make_inputs(case, device, dtype):
    g = torch.Generator().manual_seed(0)
    shape = case.params["shape"]
    return dict(student=(torch.randn(shape, generator=g) * 3).to(device, dtype),
                teacher=(torch.randn(shape, generator=g) * 3).to(device, dtype))


def _d_step(attention, backend=None, one_graph_at_a_time=False):
    def build(case, inputs):
        torch.manual_seed(0)
        d = sk.Discriminator(1, case.params["shape"][1], 8, 65, attention=attention, backend=backend)
        loss = sk.HolisticDistillLoss(d.to(inputs["student"].device), "wgan-gp", lambda_gp=10.0, weight=0.1)

        def step():
            if one_graph_at_a_time:
                loss.d_step(inputs["student"], inputs["teacher"])
            else:
                loss.d_loss(inputs["student"], inputs["teacher"]).backward()
            d.zero_grad(set_to_none=True)
        return step
    return build


def impls(case, device):
    found = [Impl(OFFICIAL, _d_step("naive")),
             Impl(COMPILED, unsupported="not run: torch.compile has no double backward (the gradient penalty)")]
    for backend in sk.available_backends(device):
        if backend not in ("torch", "triton") or (backend == "triton" and device.type == "cuda"):
            found.append(Impl(f"skd_{backend}", _d_step("fused", backend)))
    found.append(Impl("skd_d_step", _d_step("fused", one_graph_at_a_time=True)))
    return found


NOTES = """\
One discriminator step of the official recipe: the SAGAN critic on teacher and student score maps,
wgan-gp loss, gradient penalty (create_graph=True through the whole critic), backward. `official` uses
the naive attention blocks and `d_loss(...).backward()`, with the graphs of D(T), D(S) and the penalty
alive at once; `skd_<backend>` the same step with the fused attention op; `skd_d_step` fused attention
and `HolisticDistillLoss.d_step`, which backpropagates each term right after its forward (one graph
alive at a time, the same gradients). torch.compile cannot run the step: inductor has no double
backward. The convolutions dominate the time; the gain is memory at full resolution (N = 4096 at the
first attention block of a 512 × 512 input). `size` is pixels per batch (B·H·W)."""

OP = Op(name="holistic", title="Holistic distillation (discriminator step)", size_label="pixels per batch (B·H·W)",
        cases=CASES, make_inputs=make_inputs, impls=impls, notes=NOTES, dtypes=("float32",))
