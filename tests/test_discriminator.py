"""SpectralNorm, SelfAttention and Discriminator against the official modules (tests/official_sagan.py),
and the fused attention blocks against the naive ones, first and second order."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import skd_kernels as sk
from official_sagan import OfficialDiscriminator, OfficialSelfAttn, OfficialSpectralNorm, cvpr_input, official_and_ours
from op_contract import assert_gradcheck, assert_near

# Attention backends the fused blocks run on here (CUDA/Triton: the attention op's own tests).
FUSED_BACKENDS = ["torch", "cpu"]
# fp64 runs the same arithmetic in another order: agreement to rounding. fp32: the official and fused
# forms sum the softmax in different orders and the D's output is a sum over ~1e5 products.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def assert_close(got, ref, dtype, name, scale=None):
    """max|got - ref| <= rtol * max(max|ref|, scale): `scale` covers tensors whose exact value is ~0
    (the key bias's gradient is identically zero: softmax over keys ignores it)."""
    assert_near(got, ref, name, rtol=RTOL[dtype], floor=scale or 0.0)


def test_state_dict_keys_and_order_match_the_official_discriminator():
    official, ours = official_and_ours()
    assert list(ours.state_dict()) == list(official.state_dict())
    assert "l1.0.module.weight_bar" in ours.state_dict() and "attn2.gamma" in ours.state_dict()
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert frozen == {f"l{i}.0.module.weight_{uv}" for i in range(1, 5) for uv in "uv"}


@pytest.mark.parametrize("attention,backend", [("naive", None)] + [("fused", b) for b in FUSED_BACKENDS])
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_official_checkpoint_gives_the_same_outputs_and_power_iterations(attention, backend, mode):
    official, ours = official_and_ours(mode, attention=attention, backend=backend)
    x = torch.randn(2, 19, 65, 65, dtype=torch.float64) * 4
    for _ in range(2):  # the second call starts from the updated u, v
        ref = official(x)
        got = ours(x, return_attention=True)
        assert got[0].shape == (2, 1, 1, 1)
        for g, r, name in zip(got, ref, ["out", "attn1 map", "attn2 map"]):
            assert_close(g, r, torch.float64, name)
    for key, value in official.state_dict().items():  # u, v and BatchNorm running statistics
        assert torch.allclose(ours.state_dict()[key], value, rtol=1e-12, atol=1e-14), key


def test_attention_maps_are_none_unless_asked():
    _, ours = official_and_ours(attention="naive")
    out, p1, p2 = ours(torch.randn(2, 19, 65, 65, dtype=torch.float64))
    assert p1 is None and p2 is None and out.shape == (2, 1, 1, 1)


def test_spectral_norm_normalises_by_the_largest_singular_value_after_iterating():
    torch.manual_seed(0)
    conv = sk.SpectralNorm(nn.Conv2d(6, 5, 3))
    x = torch.randn(1, 6, 3, 3)
    for _ in range(60):
        conv(x)
    w = conv.module.weight.detach().reshape(5, -1)
    assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-4
    assert not conv.module.weight_u.requires_grad and not conv.module.weight_v.requires_grad


def test_discriminator_deep_copies_after_a_forward():
    d = sk.Discriminator(2, 19, attention="naive")
    d(torch.randn(1, 19, 65, 65))
    copied = copy.deepcopy(d)
    x = torch.randn(1, 19, 65, 65)
    assert torch.equal(copied(x)[0], d(x)[0])


def test_spectral_norm_matches_the_official_module_with_the_same_state():
    torch.manual_seed(0)
    official = OfficialSpectralNorm(nn.Conv2d(4, 3, 2)).double()
    ours = sk.SpectralNorm(nn.Conv2d(4, 3, 2)).double()
    ours.load_state_dict(official.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        assert torch.allclose(ours(x), official(x), rtol=1e-13, atol=1e-15)
    # One forward, one backward: each module differentiates with the u, v of that forward.
    (g_official,) = torch.autograd.grad(official(x).square().sum(), official.module.weight_bar)
    (g_ours,) = torch.autograd.grad(ours(x).square().sum(), ours.module.weight_bar)
    assert torch.allclose(g_ours, g_official, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("attention,backend", [("naive", None)] + [("fused", b) for b in FUSED_BACKENDS])
def test_self_attention_matches_the_official_block(attention, backend):
    torch.manual_seed(0)
    official = OfficialSelfAttn(32, "relu").double()
    with torch.no_grad():
        official.gamma.fill_(1.3)
    ours = sk.SelfAttention(32, "relu", attention=attention, backend=backend).double()
    ours.load_state_dict(official.state_dict())
    assert list(ours.state_dict()) == list(official.state_dict())
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64) * 2
    out, attention_map = ours(x, return_attention=True)
    ref_out, ref_map = official(x)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(attention_map, ref_map, torch.float64, "map")
    assert ours(x)[1] is None


@pytest.mark.parametrize("attention,backend", [("naive", None)] + [("fused", b) for b in FUSED_BACKENDS])
def test_self_attention_gradgradcheck(attention, backend):
    torch.manual_seed(0)
    block = sk.SelfAttention(16, attention=attention, backend=backend).double()
    with torch.no_grad():
        block.gamma.fill_(0.9)
    x = torch.randn(2, 16, 3, 2, dtype=torch.float64)
    params = (block.query_conv.weight, block.key_conv.weight, block.value_conv.weight)

    def fn(x, wq, wk, wv):
        weights = dict(zip(["query_conv.weight", "key_conv.weight", "value_conv.weight"], (wq, wk, wv)))
        return torch.func.functional_call(block, weights, (x,))[0]

    assert_gradcheck(fn, (x, *params), orders=(1, 2))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_and_naive_discriminator_agree_on_the_penalised_d_step(backend, dtype):
    """Loss, penalty and every parameter's gradient (second order through the attention blocks)."""
    torch.manual_seed(0)
    d = sk.Discriminator(1, 19, 8, 65, conv_dim=16, attention="naive", backend=backend).to(dtype)
    with torch.no_grad():
        d.attn1.gamma.fill_(0.9)
        d.attn2.gamma.fill_(-0.7)
    student, teacher = (torch.randn(3, 19, 80, 72, dtype=dtype) * 3 for _ in range(2))
    results = {}
    for attention in ("naive", "fused"):
        model = copy.deepcopy(d).set_attention(attention)
        torch.manual_seed(1)  # the same alpha
        total, adversarial, penalty = sk.HolisticDistillLoss(model).d_loss(student, teacher, return_terms=True)
        total.backward()
        results[attention] = (total, adversarial, penalty,
                              {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    naive, fused = results["naive"], results["fused"]
    global_scale = max(g.abs().max().item() for g in naive[3].values())
    for name, got, ref in [("total", fused[0], naive[0]), ("adversarial", fused[1], naive[1]),
                           ("penalty", fused[2], naive[2])]:
        assert_close(got, ref, dtype, name)
    for name, ref in naive[3].items():
        assert_close(fused[3][name], ref, dtype, name, scale=global_scale)


def test_larger_inputs_run_every_layer():
    _, ours = official_and_ours(attention="naive", dtype=torch.float32)
    out, p1, p2 = ours(torch.randn(1, 19, 128, 96), return_attention=True)
    assert out.shape == (1, 1, 5, 3) and p1.shape == (1, 16 * 12, 16 * 12) and p2.shape == (1, 48, 48)


def test_image_conditioned_form_matches_the_cvpr_input():
    torch.manual_seed(0)
    official = OfficialDiscriminator(1, 22, 8, 65).double()
    with torch.no_grad():
        official.attn1.gamma.fill_(0.5)
    ours = sk.Discriminator(None, 22, 8, 65, attention="naive", image_conditioned=True).double()
    state = {k: v for k, v in official.state_dict().items() if not k.startswith("preprocess")}
    ours.load_state_dict(state)
    score = torch.randn(2, 19, 65, 65, dtype=torch.float64)
    image = torch.randn(2, 3, 520, 520, dtype=torch.float64)
    ref = official.forward_prepared(cvpr_input(score, image))
    assert_close(ours(score, image)[0], ref[0], torch.float64, "out")
    with pytest.raises(ValueError, match="needs image"):
        ours(score)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="preprocess_GAN_mode"):
        sk.Discriminator(4, 19)
    with pytest.raises(ValueError, match="attention"):
        sk.Discriminator(1, 19, attention="flash")
    d = sk.Discriminator(2, 19, attention="naive")
    with pytest.raises(ValueError, match="at least 64x64"):
        d(torch.randn(1, 19, 33, 65))
    with pytest.raises(ValueError, match="19 channels"):
        d(torch.randn(1, 18, 65, 65))
    with pytest.raises(ValueError, match=r"\(B, 32, H, W\)"):
        sk.SelfAttention(32)(torch.randn(1, 16, 4, 4))


def test_parameter_order_matches_the_official_discriminator():
    # The official registers l4 before l1..l3; optimisers and their state_dicts go by that order.
    official, ours = official_and_ours()
    names = [n for n, _ in ours.named_parameters()]
    assert names == [n for n, _ in official.named_parameters()]
    assert names[0].startswith("l4.") and list(ours.state_dict())[0].startswith("l4.")


def test_official_d_optimizer_state_loads_onto_the_same_parameters():
    # The official D optimiser: SGD with momentum over the parameters that require grad. Its state is
    # keyed by position; after loading, each of our parameters must get its namesake's momentum.
    official, ours = official_and_ours(dtype=torch.float32, attention="naive")
    trainable = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    official_opt = torch.optim.SGD(trainable(official), lr=4e-4, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(3)
    official(torch.randn(2, 19, 65, 65))[0].mean().backward()
    official_opt.step()
    ours.load_state_dict(official.state_dict())
    ours_opt = torch.optim.SGD(trainable(ours), lr=4e-4, momentum=0.9, weight_decay=5e-4)
    ours_opt.load_state_dict(official_opt.state_dict())
    official_buffers = {n: official_opt.state[p]["momentum_buffer"] for n, p in official.named_parameters()
                        if p.requires_grad}
    ours_buffers = {n: ours_opt.state[p]["momentum_buffer"] for n, p in ours.named_parameters() if p.requires_grad}
    assert official_buffers.keys() == ours_buffers.keys()
    for name, buffer in official_buffers.items():
        assert ours_buffers[name].shape == buffer.shape and torch.equal(ours_buffers[name], buffer), name
