"""The pair-wise reference: the official module's semantics, checked by hand-written loops."""
import itertools

import pytest
import torch

from skd_kernels.reference import official_pairwise_window, pairwise_distill_reference


def loop_loss(nodes_s, nodes_t, detach_norm=True):
    """Sum over pairs by explicit loops, the formula as written in the paper."""
    b, _, h, w = nodes_s.shape
    positions = list(itertools.product(range(h), range(w)))
    total = 0.0
    for n in range(b):
        def unit(x, i):
            f = x[n, :, i[0], i[1]]
            norm = f.norm()
            return f / ((norm.detach() if detach_norm else norm) + (1e-8 if detach_norm else 0))
        for i, j in itertools.product(positions, positions):
            a_s = unit(nodes_s, i) @ unit(nodes_s, j)
            a_t = unit(nodes_t, i) @ unit(nodes_t, j)
            total = total + (a_s - a_t) ** 2
    return total / len(positions) ** 2 / b


def test_official_scale_gives_three_by_three_nodes_on_65x65_features():
    teacher = torch.randn(1, 4, 65, 65)
    assert official_pairwise_window(teacher, 0.5) == (32, 32)
    pooled = torch.nn.functional.max_pool2d(teacher, (32, 32), stride=(32, 32), ceil_mode=True)
    assert pooled.shape[-2:] == (3, 3)  # windows of 32, 32 and 1 pixel


def test_official_form_matches_loops_over_ceil_mode_max_pooled_nodes():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 9, 7, generator=g, dtype=torch.float64), torch.randn(
        2, 5, 9, 7, generator=g, dtype=torch.float64)
    kernel = official_pairwise_window(teacher, 0.5)  # (4, 3): partial windows at both borders
    pool = lambda x: torch.nn.functional.max_pool2d(x, kernel, stride=kernel, ceil_mode=True)  # noqa: E731
    expected = loop_loss(pool(student), pool(teacher))
    got = pairwise_distill_reference(student, teacher, scale=0.5)
    assert torch.allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("pooling", ["none", "avg"])
def test_paper_normalisation_matches_loops(pooling):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 4, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 6, 4, 6, generator=g, dtype=torch.float64)
    node = 2 if pooling == "avg" else None
    got = pairwise_distill_reference(student, teacher, node_size=node, pooling=pooling, normalization="paper")
    pool = (lambda x: torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True)) if node else (lambda x: x)
    expected = loop_loss(pool(student), pool(teacher), detach_norm=False)
    assert torch.allclose(got, expected, rtol=1e-12)
    (g_got,) = torch.autograd.grad(got, student)
    (g_exp,) = torch.autograd.grad(expected, student)
    assert torch.allclose(g_got, g_exp, rtol=1e-10)


def test_official_normalisation_detaches_the_norm():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64)
    official = pairwise_distill_reference(student, teacher, normalization="official")
    paper = pairwise_distill_reference(student, teacher, normalization="paper")
    assert torch.allclose(official, paper, rtol=1e-6)  # same value (up to the 1e-8) ...
    (g_official,) = torch.autograd.grad(official, student)
    (g_paper,) = torch.autograd.grad(paper, student)
    assert not torch.allclose(g_official, g_paper, rtol=1e-3)  # ... different gradients


def test_identical_features_give_zero_loss_and_zero_vectors_stay_finite():
    features = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert pairwise_distill_reference(features, features.clone()) == 0
    features[:, :, 0, 0] = 0
    loss = pairwise_distill_reference(features, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert torch.isfinite(loss)
