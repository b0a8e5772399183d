"""Holistic losses: the official criteria's values, the gradient penalty's robustness (the official
D loss turning NaN), whole D and G steps with fused attention, and the D step's peak memory."""
from __future__ import annotations

import pytest
import torch

import skd_kernels as sk
import official_sagan
from official_sagan import official_adv_d, official_adv_g, official_gp
from op_contract import cpu_peak_memory, needs_cpu_peak_memory

FUSED_BACKEND = None  # the fused blocks use the default attention backend (C++ on CPU)


def official_and_ours(mode=1, dtype=torch.float64, seed=0, attention="naive"):
    return official_sagan.official_and_ours(mode, dtype=dtype, seed=seed, attention=attention, backend=FUSED_BACKEND)


def score_maps(batch, scale=3.0, dtype=torch.float64, seed=2, size=65):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(batch, 19, size, size, generator=g) * scale).to(dtype) for _ in range(2))


@pytest.mark.parametrize("adv_type", ["wgan-gp", "hinge"])
def test_official_criteria_give_the_official_values(adv_type):
    official, ours = official_and_ours()
    student, teacher = score_maps(2)
    d_out_s, d_out_t = official(student), official(teacher)
    d_out_s[0].data += 0.7  # a spread of outputs around the hinge's corners
    assert torch.equal(sk.CriterionAdv(adv_type)(d_out_s, d_out_t), official_adv_d(d_out_s, d_out_t, adv_type))
    assert torch.equal(sk.CriterionAdvForG(adv_type)(d_out_s, d_out_s), official_adv_g(d_out_s))
    assert torch.equal(sk.CriterionAdvForG(adv_type)(d_out_s), official_adv_g(d_out_s))
    with pytest.raises(ValueError, match="adv_type"):
        sk.CriterionAdv("lsgan")


def test_additional_gp_matches_the_official_penalty_with_the_same_alpha():
    official, ours = official_and_ours()
    student, teacher = score_maps(3)
    torch.manual_seed(7)
    ref = official_gp(official, [student], [teacher], 10.0)
    torch.manual_seed(7)
    got = sk.CriterionAdditionalGP(ours, 10.0)([student], [teacher])
    assert abs(got.item() - ref.item()) <= 1e-10 * abs(ref.item())
    (g_ref,) = torch.autograd.grad(ref, official.l2[0].module.weight_bar)
    (g_got,) = torch.autograd.grad(got, ours.l2[0].module.weight_bar)
    assert torch.allclose(g_got, g_ref, rtol=1e-9, atol=1e-12 * g_ref.abs().max().item())


@pytest.mark.parametrize("adv_type", ["wgan-gp", "hinge"])
def test_holistic_d_loss_is_the_official_d_step_sum(adv_type):
    """Teacher, student, then x_hat through D, as kd_model.discriminator_backward does."""
    official, ours = official_and_ours()
    student, teacher = score_maps(2)
    torch.manual_seed(3)
    d_out_t, d_out_s = official(teacher), official(student)
    ref = 0.1 * official_adv_d(d_out_s, d_out_t, adv_type)
    if adv_type == "wgan-gp":
        ref = ref + 0.1 * official_gp(official, [student], [teacher], 10.0)
    torch.manual_seed(3)
    loss = sk.HolisticDistillLoss(ours, adv_type, weight=0.1)
    total, adversarial, penalty = loss.d_loss(student, teacher, return_terms=True)
    assert abs(total.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert (penalty.item() > 0) == (adv_type == "wgan-gp")
    g = loss.g_loss(student.requires_grad_())
    assert abs(g.item() - 0.1 * official_adv_g(official(student)).item()) < 1e-12


def test_zero_input_gradient_gives_the_penalty_lambda_and_a_zero_gradient():
    # A critic that ignores its input: ||g|| = 0 for every sample, (0 - 1)^2 = 1.
    weight = torch.tensor(2.0, requires_grad=True)

    def critic(x):
        return weight * torch.tanh(x * 0 + 100).sum(dim=(1, 2, 3))

    x = torch.randn(4, 3, 5, 5)
    penalty = sk.gradient_penalty(critic, x, x.flip(0), lambda_gp=10.0)
    (grad,) = torch.autograd.grad(penalty, weight)
    assert penalty.item() == 10.0 and grad.item() == 0.0


@pytest.mark.parametrize("batch", [4, 5, 6])
def test_saturated_tanh_input_makes_the_official_penalty_nan_but_not_ours(batch):
    """preprocess_GAN_mode 2: logits beyond ~9 saturate fp32 tanh to exactly +-1, so a sample whose
    every logit does has a zero input gradient, and the official sqrt's backward gives 0 * inf = NaN."""
    official, ours = official_and_ours(mode=2, dtype=torch.float32, attention="fused")
    student, teacher = score_maps(batch, dtype=torch.float32)
    student[1] = 20 * torch.sign(student[1])
    teacher[1] = -30 * torch.sign(teacher[1])
    torch.manual_seed(0)
    official_gp(official, [student], [teacher], 10.0).backward()
    assert any(torch.isnan(p.grad).any() for p in official.parameters() if p.grad is not None)
    torch.manual_seed(0)
    sk.CriterionAdditionalGP(ours, 10.0)([student], [teacher]).backward()
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)


