"""Fused pixel-wise distillation: every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import skd_kernels as sk
from skd_kernels.reference import pixelwise_distill_reference, pixelwise_official

from conftest import backend_device
from op_contract import (SUBNORMAL_ATOL, assert_compiles_like_eager, assert_gradcheck, assert_loss_near, assert_near,
                         cpu_peak_memory, fused_and_fp64_reference, loss_rtol, needs_cpu_peak_memory, stored_rtol)

BACKENDS = ["cpu", "torch", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 1, 5, 7), (1, 19, 7, 9), (2, 19, 5, 3), (2, 150, 3, 5)]
FORMS = {  # name: keyword arguments
    "official": dict(form="official"),
    "kl": dict(form="kl"),
    "kl_tau2.5_squared": dict(form="kl", tau=2.5, tau_squared=True),
    "cvpr_tau3": dict(form="cvpr", tau=3.0),
}


def make_logits(shape, scale, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    return s.to(dtype).to(device), t.to(dtype).to(device)


def make_labels(shape, mode, device, seed=1):
    if mode == "none":
        return None
    b, k, h, w = shape
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(k, 2), (b, h, w), generator=g)
    if mode == "some_ignored":
        labels[torch.rand((b, h, w), generator=g) < 0.4] = 255
        labels[0, 0, 0] = 255
    elif mode == "all_ignored":
        labels.fill_(255)
    return labels.to(device)


def fused_and_reference(student, teacher, labels, backend, options, wrt_teacher=True):
    """(loss, grad S, grad T) from `backend` and from the fp64 reference on the same values."""
    return fused_and_fp64_reference(
        lambda s, t: sk.pixelwise_distill_loss(s, t, labels, backend=backend, **options),
        lambda s, t: pixelwise_distill_reference(s, t, labels, **options),
        (student, teacher), wrt=(True, wrt_teacher))


# Bounds against the float64 reference evaluated on the same (rounded) inputs, per input dtype.
# Loss: |got - ref| <= LOSS_RTOL * (|ref| + 1 + max|logit| / tau): the log-partition terms it sums are
#   as large as the logits. Gradients: max|got - ref| <= GRAD_RTOL * max|ref| (+ fp16's subnormal
#   spacing). The teacher's gradient, q_t * (l_c - sum_c q_t l_c), subtracts terms as large as the
#   logits, so its absolute error also grows with them: callers add
#   atol = LOSS_RTOL * max|logit| / tau * max|grad student|.
LOSS_RTOL = loss_rtol(float64=1e-12, float32=2e-6)
GRAD_RTOL = stored_rtol(float64=1e-12, float32=2e-6)


def assert_loss_close(got, ref, dtype, logit_scale=1.0):
    assert_loss_near(got, ref, dtype, rtol=LOSS_RTOL[dtype], atol=LOSS_RTOL[dtype] * (1 + logit_scale))


def assert_grad_close(got, ref, dtype, name="gradient", atol=0.0):
    assert_near(got, ref, name, rtol=GRAD_RTOL[dtype], atol=SUBNORMAL_ATOL.get(dtype, 0.0) + atol, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["logits1", "logits1e4"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("label_mode", ["none", "some_ignored"])
def test_loss_and_gradients_match_fp64_reference(backend, dtype, shape, scale, form, label_mode):
    options = FORMS[form]
    if form == "official" and label_mode != "none":
        pytest.skip("the official form has no ignore mask (rejected: see test_official_form_rejects_...)")
    device = backend_device(backend)
    student, teacher = make_logits(shape, scale, dtype, device)
    labels = make_labels(shape, label_mode, device)
    (loss, gs, gt), (ref, ref_gs, ref_gt) = fused_and_reference(student, teacher, labels, backend, options)
    tau = options.get("tau", 1.0)
    assert_loss_close(loss, ref, dtype, logit_scale=scale / tau)
    assert_grad_close(gs, ref_gs, dtype, "grad student")
    teacher_atol = LOSS_RTOL[dtype] * scale / tau * float(ref_gs.abs().max())
    assert_grad_close(gt, ref_gt, dtype, "grad teacher", atol=teacher_atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["kl", "cvpr"])
def test_all_pixels_ignored_gives_zero_loss_and_gradient(backend, form):
    device = backend_device(backend)
    student, teacher = make_logits((2, 19, 5, 7), 3.0, torch.float32, device)
    labels = make_labels(student.shape, "all_ignored", device)
    (loss, gs, gt), _ = fused_and_reference(student, teacher, labels, backend, dict(form=form, tau=2.0))
    assert float(loss.detach()) == 0.0
    assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_fp64(backend, form):
    device = backend_device(backend)
    student, teacher = make_logits((1, 3, 2, 3), 1.5, torch.float64, device)
    labels = make_labels(student.shape, "some_ignored", device) if form != "official" else None
    options = FORMS[form]

    def loss(s, t):
        return sk.pixelwise_distill_loss(s, t, labels, backend=backend, **options)

    assert_gradcheck(loss, (student, teacher))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_through_fused_op_matches_reference(backend):
    device = backend_device(backend)
    student, teacher = make_logits((1, 4, 2, 3), 1.0, torch.float64, device)

    def loss(s, t):
        return sk.pixelwise_distill_loss(s, t, form="kl", tau=2.0, backend=backend)

    assert_gradcheck(loss, (student, teacher), orders=(2,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["kl", "cvpr"])
def test_student_equal_to_teacher_gives_zero_kl_and_zero_gradient(backend, form):
    device = backend_device(backend)
    student, _ = make_logits((2, 19, 6, 5), 8.0, torch.float32, device)
    s = student.clone().requires_grad_()
    loss = sk.pixelwise_distill_loss(s, student, form=form, backend=backend)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert s.grad.abs().max() < 1e-8  # gradients are O(1e-2) here


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_close_to_teacher_matches_fp64(backend):
    device = backend_device(backend)
    teacher, noise = make_logits((2, 19, 6, 5), 5.0, torch.float32, device)
    student = teacher + 1e-3 * noise / 5.0
    (loss, gs, _), (ref, ref_gs, _) = fused_and_reference(student, teacher, None, backend, dict(form="kl"))
    # The KL of nearly equal distributions (here ~2e-7) is computed in fp32 to an absolute error of
    # about eps_fp32 per pixel (log-partition terms of size ~1 cancel), like PyTorch's fp32 formula;
    # the gradient has no such cancellation and keeps full relative accuracy.
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-7
    # The gradient is a difference of nearly equal probabilities: absolute error ~ eps_fp32 times the
    # form's constant 1/(B*H*W).
    constant = 1.0 / (2 * 6 * 5)
    assert (gs.double() - ref_gs).abs().max() <= 4 * 2.0**-23 * constant


# --- float32 against the exact loss, across logit scales ---------------------------------------------
# The plain float64 reference cancels too: where the student is close to the teacher its KL is a
# difference of log-partition terms of size ~log K (relative error ~1e-16 / KL), and p_s - q_t a
# difference of probabilities. `exact_pixelwise` evaluates the cancellation-free forms of the math
# page in float64, the differences centred on the teacher's top class.

def _log_softmax_near_one_hot(z):
    """log softmax with log Z = log1p(sum of the non-top terms): exact for a nearly one-hot row too."""
    x = z - z.amax(1, keepdim=True)
    top = torch.zeros_like(x, dtype=torch.bool).scatter_(1, x.argmax(1, keepdim=True), True)
    return x - torch.log1p(torch.where(top, 0, x.exp()).sum(1, keepdim=True))


def _q_phi(log_q, v):
    """q (e^v - 1 - v) and q (e^v - 1), q = exp(log_q), without cancellation for small v."""
    q = log_q.exp()
    series = 0.5 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v * (1 / 5040 + v / 40320)))))
    small = v.abs() < 0.1
    q_exp = torch.exp(log_q + v)
    return (torch.where(small, q * v * v * series, q_exp - q - q * v),
            torch.where(small, q * (v + v * v * series), q_exp - q))


def exact_pixelwise(student, teacher, form, tau=1.0):
    """(per-pixel loss (B, H, W), d loss_p / d S (B, K, H, W)) in float64, free of cancellation."""
    s, t = student.double(), teacher.double()
    log_p, log_q = _log_softmax_near_one_hot(s / tau), _log_softmax_near_one_hot(t / tau)
    q = log_q.exp()
    d = s - t
    u = (d - d.gather(1, t.argmax(1, keepdim=True))) / tau
    v = u - torch.where(q == 0, 0, q * u).sum(1, keepdim=True)
    q_phi, q_expm1 = _q_phi(log_q, v)
    b = q_phi.sum(1)
    close = torch.isfinite(b) & (b <= 1)
    kl = torch.where(close, torch.log1p(b), torch.where(q == 0, 0, q * (log_q - log_p)).sum(1))
    loss = kl if form != "official" else torch.where(q == 0, 0, -q * log_p).sum(1)
    grad = torch.where(close[:, None], (q_expm1 - q * b[:, None]) / (1 + b[:, None]), log_p.exp() - q)
    return loss, grad / tau


EXACT_FORMS = {"official": dict(form="official"), "kl": dict(form="kl"),
               "kl_tau2.5_squared": dict(form="kl", tau=2.5, tau_squared=True)}
LOGIT_SCALES = [1e-3, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4]


def make_pair(shape, scale, regime, seed=0):
    """float32 logits: independent, or a teacher within 1e-3 * scale of the student (`close`), also
    offset per pixel by about 3 * scale (`close_offset`: the same distributions)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g) * scale
    if regime == "independent":
        return student, torch.randn(shape, generator=g) * scale
    teacher = student + torch.randn(shape, generator=g) * (1e-3 * scale)
    if regime == "close_offset":
        teacher = teacher + 3 * scale * torch.randn((shape[0], 1, *shape[2:]), generator=g)
    return student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", LOGIT_SCALES, ids=lambda x: f"logits{x:g}")
