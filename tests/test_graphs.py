"""CUDA graphs of the holistic loss's steps (skd_kernels.graphs): on the CPU, the errors a caller
meets (CPU tensors, another shape, replaced gradients) and the undoing of warm-up steps; on a GPU
(`cuda` marker), captured steps against the eager ones over several replays."""
from __future__ import annotations

import copy

import pytest
import torch

import skd_kernels as sk
from skd_kernels.graphs import StaticInputs, _module_state_kept, capture_d_step, capture_g_loss

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def discriminator_and_loss(device="cpu", attention="fused", adv_type="wgan-gp", seed=0):
    torch.manual_seed(seed)
    d = sk.Discriminator(1, 19, 2, 65, conv_dim=16, attention=attention).to(device)
    return d, sk.HolisticDistillLoss(d, adv_type, lambda_gp=10.0, weight=0.1)


def score_maps(batch=2, device="cpu", seed=2, size=65):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(batch, 19, size, size, generator=g) * 3).to(device) for _ in range(2))


# --- on the CPU: what a caller gets wrong -----------------------------------------------------------

def test_capture_refuses_cpu_tensors_naming_the_argument():
    d, loss = discriminator_and_loss()
    student, teacher = score_maps()
    with pytest.raises(ValueError, match="student is on cpu: CUDA graphs capture GPU work only"):
        capture_d_step(loss, student, teacher)
    with pytest.raises(ValueError, match="student is on cpu"):
        capture_g_loss(d, student)


def test_capture_d_step_needs_a_holistic_loss():
    d, _ = discriminator_and_loss()
    student, teacher = score_maps()
    with pytest.raises(TypeError, match="loss must be a HolisticDistillLoss"):
        capture_d_step(d, student, teacher)


def test_static_inputs_refuse_another_shape_dtype_or_input_naming_it():
    student, teacher = score_maps()
    inputs = StaticInputs(student=student, teacher=teacher, image=None)
    buffer = inputs["student"]
    new_student, new_teacher = score_maps(seed=5)
    inputs.fill(student=new_student, teacher=new_teacher, image=None)
    assert inputs["student"] is buffer and torch.equal(buffer, new_student)  # copied in, same memory
    with pytest.raises(ValueError, match=r"student: the step was captured for \(2, 19, 65, 65\) float32 on cpu, "
                                         r"got \(1, 19, 65, 65\) float32 on cpu; .* capture again"):
        inputs.fill(student=new_student[:1], teacher=new_teacher, image=None)
    with pytest.raises(ValueError, match="teacher: .* got \\(2, 19, 65, 65\\) float64"):
        inputs.fill(student=new_student, teacher=new_teacher.double(), image=None)
    with pytest.raises(ValueError, match="image: the step was captured for None"):
        inputs.fill(student=new_student, teacher=new_teacher, image=torch.zeros(2, 3, 65, 65))
    with pytest.raises(TypeError, match="expected the inputs"):
        inputs.fill(student=new_student)
    assert torch.equal(buffer, new_student)  # a refused fill copies nothing


def test_warm_up_steps_are_undone_in_place():
    """Capture runs the step a few times first; the module must come out as it went in, with the
    very tensors the graph captured."""
    d, loss = discriminator_and_loss()
    student, teacher = score_maps()
    for p in d.parameters():
        p.grad = torch.zeros_like(p)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    tensors = {k: v for k, v in d.state_dict(keep_vars=True).items()}
    grads = {n: p.grad for n, p in d.named_parameters()}
    with _module_state_kept(d):
        loss.d_step(student, teacher)
        loss.d_step(student, teacher)
        assert any(not torch.equal(d.state_dict()[k], v) for k, v in before.items())  # the steps changed it
        assert any(g.abs().sum() > 0 for g in grads.values())
    for key, value in d.state_dict(keep_vars=True).items():
        assert value is tensors[key] and torch.equal(value, before[key]), key
    for name, p in d.named_parameters():
        assert p.grad is grads[name] and not p.grad.any(), name


class _EagerGraph:
    """Stands in for a CUDA graph on the CPU: replay re-runs the step and writes its results into the
    tensors the capture returned, as a replay rewrites the graph's buffers."""

    def __init__(self, step, outputs):
        self.step, self.outputs = step, outputs

    def replay(self):
        with torch.enable_grad():  # a replay runs no Python; re-running it inside autograd.Function needs this
            values = self.step()
        for buffer, value in zip(self.outputs, values):
            if buffer is not None:
                buffer.copy_(value)


@pytest.fixture
def eager_graphs(monkeypatch):
    """Capture on the CPU with _EagerGraph: everything of skd_kernels.graphs but the CUDA calls (the
    warm-up and undoing it, static inputs, gradients added in place, the G term's autograd node)."""
    from skd_kernels import graphs

    def capture(step, device, warmup):
        for _ in range(warmup):
            step()
        outputs = step()  # a real capture runs nothing; the state it changes is undone all the same
        return _EagerGraph(step, outputs), outputs, 0

    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(graphs, "_check_cuda", lambda module, **tensors: torch.device("cpu"))