DEGENERATE = {
    "zeros": lambda s, t: (torch.zeros_like(s), torch.zeros_like(t)),
    "student_equals_teacher": lambda s, t: (t.clone(), t),
    "constant_channel": lambda s, t: (s.index_fill(1, torch.tensor([3]), -30.0),
                                      t.index_fill(1, torch.tensor([3]), -30.0)),
    "huge_logits": lambda s, t: (s * 1e4, t * 1e4),
    "one_hot_saturated": lambda s, t: (s.sign() * 40, t.sign() * 40),
}


@pytest.mark.parametrize("case,mode,batch", [
    ("zeros", 1, 4), ("student_equals_teacher", 1, 5), ("constant_channel", 1, 6), ("huge_logits", 2, 5),
    ("one_hot_saturated", 2, 6), ("zeros", 3, 4)])
def test_d_and_g_steps_with_fused_blocks_stay_finite_on_degenerate_inputs(case, mode, batch):
    """Two SGD steps of the D (official optimiser, d_loss then d_step) and a G step: all finite."""
    _, d = official_and_ours(mode=mode, dtype=torch.float32, attention="fused")
    student, teacher = DEGENERATE[case](*score_maps(batch, dtype=torch.float32))
    loss = sk.HolisticDistillLoss(d, "wgan-gp", lambda_gp=10.0, weight=0.1)
    optimiser = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=4e-4, momentum=0.9,
                                weight_decay=5e-4)
    for staged in (False, True):
        optimiser.zero_grad()
        if staged:
            total = loss.d_step(student, teacher)[0]
        else:
            total = loss.d_loss(student, teacher)
            total.backward()
        assert torch.isfinite(total), total
        assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
        optimiser.step()
    s = student.clone().requires_grad_()
    g_loss = loss.g_loss(s)
    g_loss.backward()
    assert torch.isfinite(g_loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("adv_type", ["wgan-gp", "hinge"])
def test_d_step_accumulates_the_gradients_of_d_loss_backward(adv_type):
    _, d = official_and_ours(attention="fused")
    student, teacher = score_maps(2)
    loss = sk.HolisticDistillLoss(d, adv_type, weight=0.1)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    torch.manual_seed(4)
    total = loss.d_loss(student, teacher)
    total.backward()
    expected = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    after = {k: v.clone() for k, v in d.state_dict().items()}
    d.zero_grad(set_to_none=True)
    d.load_state_dict(state)
    torch.manual_seed(4)
    staged_total, _, _ = loss.d_step(student, teacher)
    assert staged_total.grad_fn is None and abs(staged_total.item() - total.item()) <= 1e-12 * abs(total.item())
    scale = max(g.abs().max().item() for g in expected.values())  # some gradients are exactly 0 + rounding
    for name, grad in expected.items():
        assert torch.allclose(d.get_parameter(name).grad, grad, rtol=1e-10, atol=1e-12 * scale), name
    for key, value in after.items():  # the same power iterations and BatchNorm statistics
        assert torch.allclose(d.state_dict()[key], value, rtol=1e-12, atol=0), key


def test_d_step_with_a_given_alpha_uses_it_and_draws_nothing():
    """A CUDA graph passes alpha drawn on the GPU (skd_kernels.graphs): the step must use it, not the
    CPU generator's."""
    _, d = official_and_ours(attention="fused")
    student, teacher = score_maps(2)
    loss = sk.HolisticDistillLoss(d, "wgan-gp", weight=0.1)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    torch.manual_seed(4)
    drawn_total, _, drawn_penalty = loss.d_step(student, teacher)  # draws alpha = torch.rand(2) after seed 4
    expected = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    d.zero_grad(set_to_none=True)
    d.load_state_dict(state)
    torch.manual_seed(4)
    alpha = torch.rand(2)
    rng = torch.get_rng_state()
    total, _, penalty = loss.d_step(student, teacher, alpha=alpha.to(torch.float64))
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    assert penalty.item() == pytest.approx(drawn_penalty.item(), rel=1e-12)
    assert total.item() == pytest.approx(drawn_total.item(), rel=1e-12)
    for name, grad in expected.items():
        assert torch.allclose(d.get_parameter(name).grad, grad, rtol=1e-10, atol=1e-14), name
    d.zero_grad(set_to_none=True)
    other = loss.d_step(student, teacher, alpha=torch.full((2,), 0.5, dtype=torch.float64))[2]
    assert other.item() != pytest.approx(drawn_penalty.item(), rel=1e-6)  # alpha matters: the test can fail

def test_image_conditioned_penalty_differentiates_the_prepared_input():
    torch.manual_seed(0)
    d = sk.Discriminator(None, 22, attention="fused", image_conditioned=True, backend=FUSED_BACKEND)
    student, teacher = score_maps(2, dtype=torch.float32)
    image = torch.rand(2, 3, 130, 130)
    total, adversarial, penalty = sk.HolisticDistillLoss(d).d_loss(student, teacher, image, return_terms=True)
    total.backward()
    assert torch.isfinite(total) and penalty.item() > 0
    assert torch.isfinite(d.l1[0].module.weight_bar.grad).all()


def test_mismatched_shapes_raise():
    _, d = official_and_ours()
    student, teacher = score_maps(2)
    with pytest.raises(ValueError, match="same shape"):
        sk.HolisticDistillLoss(d).d_loss(student, teacher[:1])
    with pytest.raises(ValueError, match="adv_type"):
        sk.HolisticDistillLoss(d, "wgan")


MEMORY_SETUP = """
import torch, skd_kernels as sk
torch.manual_seed(0)
size, batch = {size}, {batch}
student, teacher = torch.randn(batch, 19, size, size), torch.randn(batch, 19, size, size)
def d_step(attention):
    d = sk.Discriminator(1, 19, 8, 65, attention=attention, backend={backend!r})
    loss = sk.HolisticDistillLoss(d)
    def step():
        if attention == "naive":  # the official D step: three graphs, one backward
            loss.d_loss(student, teacher).backward()
        else:
            loss.d_step(student, teacher)
        d.zero_grad(set_to_none=True)
    return step
"""


@needs_cpu_peak_memory
def test_fused_d_step_needs_at_most_a_third_of_the_naive_peak_memory():
    """Naive: the official D step (naive attention, D(T), D(S) and the penalty's graphs alive at one
    backward). Ours: fused attention and d_step (one graph alive at a time). At 512x512 (N = 4096 at
    attn1) the naive blocks' N x N maps and their double-backward graphs dominate. Batch 1 keeps CI
    fast: every term scales with the batch, so does the ratio (bench/bench_holistic.py: batch 8)."""
    setup = MEMORY_SETUP.format(size=512, batch=1, backend=FUSED_BACKEND)
    peaks = cpu_peak_memory(setup, {attention: f"d_step({attention!r})" for attention in ("naive", "fused")})
    naive, fused = peaks["naive"], peaks["fused"]
    assert fused * 3 <= naive, f"fused {fused / 2**20:.0f} MB vs naive {naive / 2**20:.0f} MB"


READS_A_VALUE_ON_THE_HOST = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_d_step_and_g_loss_never_read_a_tensor_value_on_the_host(backend, monkeypatch):
    """On a GPU each such read is a host sync that stalls the D step (and breaks CUDA graph capture);
    here every way Python code reads a value is made to raise. An explicit backend, so the blocks run
    the fused passes, not the one-tile reference."""
    _, d = official_and_ours(mode=1, dtype=torch.float32, attention="fused")
    for block in (d.attn1, d.attn2):
        block.backend = backend
    student, teacher = score_maps(2, dtype=torch.float32)
    loss = sk.HolisticDistillLoss(d, "wgan-gp", lambda_gp=10.0, weight=0.1)
    s = student.clone().requires_grad_()

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in READS_A_VALUE_ON_THE_HOST:
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss.d_step(student, teacher)
    loss.g_loss(s).backward()
    monkeypatch.undo()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in d.parameters() if p.grad is not None)