@pytest.mark.parametrize("regime", ["independent", "close", "close_offset"])
@pytest.mark.parametrize("form", EXACT_FORMS)
@pytest.mark.parametrize("shape", [(2, 19, 5, 7), (1, 150, 3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_float32_loss_and_student_gradient_within_2e_6_of_exact(backend, scale, regime, form, shape):
    """|L - L*| <= 2e-6 |L*| and max|g - g*| <= 2e-6 max|g*| for float32 logits, L* and g* exact.

    Floors below what float32 can hold (probabilities under e^-87 are 0 there): 1e-30 for the loss,
    1e-37 * constant / tau for the gradient."""
    device = backend_device(backend)
    options = EXACT_FORMS[form]
    student, teacher = make_pair(shape, scale, regime)
    s = student.to(device).requires_grad_()
    loss = sk.pixelwise_distill_loss(s, teacher.to(device), backend=backend, **options)
    loss.backward()
    b, k, h, w = shape
    tau = options.get("tau", 1.0)
    constant = 1.0 / (h * w) if form == "official" else (tau * tau if options.get("tau_squared") else 1.0) / (b * h * w)
    pixel_loss, pixel_grad = exact_pixelwise(student, teacher, options["form"], tau)
    exact_loss, exact_grad = constant * pixel_loss.sum(), constant * pixel_grad
    assert_loss_near(loss, exact_loss, torch.float32, rtol=2e-6, atol=1e-30)
    assert_near(s.grad, exact_grad, "grad student", rtol=2e-6, atol=1e-37 * constant / tau, dtype=torch.float32)


def test_exact_pixelwise_agrees_with_the_reference_where_it_does_not_cancel():
    """The oracle above is the reference's math: equal to it where the reference is accurate."""
    student, teacher = make_pair((2, 19, 5, 7), 2.0, "independent")
    for form, tau, pixels in (("official", 1.0, 5 * 7), ("kl", 2.5, 2 * 5 * 7)):
        loss, grad = exact_pixelwise(student, teacher, form, tau)
        s = student.double().requires_grad_()
        ref = pixelwise_distill_reference(s, teacher.double(), form=form, tau=tau)
        (ref_grad,) = torch.autograd.grad(ref, s)
        assert torch.allclose(loss.sum() / pixels, ref.detach(), rtol=1e-12)
        assert torch.allclose(grad / pixels, ref_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_minus_infinity_teacher_logit_acts_as_a_zero_probability_class(backend):
    # A masked class (-inf teacher logit) must add 0 * log 0 = 0, not NaN. The plain reference
    # computes 0 * -inf there, so compare with a logit of -1e4, whose probability is 0 in fp64 too.
    device = backend_device(backend)
    student, teacher = make_logits((1, 5, 2, 3), 1.0, torch.float32, device)
    teacher[:, 2] = float("-inf")
    s = student.clone().requires_grad_()
    loss = sk.pixelwise_distill_loss(s, teacher, form="kl", backend=backend)
    loss.backward()
    finite_teacher = torch.where(torch.isinf(teacher), -1e4, teacher)
    (_, _, _), (ref, ref_gs, _) = fused_and_reference(student, finite_teacher, None, backend, dict(form="kl"))
    assert torch.isfinite(loss) and abs(float(loss.detach()) - float(ref.detach())) < 1e-6
    assert_grad_close(s.grad, ref_gs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_strided_inputs_match_contiguous(backend):
    device = backend_device(backend)
    student, teacher = make_logits((2, 7, 5, 9), 2.0, torch.float32, device)
    base = sk.pixelwise_distill_loss(student, teacher, form="kl", backend=backend)
    channels_last = sk.pixelwise_distill_loss(student.to(memory_format=torch.channels_last),
                                              teacher.to(memory_format=torch.channels_last),
                                              form="kl", backend=backend)
    wide_s, wide_t = make_logits((2, 7, 5, 18), 2.0, torch.float32, device)
    wide_s[..., ::2], wide_t[..., ::2] = student, teacher
    strided = sk.pixelwise_distill_loss(wide_s[..., ::2], wide_t[..., ::2], form="kl", backend=backend)
    assert torch.allclose(base, channels_last, rtol=1e-6) and torch.allclose(base, strided, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_with_retain_graph_matches_first(backend):
    device = backend_device(backend)
    student, teacher = make_logits((2, 5, 3, 4), 2.0, torch.float32, device)
    s = student.clone().requires_grad_()
    loss = sk.pixelwise_distill_loss(s, teacher, form="kl", backend=backend)
    (first,) = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3.0, s)
    assert torch.allclose(first, second, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_leaves_inputs_unchanged(backend):
    device = backend_device(backend)
    student, teacher = make_logits((2, 5, 3, 4), 2.0, torch.float32, device)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    (10 * sk.pixelwise_distill_loss(s, t, form="kl", backend=backend)).backward()
    assert torch.equal(s.detach(), student) and torch.equal(t.detach(), teacher)


def test_no_gradient_buffers_without_requires_grad():
    student, teacher = make_logits((2, 5, 3, 4), 2.0, torch.float32, "cpu")
    with torch.no_grad():
        loss = sk.pixelwise_distill_loss(student.requires_grad_(), teacher, backend="cpu")
    assert loss.grad_fn is None and torch.isfinite(loss)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_resize_student_matches_reference_on_upsampled_logits(backend):
    student, teacher = make_logits((2, 19, 9, 9), 2.0, torch.float32, "cpu")
    teacher = torch.nn.functional.interpolate(teacher, size=(17, 17), mode="bilinear", align_corners=True)
    s = student.clone().requires_grad_()
    loss = sk.pixelwise_distill_loss(s, teacher, resize_student=True, backend=backend)
    loss.backward()
    s64 = student.double().requires_grad_()
    up = torch.nn.functional.interpolate(s64, size=(17, 17), mode="bilinear", align_corners=True)
    ref = pixelwise_official(up, teacher.double())
    ref.backward()
    assert_loss_close(loss, ref, torch.float32)
    assert_grad_close(s.grad, s64.grad, torch.float32)


def test_official_form_equals_soft_cross_entropy_summed_over_batch():
    student, teacher = make_logits((3, 19, 4, 6), 2.0, torch.float64, "cpu")
    per_image = [-(teacher[i].softmax(0) * student[i].log_softmax(0)).sum() / (4 * 6) for i in range(3)]
    assert torch.allclose(sk.pixelwise_distill_loss(student, teacher, backend="cpu"), sum(per_image))


def test_module_takes_official_lists_and_uses_element_zero():
    student, teacher = make_logits((2, 19, 5, 5), 2.0, torch.float32, "cpu")
    decoy = torch.full_like(student, float("nan"))
    official = sk.CriterionPixelWise(ignore_index=255, use_weight=True, reduce=True)
    expected = pixelwise_official(student, teacher)
    assert torch.allclose(official([student, decoy], [teacher, decoy]), expected, rtol=1e-6)
    module = sk.PixelWiseDistillLoss(form="kl", tau=2.0, tau_squared=True)
    labels = make_labels(student.shape, "some_ignored", "cpu")
    ref = pixelwise_distill_reference(student, teacher, labels, form="kl", tau=2.0, tau_squared=True)
    assert torch.allclose(module((student,), [teacher], labels), ref, rtol=1e-6)


BAD_INPUTS = {
    "student rank": (lambda s, t: dict(student=s[0], teacher=t), "student must be 4-d"),
    "teacher classes": (lambda s, t: dict(student=s, teacher=t[:, :3]), "agree in (B, K)"),
    "spatial size": (lambda s, t: dict(student=s[..., :4], teacher=t), "resize_student=True"),
    "integer student": (lambda s, t: dict(student=s.long(), teacher=t), "student must be float32"),
    "dtype mismatch": (lambda s, t: dict(student=s, teacher=t.double()), "cast them to one dtype"),
    "devices": (lambda s, t: dict(student=s, teacher=t.to("meta")), "move them to one device"),
    "tau zero": (lambda s, t: dict(student=s, teacher=t, form="kl", tau=0.0), "tau must be"),
    "tau negative": (lambda s, t: dict(student=s, teacher=t, form="kl", tau=-1.0), "tau must be"),
    "labels shape": (lambda s, t: dict(student=s, teacher=t, form="kl", labels=torch.zeros(2, 5, 4).long()),
                     "labels must have shape"),
    "labels float": (lambda s, t: dict(student=s, teacher=t, form="kl", labels=torch.zeros(2, 5, 5)),
                     "labels must be an integer"),
    "official with tau": (lambda s, t: dict(student=s, teacher=t, tau=2.0), "form='official'"),
    "unknown form": (lambda s, t: dict(student=s, teacher=t, form="mse"), "form must be one of"),
    "unknown backend": (lambda s, t: dict(student=s, teacher=t, backend="fast"), "is not a backend"),
    "empty": (lambda s, t: dict(student=s[:0], teacher=t[:0]), "non-empty"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_error_naming_the_argument(case):
    student, teacher = make_logits((2, 4, 5, 5), 1.0, torch.float32, "cpu")
    make_kwargs, message = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        sk.pixelwise_distill_loss(**make_kwargs(student, teacher))


def test_nan_input_is_rejected_when_finite_checks_are_on(monkeypatch):
    student, teacher = make_logits((1, 4, 2, 2), 1.0, torch.float32, "cpu")
    student[0, 1, 1, 1] = float("nan")
    monkeypatch.setenv("SKD_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="student contains NaN"):
        sk.pixelwise_distill_loss(student, teacher, backend="cpu")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_traces_the_op(compiler):
    conv = torch.nn.Conv2d(3, 19, 1)
    x, teacher = torch.randn(2, 3, 6, 7), torch.randn(2, 19, 6, 7)

    def step(x, teacher):
        return sk.pixelwise_distill_loss(conv(x), teacher, form="kl", tau=2.0, backend="cpu")

    assert_compiles_like_eager(step, (x, teacher), compiler=compiler, parameters=conv.parameters())


MEMORY_SETUP = """
import torch, skd_kernels as sk
from skd_kernels.reference import pixelwise_distill_reference
s = torch.randn(2, 19, 128, 192, requires_grad=True); t = torch.randn(2, 19, 128, 192)
def step(backend):
    def run():
        sk.pixelwise_distill_loss(s, t, backend=backend).backward(); s.grad = None
    return run
def reference():
    pixelwise_distill_reference(s, t).backward(); s.grad = None
"""


@needs_cpu_peak_memory
def test_fused_forward_backward_peak_memory_is_at_most_1_5_logits():
    peaks = cpu_peak_memory(MEMORY_SETUP, {"cpu": "step('cpu')", "reference": "reference"})
    logits = 2 * 19 * 128 * 192 * 4
    assert peaks["cpu"] <= 1.5 * logits, peaks
    assert peaks["reference"] >= 3.0 * logits, peaks  # the measurement sees the reference's buffers


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("form", ["official", "kl"])
def test_weight_is_folded_into_the_loss_and_its_gradients(backend, form):
    """weight=lambda gives lambda times the loss and its gradients, to the last bits of the constant."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 7, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 7, 4, 5, generator=g,
                                                                               dtype=torch.float64)
    plain_s, weighted_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    plain = sk.pixelwise_distill_loss(plain_s, t, form=form, backend=backend)
    weighted = sk.pixelwise_distill_loss(weighted_s, t, form=form, weight=10.0, backend=backend)
    plain.backward()
    weighted.backward()
    assert torch.allclose(weighted, 10.0 * plain, rtol=1e-13)
    assert torch.allclose(weighted_s.grad, 10.0 * plain_s.grad, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        sk.pixelwise_distill_loss(s, t, weight=float("nan"))


# --- infinite logits ------------------------------------------------------------------------------
# The fused kernels give what the official loss (the reference) gives: a -inf student logit under a
# positive teacher weight makes the loss +inf with a finite student gradient, a +inf logit makes
# everything NaN. They differ where the reference computes 0 * inf: a class whose teacher weight is
# 0 adds nothing (0 log 0 = 0), and an ignored pixel's gradients are 0.

INF_FORMS = {"official": dict(form="official"), "kl": dict(form="kl"), "cvpr": dict(form="cvpr")}


def assert_same_nonfinite_and_close(got, ref, name):
    """Same NaN and +-inf positions as `ref`, the finite values within fp32 tolerance."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN at {got} vs reference {ref}"
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref)), f"{name}: +inf at {got} vs reference {ref}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), f"{name}: -inf at {got} vs reference {ref}"
    finite = torch.isfinite(ref)
    assert_grad_close(got[finite].float(), ref[finite], torch.float32, name)


def logits_with(device, student_value=None, teacher_value=None, classes=(0, 2)):
    """Logits (2, 5, 3, 4) with `value` at pixel (0, 1, 2) in the given classes (the first class
    included: the CUDA kernel's online softmax meets it while its running max is still -inf)."""
    student, teacher = make_logits((2, 5, 3, 4), 1.0, torch.float32, device)
    for c in classes:
        if student_value is not None:
            student[0, c, 1, 2] = student_value
        if teacher_value is not None:
            teacher[0, c, 1, 2] = teacher_value
    return student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", INF_FORMS)
def test_minus_infinity_student_logit_gives_the_official_infinite_loss(backend, form):
    device = backend_device(backend)
    student, teacher = logits_with(device, student_value=float("-inf"))
    (loss, gs, gt), (ref, ref_gs, ref_gt) = fused_and_reference(student, teacher, None, backend, INF_FORMS[form])
    assert float(ref.detach()) == float("inf") and float(loss.detach()) == float("inf"), loss
    assert_same_nonfinite_and_close(gs, ref_gs, "student gradient")  # finite: p_s - q_t
    assert_same_nonfinite_and_close(gt, ref_gt, "teacher gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_teacher_logit_matches_the_official_loss(backend):
    # The official form never takes the teacher's log, so its reference is finite here.
    device = backend_device(backend)
    student, teacher = logits_with(device, teacher_value=float("-inf"))
    (loss, gs, gt), (ref, ref_gs, ref_gt) = fused_and_reference(student, teacher, None, backend, dict(form="official"))
    assert_loss_close(loss, ref, torch.float32)
    assert_grad_close(gs, ref_gs, torch.float32, "student gradient")
    assert_grad_close(gt, ref_gt, torch.float32, "teacher gradient")
    assert (gt[0, [0, 2], 1, 2] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("form", INF_FORMS)
def test_class_minus_infinity_in_both_logits_adds_nothing(backend, form):
    # The reference computes 0 * -inf = NaN here; the kernels drop the class, as if it were absent.
    device = backend_device(backend)
    student, teacher = logits_with(device, float("-inf"), float("-inf"), classes=(0,))
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = sk.pixelwise_distill_loss(s, t, backend=backend, **INF_FORMS[form])
    loss.backward()
    # A logit of -1e4 has probability exactly 0 in fp64 too: the fp64 reference without the class.
    masked_s = torch.where(torch.isinf(student), -1e4, student)
    masked_t = torch.where(torch.isinf(teacher), -1e4, teacher)
    (_, _, _), (ref, ref_gs, ref_gt) = fused_and_reference(masked_s, masked_t, None, backend, INF_FORMS[form])
    assert_loss_close(loss, ref, torch.float32)
    assert_grad_close(s.grad, ref_gs, torch.float32, "student gradient")
    assert_grad_close(t.grad, ref_gt, torch.float32, "teacher gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", INF_FORMS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_plus_infinity_logit_gives_nan_like_the_reference(backend, form, where):
    device = backend_device(backend)
    value = {f"{where}_value": float("inf")}
    student, teacher = logits_with(device, classes=(0,), **value)
    (loss, gs, gt), (ref, _, _) = fused_and_reference(student, teacher, None, backend, INF_FORMS[form])
    assert torch.isnan(ref) and torch.isnan(loss), loss
    assert torch.isnan(gs[0, :, 1, 2]).all() and torch.isnan(gt[0, :, 1, 2]).all()


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("form", ["kl", "cvpr"])
def test_ignored_pixel_with_infinite_logit_adds_nothing(backend, form):
    device = backend_device(backend)
    student, teacher = logits_with(device, student_value=float("-inf"))
    labels = torch.zeros((2, 3, 4), dtype=torch.long, device=device)
    labels[0, 1, 2] = 255
    (loss, gs, gt), (ref, ref_gs, ref_gt) = fused_and_reference(student, teacher, labels, backend, INF_FORMS[form])
    assert_loss_close(loss, ref, torch.float32)
    assert (gs[0, :, 1, 2] == 0).all() and (gt[0, :, 1, 2] == 0).all()
    keep = torch.ones_like(ref_gt, dtype=torch.bool)
    keep[0, :, 1, 2] = False  # the reference's teacher gradient there is NaN (0 * inf in its backward)
    assert_grad_close(gs[keep], ref_gs[keep], torch.float32, "student gradient")
    assert_grad_close(gt[keep], ref_gt[keep], torch.float32, "teacher gradient")
