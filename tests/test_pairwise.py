"""Fused pair-wise distillation: every backend and both algorithms against the float64 reference,
which builds the M x M similarity matrices (small M here)."""
from __future__ import annotations

import sys

import pytest
import torch

import skd_kernels as sk
from skd_kernels.backends import passes
from skd_kernels.ops.pairwise import core, lowrank, onednn, types
from skd_kernels.reference import pairwise_distill_reference

from conftest import backend_device
from op_contract import (SUBNORMAL_ATOL, assert_compiles_like_eager, assert_gradcheck, assert_grads_near,
                         assert_loss_near, cpu_peak_memory, fused_and_fp64_reference, loss_rtol, needs_cpu_peak_memory,
                         stored_rtol)

BACKENDS = ["cpu", "torch", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ALGORITHMS = ["lowrank", "tiled"]
# (B, Cs, Ct, H, W): one node; odd sizes with partial border windows and Cs != Ct; batch 3.
SHAPES = [(1, 3, 5, 1, 1), (2, 5, 4, 7, 9), (1, 6, 6, 5, 5), (3, 8, 16, 6, 11)]
CONFIGS = {
    "official_scale0.5": dict(scale=0.5),  # max-pool int(H/2) x int(W/2), ceil mode, norm detached
    "cirkd_max2x2_paper": dict(node_size=2, pooling="max", normalization="paper"),
    "avg_3x2": dict(node_size=(3, 2), pooling="avg"),
    "every_position_paper": dict(normalization="paper"),
}
def make_features(shape, dtype, device, seed=0, relu=False):
    b, cs, ct, h, w = shape
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn((b, cs, h, w), generator=g), torch.randn((b, ct, h, w), generator=g)
    if relu:
        s, t = s.relu(), t.relu()
    return s.to(dtype).to(device), t.to(dtype).to(device)


def fused_and_reference(student, teacher, backend, options, wrt_teacher=True):
    """(loss, grad S, grad T) from `backend` and from the float64 reference on the same values."""
    reference_options = {k: v for k, v in options.items() if k != "algorithm"}
    return fused_and_fp64_reference(
        lambda s, t: sk.pairwise_distill_loss(s, t, backend=backend, **options),
        lambda s, t: pairwise_distill_reference(s, t, **reference_options),
        (student, teacher), wrt=(True, wrt_teacher))


# Against the float64 reference on the same (rounded) inputs. The core runs in float64, or in
# float32 when its estimated relative error is below lowrank.FLOAT32_LOSS_RTOL (CPU, non-fp64 input);
# the loss is returned in float32, the gradients in the input dtype (op_contract: per dtype).
LOSS_RTOL = loss_rtol(float64=1e-11, float32=2e-5)
GRAD_RTOL = stored_rtol(float64=1e-10, float32=2e-5)


def assert_close(fused, reference, dtype):
    (loss, *grads), (ref, *ref_grads) = fused, reference
    # Similarities are at most 1, so the loss is O(1) or a cancellation's rounding (one node): 1e-14.
    assert_loss_near(loss, ref, dtype, rtol=LOSS_RTOL[dtype], atol=1e-14)
    # Relative to the largest gradient, floored at 1e-3: features here are O(1), so a smaller
    # gradient is a zero that rounding left behind (one node, student = teacher).
    assert_grads_near(grads, ref_grads, ("grad student", "grad teacher"), dtype, rtol=GRAD_RTOL[dtype],
                      atol=SUBNORMAL_ATOL.get(dtype, 0.0), floor=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_loss_and_gradients_match_fp64_reference(backend, dtype, shape, config, algorithm):
    device = backend_device(backend)
    student, teacher = make_features(shape, dtype, device, relu=config == "official_scale0.5")
    options = dict(CONFIGS[config], algorithm=algorithm)
    if config == "official_scale0.5" and min(shape[3:]) < 2:
        options = dict(options, scale=1.0)  # int(1 * 0.5) = 0 is an error; see test_bad_input_...
    assert_close(*fused_and_reference(student, teacher, backend, options), dtype)


# GPU backends pool windows of at least 8 positions with a kernel of their own (one window's rows per
# program or warp): windows wider than one 32-wide tile and partial border windows, both poolings
# and normalisations; integer-valued features make ties, where max_pool2d picks the first maximum.
LARGE_WINDOW_SHAPE = (2, 5, 4, 11, 83)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("normalization", ["official", "paper"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_large_windows_match_fp64_reference(backend, dtype, pooling, normalization, ties):
    device = backend_device(backend)
    student, teacher = make_features(LARGE_WINDOW_SHAPE, torch.float64, device, seed=7)
    if ties:
        student, teacher = student.round(), teacher.round()
    student, teacher = student.to(dtype), teacher.to(dtype)
    options = dict(node_size=(5, 40), pooling=pooling, normalization=normalization)
    assert_close(*fused_and_reference(student, teacher, backend, options), dtype)


# The official normalisation detaches the norm, so its gradient is by design not the derivative of
# its value: gradcheck applies to the paper's normalisation (the official one is held to the
# reference's autograd above).
GRADCHECK_CONFIGS = {
    "max2x2_paper": dict(node_size=2, pooling="max", normalization="paper"),
    "avg_3x2_paper": dict(node_size=(3, 2), pooling="avg", normalization="paper"),
    "every_position_paper": dict(normalization="paper"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", GRADCHECK_CONFIGS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradcheck_fp64(backend, config, algorithm):
    device = backend_device(backend)
    student, teacher = make_features((2, 3, 4, 5, 4), torch.float64, device, seed=3)

    def loss(s, t):
        return sk.pairwise_distill_loss(s, t, backend=backend, algorithm=algorithm, **GRADCHECK_CONFIGS[config])

    # Max pooling is not differentiable at ties; random features have none. fast_mode checks random
    # projections of the Jacobian, one pair of evaluations each instead of one per input element.
    assert_gradcheck(loss, (student, teacher), fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_matches_reference(backend):
    device = backend_device(backend)
    student, teacher = make_features((1, 3, 2, 3, 4), torch.float64, device, seed=4)

    def loss(s, t):
        return sk.pairwise_distill_loss(s, t, node_size=(1, 2), pooling="avg", normalization="paper", backend=backend)

    assert_gradcheck(loss, (student, teacher), orders=(2,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("normalization", ["official", "paper"])
def test_student_close_to_teacher_is_exact(backend, algorithm, normalization):
    """teacher = student + 1e-3 noise on post-ReLU features: the similarities all sit near each other,
    and the loss is a 1e-8 fraction of the Gram norms the low-rank algorithm subtracts."""
    device = backend_device(backend)
    student, noise = make_features((2, 32, 32, 12, 12), torch.float32, device, seed=5, relu=True)
    teacher = student + 1e-3 * noise
    options = dict(node_size=1, normalization=normalization, algorithm=algorithm)
    (loss, gs, gt), (ref, ref_gs, ref_gt) = fused_and_reference(student, teacher, backend, options)
    assert 0 < float(ref.detach()) < 1e-6
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-6 * float(ref.detach())  # float32 output rounding
    # float32's 2e-6 plus 1e-6 of the largest gradient, as the loss's bound above
    assert_grads_near((gs, gt), (ref_gs, ref_gt), ("grad student", "grad teacher"), torch.float32, rtol=3e-6)


def test_plain_float32_low_rank_fails_where_ours_is_exact():
    """The case above is hard: the textbook float32 low-rank formula gets it badly wrong."""
    student, noise = make_features((1, 32, 32, 12, 12), torch.float32, "cpu", seed=5, relu=True)
    teacher = student + 1e-3 * noise

    def textbook(s, t):
        us = torch.nn.functional.normalize(s.flatten(2), dim=1)
        ut = torch.nn.functional.normalize(t.flatten(2), dim=1)
        grams = [torch.bmm(a, b.transpose(1, 2)).square().sum() for a, b in ((us, us), (ut, ut), (us, ut))]
        return (grams[0] + grams[1] - 2 * grams[2]) / us.shape[-1] ** 2

    ref = float(pairwise_distill_reference(student.double(), teacher.double(), normalization="paper"))
    ours = float(sk.pairwise_distill_loss(student, teacher, normalization="paper", algorithm="lowrank", backend="cpu"))
    assert abs(float(textbook(student, teacher)) - ref) > 0.1 * ref
    assert abs(ours - ref) <= 1e-6 * ref


FEATURE_FAMILIES = {
    "independent": lambda s, n: (s, n),
    "independent_relu": lambda s, n: (s.relu(), n.relu()),
    "relu_plus_bias": lambda s, n: (s.relu() + 0.5, n.relu() + 0.5),
    "near_1e-2": lambda s, n: (s.relu(), s.relu() + 1e-2 * n),
    "near_1e-4": lambda s, n: (s.relu(), s.relu() + 1e-4 * n),
    "near_1e-6": lambda s, n: (s.relu(), s.relu() + 1e-6 * n),
    # Cs != Ct: the teacher sees 24 random orthonormal directions of the student's 48.
    "projected": lambda s, n: (s, torch.einsum("dc,bcm->bdm", torch.linalg.qr(n[0, :, :48])[0][:24], s)),
}


ONEDNN_HERE = onednn._onednn_float32(torch.ones(1))


def stock_centring():
    """The low-rank core's centring as every backend but the CPU one does it."""
    return core.Centring(passes("pairwise", "torch"))


def family_nodes(family, seed=7):
    g = torch.Generator().manual_seed(seed)
    s, t = FEATURE_FAMILIES[family](torch.randn(2, 48, 900, generator=g), torch.randn(2, 48, 900, generator=g))
    return torch.nn.functional.normalize(s.double(), dim=1), torch.nn.functional.normalize(t.double(), dim=1)


@pytest.mark.parametrize("expansion", ["auto", "plain"])
@pytest.mark.parametrize("gemm", ["onednn", "bmm"])
@pytest.mark.parametrize("family", FEATURE_FAMILIES)
def test_float32_core_is_kept_only_within_its_error_bound(family, gemm, expansion, monkeypatch):
    """The adaptive float32 low-rank core: whatever it returns is within FLOAT32_LOSS_RTOL of float64,
    with its float32 products on oneDNN (CPU) or on bmm (every other device); by its own choice of
    expansion (the difference expansion for Cs == Ct) or by the plain expansion alone."""
    if gemm == "bmm":
        monkeypatch.setattr(onednn, "_onednn_float32", lambda x: False)
    elif not ONEDNN_HERE:
        pytest.skip("oneDNN float32 matmul not available")
    if expansion == "plain":
        monkeypatch.setitem(lowrank._EXPANSIONS, "difference", lowrank._plain_expansion)
    us, ut = family_nodes(family)
    exact, dus, dut = core.similarity_core(us, ut, "lowrank", True, True, stock_centring())
    adaptive, dus32, dut32 = core.similarity_core(us, ut, "lowrank", True, True, stock_centring(), try_float32=True)
    tiled, dus_tiled, dut_tiled = core.similarity_core(us, ut, "tiled", True, True, stock_centring())
    dus, dus32, dus_tiled = dus.dense(), dus32.dense(), dus_tiled.dense()
    dut, dut32, dut_tiled = dut.dense(), dut32.dense(), dut_tiled.dense()
    assert abs(float(adaptive) - float(exact)) <= lowrank.FLOAT32_LOSS_RTOL * float(exact)
    assert (dus32 - dus).abs().max() <= 1e-4 * dus.abs().max()
    assert (dut32 - dut).abs().max() <= 1e-4 * dut.abs().max()
    # Between the two float64 algorithms: the tiled one's D = A^s - A^t loses as many digits as the
    # student is close to the teacher (six at near_1e-6).
    rtol64 = 1e-8 if family == "near_1e-6" else 1e-10
    assert abs(float(tiled) - float(exact)) <= rtol64 * float(exact)
    assert (dus_tiled - dus).abs().max() <= rtol64 * dus.abs().max()
    assert (dut_tiled - dut).abs().max() <= rtol64 * dut.abs().max()


@pytest.mark.parametrize("family", ["near_1e-4", "near_1e-6"])
def test_difference_expansion_stays_float32_where_the_plain_expansion_cannot(family):
    """Student ~= teacher: the plain expansion's float32 estimate refuses (its error scales with ||R||^2),
    the difference expansion's accepts (it scales with ||Rs - Rt||), and it is right."""
    us, ut = family_nodes(family)
    assert lowrank._plain_expansion(us, ut, torch.float32, lowrank.FLOAT32_LOSS_RTOL, True, True, stock_centring()) is None
    kept = lowrank._difference_expansion(us, ut, torch.float32, lowrank.FLOAT32_LOSS_RTOL, True, True, stock_centring())
    assert kept is not None
    loss, grad_s, grad_t, _ = kept
    tiled, dus, dut = core.similarity_core(us, ut, "tiled", True, True, stock_centring())
    assert abs(float(loss) - float(tiled)) <= lowrank.FLOAT32_LOSS_RTOL * float(tiled)
    for got, ref in ((grad_s.dense(), dus.dense()), (grad_t.dense(), dut.dense())):
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_difference_centring_matches_stock_pytorch(dtype):
    """csrc/cpu/pairwise_centre.cpp `pairwise_centre_pair` against the stock-PyTorch centring."""
    backend_device("cpu")
    g = torch.Generator().manual_seed(3)
    us, ut = torch.randn(2, 5, 37, generator=g, dtype=torch.float64), torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    fused = passes("pairwise", "cpu").centre_pair(us, ut, torch.empty(2, 10, 37, dtype=dtype))
    stock = passes("pairwise", "torch").centre_pair(us, ut, torch.empty(2, 10, 37, dtype=dtype))
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    for name, got, ref in zip(types.CentredPair._fields, fused, stock):
        assert got.dtype == ref.dtype, name
        assert torch.allclose(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max())), name


@pytest.mark.skipif(not ONEDNN_HERE, reason="oneDNN float32 matmul not available")
def test_onednn_products_only_at_full_float32_precision():
    """With float32 matmuls allowed to round through bf16, the core keeps to bmm: its error estimate
    assumes float32 products."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not onednn._onednn_float32(torch.ones(1))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert onednn._onednn_float32(torch.ones(1))
    assert not onednn._onednn_float32(torch.ones(1, dtype=torch.float64))


def test_a_torch_whose_onednn_linear_fails_falls_back_to_bmm(monkeypatch):
    """The oneDNN product is a private torch op: where it is missing or behaves otherwise, the core
    must use bmm and stay exact, not raise."""
    def broken(x, w):
        raise RuntimeError("mkldnn::_linear_pointwise() expected at most 5 arguments")

    monkeypatch.setattr(onednn, "_linear", broken)
    onednn._onednn_linear_works.cache_clear()
    try:
        assert not onednn._onednn_float32(torch.ones(1))
        student, teacher = make_features((2, 16, 16, 9, 9), torch.float32, "cpu", seed=11, relu=True)
        assert_close(*fused_and_reference(student, teacher, "cpu", dict(algorithm="lowrank")), torch.float32)
    finally:
        monkeypatch.undo()
        onednn._onednn_linear_works.cache_clear()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["official", "paper"])
def test_zero_feature_vectors_match_reference(backend, normalization):
    """All-zero nodes: u = 0, and the gradient is d u / (0 + 1e-8) (official) or d u / 1e-12 (paper)."""
    device = backend_device(backend)
    student, teacher = make_features((2, 4, 6, 5, 6), torch.float64, device, seed=8)
    student[0, :, 1:3, 2:4] = 0
    teacher[1, :, :2, :] = 0
    for options in (dict(normalization=normalization), dict(node_size=2, pooling="avg", normalization=normalization)):
        assert_close(*fused_and_reference(student, teacher, backend, options), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(backend):
    device = backend_device(backend)
    student, _ = make_features((2, 8, 8, 9, 7), torch.float32, device, seed=9, relu=True)
    s = student.clone().requires_grad_()
    loss = sk.pairwise_distill_loss(s, student, node_size=1, backend=backend)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12
    assert s.grad.abs().max() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_strided_inputs_match_contiguous(backend):
    device = backend_device(backend)
    student, teacher = make_features((2, 6, 5, 7, 8), torch.float32, device, seed=10)
    options = dict(node_size=2, backend=backend)
    expected = sk.pairwise_distill_loss(student, teacher, **options)
    channels_last = sk.pairwise_distill_loss(student.to(memory_format=torch.channels_last),
                                             teacher.to(memory_format=torch.channels_last), **options)
    wide = torch.cat([student, student], dim=3)[..., ::2]  # non-unit width stride
    strided = sk.pairwise_distill_loss(wide, teacher, **options)
    assert float(channels_last) == pytest.approx(float(expected), rel=1e-6)
    assert float(strided) == pytest.approx(float(sk.pairwise_distill_loss(wide.contiguous(), teacher, **options)),
                                           rel=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_second_backward_with_retain_graph_matches_first(backend):
    student, teacher = make_features((2, 5, 4, 6, 6), torch.float64, "cpu", seed=11)
    s = student.requires_grad_()
    loss = sk.pairwise_distill_loss(s, teacher, node_size=2, backend=backend)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s)
    assert torch.equal(first, second)


def test_auto_algorithm_chooses_by_flops():
    assert core.choose_algorithm(9, 128, 512, False) == "tiled"  # official default: 3 x 3 nodes
    assert core.choose_algorithm(4225, 512, 512, False) == "lowrank"  # 65 x 65 nodes


def test_official_module_reads_feat_ind_and_keeps_the_teacher_graph():
    student, teacher = make_features((2, 4, 8, 9, 9), torch.float32, "cpu", seed=12)
    s, t = student.requires_grad_(), teacher.requires_grad_()
    criterion = sk.CriterionPairWiseforWholeFeatAfterPool(scale=0.5, feat_ind=-5)
    preds_s = [None, None, s, None, None, None, None]
    preds_t = [None, None, t, None, None, None, None]
    loss = criterion(preds_s, preds_t)
    loss.backward()
    ref = pairwise_distill_reference(student.detach().double(), teacher.detach().double(), scale=0.5)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=2e-5)
    assert s.grad is not None and t.grad is not None  # the official detach is a no-op
    module = sk.PairWiseDistillLoss(scale=None, node_size=2, normalization="paper")
    assert float(module(student, teacher).detach()) == pytest.approx(
        float(pairwise_distill_reference(student.detach().double(), teacher.detach().double(), node_size=2,
                                         normalization="paper")),
        rel=2e-5)


BAD_INPUTS = {  # name: (make kwargs from valid (s, t), message fragment)
    "3-d": (lambda s, t: dict(student=s[0], teacher=t), "student must be 4-d"),
    "spatial mismatch": (lambda s, t: dict(student=s[..., :4], teacher=t), "must agree in B, H and W"),
    "batch mismatch": (lambda s, t: dict(student=s[:1], teacher=t), "must agree in B, H and W"),
    "dtype mismatch": (lambda s, t: dict(student=s, teacher=t.double()), "cast them to one dtype"),
    "integer": (lambda s, t: dict(student=s.long(), teacher=t), "must be float32"),
    "scale and node_size": (lambda s, t: dict(student=s, teacher=t, scale=0.5, node_size=2), "not both"),
    "scale too small": (lambda s, t: dict(student=s, teacher=t, scale=0.1), "empty node window"),
    "node_size zero": (lambda s, t: dict(student=s, teacher=t, node_size=0), "node_size must be"),
    "pooling none with windows": (lambda s, t: dict(student=s, teacher=t, node_size=2, pooling="none"),
                                  "needs 1x1 nodes"),
    "unknown pooling": (lambda s, t: dict(student=s, teacher=t, pooling="min"), "pooling must be one of"),
    "unknown normalization": (lambda s, t: dict(student=s, teacher=t, normalization="l1"),
                              "normalization must be one of"),
    "unknown algorithm": (lambda s, t: dict(student=s, teacher=t, algorithm="naive"), "algorithm must be one of"),
    "empty": (lambda s, t: dict(student=s[:, :0], teacher=t), "non-empty"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_error_naming_the_argument(case):
    student, teacher = make_features((2, 3, 4, 5, 5), torch.float32, "cpu")
    make_kwargs, message = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError), match=message):
        sk.pairwise_distill_loss(**make_kwargs(student, teacher))


def test_nan_input_is_rejected_when_finite_checks_are_on(monkeypatch):
    student, teacher = make_features((1, 3, 4, 2, 2), torch.float32, "cpu")
    teacher[0, 1, 1, 1] = float("nan")
    monkeypatch.setenv("SKD_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="teacher contains NaN"):
        sk.pairwise_distill_loss(student, teacher, backend="cpu")


def test_torch_compile_fullgraph_traces_the_op():
    conv = torch.nn.Conv2d(3, 6, 1)
    x, teacher = torch.randn(2, 3, 6, 7), torch.randn(2, 5, 6, 7)

    def step(x, teacher):
        return sk.pairwise_distill_loss(conv(x), teacher, node_size=2, backend="cpu")

    assert_compiles_like_eager(step, (x, teacher), parameters=conv.parameters())


MEMORY_SETUP = """
import torch, skd_kernels as sk
s = torch.randn(2, 256, 129, 129).relu_().requires_grad_(); t = torch.randn(2, 256, 129, 129).relu_()
def run():
    sk.pairwise_distill_loss(s, t, backend="cpu").backward(); s.grad = None
"""


@needs_cpu_peak_memory
def test_peak_memory_at_129x129_nodes_is_a_few_input_sizes():
    """B=2, C=256, 129 x 129 nodes: the naive form holds 2 x 2 x 16641^2 fp32 = 4.4 GB of similarity
    matrices (and more for their gradients); ours stays within three times the inputs."""
    peak = cpu_peak_memory(MEMORY_SETUP, {"cpu": "run"})["cpu"]
    inputs = 2 * (2 * 256 * 129 * 129 * 4)
    assert peak <= 3.0 * inputs, f"{peak / inputs:.2f} input sizes"


def official_criterion_pairwise(feat_s, feat_t, scale):
    """The official CriterionPairWiseforWholeFeatAfterPool.forward on two feature maps, as SKD.md
    states it, with its `feat_T.detach()` whose result is discarded (so the teacher keeps its graph)."""
    feat_t.detach()
    window = (int(feat_t.shape[2] * scale), int(feat_t.shape[3] * scale))
    pool = torch.nn.MaxPool2d(window, stride=window, padding=0, ceil_mode=True)

    def similarity(feat):
        feat = feat.float() if feat.dtype != torch.float64 else feat
        norm = feat.pow(2).sum(dim=1, keepdim=True).sqrt().detach() + 1e-8
        feat = (feat / norm).flatten(2)
        return torch.einsum("icm,icn->imn", feat, feat)

    nodes_s, nodes_t = pool(feat_s), pool(feat_t)
    m = nodes_t.shape[-1] * nodes_t.shape[-2]
    return ((similarity(nodes_t) - similarity(nodes_s)) ** 2 / m**2 / nodes_t.shape[0]).sum()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_official_module_gives_a_trainable_teacher_the_official_gradient(backend):
    student, teacher = make_features((2, 4, 8, 9, 9), torch.float64, "cpu", seed=13)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    criterion = sk.CriterionPairWiseforWholeFeatAfterPool(scale=0.5, feat_ind=-5, backend=backend)
    criterion([None, None, s, None, None, None, None], [None, None, t, None, None, None, None]).backward()
    s_ref, t_ref = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    official_criterion_pairwise(s_ref, t_ref, 0.5).backward()
    assert t_ref.grad.abs().max() > 0  # the official loss does reach the teacher
    assert torch.allclose(t.grad, t_ref.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5, 2.0, float("inf"), float("nan")])
def test_scale_outside_zero_one_is_rejected(scale):
    student, teacher = make_features((2, 3, 4, 5, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"scale must be in \(0, 1\]"):
        sk.pairwise_distill_loss(student, teacher, scale=scale)
    with pytest.raises(ValueError, match=r"scale must be in \(0, 1\]"):
        sk.CriterionPairWiseforWholeFeatAfterPool(scale=scale, feat_ind=-5)([student] * 5, [teacher] * 5)


def test_scale_one_makes_one_node_per_image():
    # The boundary of the accepted range: the window is the whole map, one node, similarity 1 for both.
    student, teacher = make_features((2, 3, 4, 5, 5), torch.float64, "cpu")
    loss = sk.pairwise_distill_loss(student, teacher, scale=1.0, backend="torch")
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


# --- GPU paths: the fused few-node pass, launches, host syncs (Triton here runs in the interpreter) ---

# Configurations of at most FEW_NODES nodes, which the Triton backend serves with its fused two-launch
# pass (triton/pairwise_few.py): (B, Cs, Ct, H, W), options, integer-valued features (ties in max windows).
FEW_NODE_CASES = {
    "official_65x65_3x3": ((2, 6, 10, 65, 65), dict(scale=0.5), False),
    "official_ties": ((1, 5, 7, 33, 31), dict(scale=0.5), True),
    "cirkd_2x2_paper_odd": ((2, 6, 5, 13, 15), dict(node_size=2, normalization="paper"), False),
    "cirkd_2x2_paper_ties": ((1, 4, 4, 8, 16), dict(node_size=2, normalization="paper"), True),
    "avg_paper_64_nodes": ((1, 3, 9, 16, 32), dict(node_size=(2, 4), pooling="avg", normalization="paper"), False),
    "one_node": ((3, 4, 2, 5, 7), dict(scale=1.0), False),
}


def few_node_features(shape, ties, seed=21, dtype=torch.float64):
    student, teacher = make_features(shape, torch.float64, backend_device("triton"), seed=seed, relu=True)
    if ties:
        student, teacher = (3 * student).round(), (3 * teacher).round()
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FEW_NODE_CASES)
def test_triton_few_node_pass_matches_fp64_reference(case, dtype):
    shape, options, ties = FEW_NODE_CASES[case]
    student, teacher = few_node_features(shape, ties, dtype=dtype)
    assert_close(*fused_and_reference(student, teacher, "triton", options), dtype)


@pytest.mark.parametrize("target_programs", [1, 10**6], ids=["every_block_in_one_program", "one_block_each"])
def test_triton_few_node_pass_splits_channel_blocks_either_way(target_programs, monkeypatch):
    """The second launch's programs take every few-th channel block of both sides: all of them, or one."""
    from skd_kernels.triton import pairwise_few

    monkeypatch.setattr(pairwise_few, "_TARGET_PROGRAMS", target_programs)
    student, teacher = few_node_features((2, 70, 40, 9, 8), ties=False)
    options = dict(node_size=3, normalization="paper")
    assert_close(*fused_and_reference(student, teacher, "triton", options), torch.float64)


@pytest.mark.parametrize("normalization", ["official", "paper"])
def test_triton_few_node_pass_with_all_zero_windows_matches_reference(normalization):
    """Zero nodes: u = 0 and the gradient d u / (0 + 1e-8) (official) or d u / 1e-12 (paper); max
    windows of zeros pick their first position."""
    student, teacher = few_node_features((2, 5, 3, 9, 10), ties=False)
    student[0, :, :4, :4] = 0
    teacher[1, :, 4:, :] = 0
    options = dict(node_size=4, normalization=normalization)
    assert_close(*fused_and_reference(student, teacher, "triton", options), torch.float64)


@pytest.mark.parametrize("normalization", ["official", "paper"])
def test_triton_few_node_pass_is_exact_when_student_is_close_to_teacher(normalization):
    student, noise = few_node_features((1, 16, 16, 24, 24), ties=False, dtype=torch.float32)
    teacher = student + 1e-3 * noise
    options = dict(node_size=3, normalization=normalization)
    (loss, gs, gt), (ref, ref_gs, ref_gt) = fused_and_reference(student, teacher, "triton", options)
    assert 0 < float(ref.detach()) < 1e-5
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-6 * float(ref.detach())
    assert_grads_near((gs, gt), (ref_gs, ref_gt), ("grad student", "grad teacher"), torch.float32, rtol=3e-6)
    same = student.clone().requires_grad_()
    loss = sk.pairwise_distill_loss(same, student, node_size=3, normalization=normalization, backend="triton")
    loss.backward()
    assert float(loss.detach()) == 0 and float(same.grad.abs().max()) == 0  # bitwise: the same arithmetic


def _count_triton_launches(monkeypatch):
    """Counts launches of every pair-wise Triton kernel (each `kernel[grid](...)`)."""
    from skd_kernels.triton import pairwise as triton_pairwise, pairwise_few, pairwise_tiled

    kernels = [getattr(module, name) for module in (triton_pairwise, pairwise_few, pairwise_tiled)
               for name in dir(module) if name.endswith("_kernel")]
    launches = []
    for kernel_type in {type(kernel) for kernel in kernels}:
        original = kernel_type.__getitem__

        def counted(self, grid, original=original):
            launches.append(getattr(self, "__name__", getattr(getattr(self, "fn", None), "__name__", "?")))
            return original(self, grid)

        monkeypatch.setattr(kernel_type, "__getitem__", counted)
    return launches


def test_triton_official_default_is_two_launches(monkeypatch):
    """The official 3 x 3 nodes, forward and backward of the student: the two kernels of the fused pass,
    and nothing else on the device but the output buffers' allocation (the backward only hands the
    stored gradient over)."""
    launches = _count_triton_launches(monkeypatch)
    student, teacher = few_node_features((2, 4, 6, 65, 65), ties=False, dtype=torch.float32)
    student.requires_grad_()
    sk.pairwise_distill_loss(student, teacher, scale=0.5, backend="triton").backward()
    assert len(launches) == 2, launches


NO_SYNC_CASES = {
    "official_few_nodes": ((2, 4, 6, 65, 65), dict(scale=0.5)),
    "lowrank_difference": ((2, 8, 8, 12, 12), dict(algorithm="lowrank")),
    "lowrank_plain_refused": ((2, 8, 12, 12, 12), dict(algorithm="lowrank")),  # see below
    "tiled_many_nodes": ((1, 4, 5, 9, 9), dict(algorithm="tiled")),
}


@pytest.mark.parametrize("case", NO_SYNC_CASES)
def test_triton_forward_and_backward_make_no_host_sync(case, monkeypatch):
    """Nothing in the Triton path reads a device value on the host: every Tensor -> Python conversion
    raises during a forward and backward (the one exception: the autograd backward's check for a
    gradient of exactly 1, taken only for CPU tensors, where it is free; the interpreter's tensors are
    CPU tensors). The refused low-rank case makes the fallback serve, decided on the device."""
    shape, options = NO_SYNC_CASES[case]
    student, teacher = few_node_features(shape, ties=False, dtype=torch.float32)
    if case == "lowrank_plain_refused":
        # Cs != Ct, teacher an isometry of the student plus 1e-7: its similarities are the student's to
        # 1e-7, where the plain expansion's float64 estimate refuses and the tiled fallback serves.
        student, noise = make_features(shape, torch.float64, student.device, seed=22)
        isometry = torch.linalg.qr(noise[0, :, :, 0])[0][:, :shape[1]]  # (Ct, Cs), orthonormal columns
        student, teacher = student.float(), (torch.einsum("dc,bchw->bdhw", isometry, student) + 1e-7 * noise).float()
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    calls = []

    def host_read(name):
        def forbidden(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.endswith("_fused_gradient.py"):
                calls.append(f"Tensor.{name} from {caller}:{sys._getframe(1).f_lineno}")
                raise AssertionError(calls[-1])
            return getattr(torch._C.TensorBase, name)(self, *args, **kwargs)
        return forbidden

    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
            patch.setattr(torch.Tensor, name, host_read(name))
        loss = sk.pairwise_distill_loss(s, t, backend="triton", **options)
        loss.backward()
    assert not calls, calls
    assert_close((loss, s.grad, t.grad), fused_and_reference(student, teacher, "torch", options)[1], torch.float32)


def test_auto_takes_the_fused_triton_pass_for_few_nodes_on_a_gpu(monkeypatch):
    """backends.SMALL_PREFERENCE: at most FEW_NODES nodes Triton's two launches, more the CUDA kernels."""
    from skd_kernels import _extension, backends

    monkeypatch.delenv("SKD_BACKEND", raising=False)
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    monkeypatch.setattr(_extension, "missing_tool", lambda kind: None)
    monkeypatch.setattr(_extension, "load_extension", lambda kind: object())
    backends.reset()
    assert backends.resolve("pairwise", "cuda", size=9) == "triton"  # the official 3 x 3
    assert backends.resolve("pairwise", "cuda", size=backends.FEW_NODES) == "triton"
    assert backends.resolve("pairwise", "cuda", size=backends.FEW_NODES + 1) == "cuda"
    assert backends.resolve("pairwise", "cpu", size=9) == "cpu"
    backends.reset()
