"""Pair-wise distillation (node similarity matrices): cases and baselines.

Step: forward and backward of the loss on post-ReLU features (B, Cs, H, W) and (B, Ct, H, W),
student and teacher independent, or the teacher a 1e-3 perturbation of the student (`near`: the
plain low-rank form's hard case). Baselines: the official CriterionPairWiseforWholeFeatAfterPool
formula (skd_kernels.reference, materialising the M x M similarity matrices), eager and compiled;
both skipped where those matrices alone would exceed OFFICIAL_LIMIT_GB.
"""
from __future__ import annotations

import torch

import skd_kernels as sk
from bench.harness import Case, Impl, Op, loss_step, official_baselines
from skd_kernels.reference import pairwise_distill_reference

OFFICIAL_LIMIT_GB = 4.0


def _case(name, b, cs, ct, h, w, options, modes, features="independent", series="max-pool nodes"):
    k = int(h * options["scale"]) if "scale" in options else options.get("node_size", 1)
    nodes = -(-h // k) * -(-w // k)
    params = dict(b=b, cs=cs, ct=ct, h=h, w=w, options=options, features=features, nodes=nodes)
    # Bytes: the node passes read S and T and write grad S once, B·H·W·(2·Cs + Ct) elements.
    # Flops: the similarity core by the exact algorithm with fewer of them (what algorithm='auto'
    # picks), 2 flops a multiply-add, per image: low-rank, the Gram products Us·Usᵀ, Ut·Utᵀ, Us·Utᵀ
    # (M·(Cs² + Ct² + Cs·Ct)) and the gradient Gs·Us − X·Ut (M·Cs·(Cs + Ct)); tiled, the similarity
    # matrices Usᵀ·Us and Utᵀ·Ut (M²·(Cs + Ct)) and the gradient (M²·Cs). Its arithmetic is float64 on a
    # GPU (float64 nodes); on the CPU float32 products on oneDNN, kept when exact enough.
    m = nodes
    lowrank = m * (cs * cs + ct * ct + cs * ct) + m * cs * (cs + ct)
    tiled = m * m * (cs + ct) + m * m * cs
    return Case(name, size=nodes, params=params, series=series, modes=modes, elements=b * h * w * (2 * cs + ct),
                flops=2 * b * min(lowrank, tiled), flop_dtype={"cuda": "float64"})


CASES = [
    _case("tiny 9x9 nodes", 2, 16, 32, 9, 9, dict(node_size=1), ("tiny",)),
    _case("official default", 8, 128, 512, 65, 65, dict(scale=0.5), ("quick", "full")),  # 3x3 nodes
    _case("17x17 nodes", 8, 512, 512, 17, 17, dict(node_size=1), ("quick",)),
    _case("33x33 nodes", 8, 512, 512, 33, 33, dict(node_size=1), ("full",)),
    _case("65x65 nodes", 8, 512, 512, 65, 65, dict(node_size=1), ("full",)),
    _case("129x129 nodes", 2, 256, 256, 129, 129, dict(node_size=1), ("full",)),
    _case("65x65 nodes, near", 8, 512, 512, 65, 65, dict(node_size=1), ("full",), features="near",
          series="student ≈ teacher"),
    _case("CIRKD 2x2 paper", 8, 128, 512, 65, 65, dict(node_size=2, normalization="paper"), ("full",),
          series="CIRKD 2x2, paper normalisation"),
]


def official_matrices_gb(case) -> float:
    return 2 * case.params["b"] * case.params["nodes"] ** 2 * 4 / 2**30  # A_s and A_t in float32


def make_inputs(case, device, dtype):
    p = case.params
    g = torch.Generator().manual_seed(0)
    student = torch.randn((p["b"], p["cs"], p["h"], p["w"]), generator=g).relu_()
    if p["features"] == "near":
        teacher = student + 1e-3 * torch.randn((p["b"], p["ct"], p["h"], p["w"]), generator=g)
    else:
        teacher = torch.randn((p["b"], p["ct"], p["h"], p["w"]), generator=g).relu_()
    return dict(student=student.to(device, dtype).requires_grad_(), teacher=teacher.to(device, dtype))


def _official(case):
    options = case.params["options"]

    def loss(student, teacher):
        return pairwise_distill_reference(student, teacher, **options)
    return loss


def _fused(case, backend):
    options = case.params["options"]

    def loss(student, teacher):
        return sk.pairwise_distill_loss(student, teacher, backend=backend, **options)
    return loss


def impls(case, device):
    found = official_baselines(_official)
    if official_matrices_gb(case) > OFFICIAL_LIMIT_GB:
        why = f"not run: the similarity matrices alone take {official_matrices_gb(case):.1f} GB"
        found = [Impl(impl.name, unsupported=why) for impl in found]
    # `torch`: our algorithm on stock PyTorch node passes (not the reference, unlike the pixel-wise op).
    for backend in sk.available_backends(device):
        if backend != "triton" or device.type == "cuda":
            found.append(Impl(f"skd_{backend}", lambda case, inputs, b=backend: loss_step(_fused(case, b), inputs)))
    return found


NOTES = """\
Forward and backward of the loss on post-ReLU features, the student's channels Cs and the teacher's Ct.
The official formula pools both maps into M nodes, normalises them and materialises two M × M similarity
matrices per image (2·B·M²·4 bytes: 1.06 GB at 65 × 65 nodes, batch 8; not run above 4 GB). Ours never
builds them: the squared Frobenius distance of the two Gram matrices is computed from the nodes'
low-rank products (on the CPU float32 GEMMs on oneDNN, a symmetric stacked Gram; when Cs == Ct the
difference form S = (Rs+Rt)/2, E = Rs−Rt, which stays exact in float32 when the student is close to the
teacher: the `near` case). `skd_torch` is that algorithm with stock PyTorch node passes. `size` is the
number of nodes M. The official default (scale 0.5 on 65 × 65 maps) has only 3 × 3 nodes: there the step
is a few small ops and launch overhead decides; the fused op pays off from hundreds of nodes on."""

OP = Op(name="pairwise", title="Pair-wise distillation", size_label="nodes M (pooled positions)",
        cases=CASES, make_inputs=make_inputs, impls=impls, notes=NOTES)