def test_captured_d_step_adds_the_eager_d_step_gradients_replay_after_replay(eager_graphs):
    d, loss = discriminator_and_loss()
    twin = copy.deepcopy(d)
    twin_loss = sk.HolisticDistillLoss(twin, "wgan-gp", lambda_gp=10.0, weight=0.1)
    graphed = capture_d_step(loss, *score_maps())
    for key, value in twin.state_dict().items():
        assert torch.equal(d.state_dict()[key], value), key  # capture left D as it was
    grads = [p.grad for p in d.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)  # allocated, zero
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (d, twin))
    for replay in range(2):
        student, teacher = score_maps(seed=10 + replay)
        d.zero_grad(set_to_none=False)
        total, _, penalty = graphed(student, teacher)
        twin.zero_grad(set_to_none=True)
        expected_total, _, expected_penalty = twin_loss.d_step(student, teacher, alpha=graphed.alpha.clone())
        assert torch.equal(total, expected_total) and torch.equal(penalty, expected_penalty)
        for (name, p), twin_p in zip(d.named_parameters(), twin.parameters()):
            if twin_p.grad is not None:
                assert torch.equal(p.grad, twin_p.grad), (replay, name)
        assert [p.grad for p in d.parameters() if p.requires_grad] == grads  # the same tensors
        opt.step()
        twin_opt.step()
    d.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"zero_grad\(set_to_none=True\)\?"):
        graphed(student, teacher)


def test_captured_g_loss_backward_gives_the_eager_input_gradient(eager_graphs):
    d, _ = discriminator_and_loss()
    twin = copy.deepcopy(d)
    d.requires_grad_(False)
    twin.requires_grad_(False)
    student, _ = score_maps()
    graphed = capture_g_loss(d, student)
    for replay in range(2):
        student, _ = score_maps(seed=20 + replay)
        s, s_twin = student.clone().requires_grad_(), student.clone().requires_grad_()
        got = 0.1 * graphed(s)
        expected = 0.1 * sk.adversarial_g_loss(twin(s_twin)[0])
        (3 * got).backward()
        (3 * expected).backward()
        assert torch.equal(got, expected) and got.grad_fn is not None
        # The graph's gradient is taken for a weight of 1 and scaled after: rounding apart, the same.
        torch.testing.assert_close(s.grad, s_twin.grad, rtol=1e-5, atol=1e-6 * s_twin.grad.abs().max().item())
        assert s.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())  # the student's term does not train D


# --- on a GPU: captured against eager ---------------------------------------------------------------

def _grads(d):
    return {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}


def _assert_close_grads(got, expected, what):
    # Same kernels on the same inputs; what may differ is the order of float additions in kernels that
    # use atomics or pick algorithms per call (cuDNN's weight gradients): rounding of the largest gradient.
    for name, grad in expected.items():
        scale = max(grad.abs().max().item(), 1e-30)
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: {name}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("adv_type", ["wgan-gp", "hinge"])
def test_cuda_graph_d_step_matches_eager_d_step_over_replays(adv_type):
    """Two copies of D, trained side by side for three steps (SGD after each): one by replays of the
    captured d_step, one by eager d_step with the alphas the replays drew. Their terms, gradients,
    power iterations and BatchNorm statistics agree to the tolerance of _assert_close_grads; every
    replay draws new alphas."""
    device = torch.device("cuda")
    d, loss = discriminator_and_loss(device, adv_type=adv_type)
    twin = copy.deepcopy(d)
    twin_loss = sk.HolisticDistillLoss(twin, adv_type, lambda_gp=10.0, weight=0.1)
    student, teacher = score_maps(device=device)
    graphed = capture_d_step(loss, student, teacher)
    for key, value in twin.state_dict().items():  # capture left D as it was
        assert torch.equal(d.state_dict()[key], value), key
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (d, twin))
    alphas = []
    for replay in range(3):
        student, teacher = score_maps(device=device, seed=10 + replay)
        d.zero_grad(set_to_none=False)
        total, adversarial, penalty = graphed(student, teacher)
        twin.zero_grad(set_to_none=True)
        alpha = None if graphed.alpha is None else graphed.alpha.clone()
        expected = twin_loss.d_step(student, teacher, alpha=alpha)
        for got, want in zip((total, adversarial, penalty), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        _assert_close_grads(_grads(d), _grads(twin), f"replay {replay}")
        opt.step()
        twin_opt.step()
        if alpha is not None:
            alphas.append(alpha)
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(d.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    if adv_type == "wgan-gp":
        assert not torch.equal(alphas[0], alphas[1]) and not torch.equal(alphas[1], alphas[2])
        assert all(((0 <= a) & (a < 1)).all() for a in alphas)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_g_loss_matches_eager_g_loss_and_its_input_gradient():
    device = torch.device("cuda")
    d, _ = discriminator_and_loss(device)
    twin = copy.deepcopy(d)
    d.requires_grad_(False)
    twin.requires_grad_(False)
    student, _ = score_maps(device=device)
    graphed = capture_g_loss(d, student)
    for replay in range(2):
        student, _ = score_maps(device=device, seed=20 + replay)
        s, s_twin = student.clone().requires_grad_(), student.clone().requires_grad_()
        got = 0.1 * graphed(s)
        expected = 0.1 * sk.adversarial_g_loss(twin(s_twin)[0])
        (3 * got).backward()
        (3 * expected).backward()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.grad, s_twin.grad, rtol=1e-4, atol=1e-5 * s_twin.grad.abs().max().item())


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_d_step_refuses_replaced_gradients_and_new_shapes():
    device = torch.device("cuda")
    d, loss = discriminator_and_loss(device)
    student, teacher = score_maps(device=device)
    graphed = capture_d_step(loss, student, teacher)
    with pytest.raises(ValueError, match="student: the step was captured for"):
        graphed(*score_maps(batch=4, device=device))
    d.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        graphed(student, teacher)
