"""Holistic distillation: the adversarial losses between the student's and the teacher's score maps.

The discriminator (skd_kernels.discriminator.Discriminator) is a critic of score maps: the teacher's
are "real", the student's "fake". Per training step (the official schedule, n_critic = 1):
- G (student) step: -mean D(S), weighted 0.1 in the student's loss;
- D step on detached maps: wgan-gp  -mean D(T) + mean D(S)  (hinge: relu(1 - D(T)).mean() +
  relu(1 + D(S)).mean()), plus for wgan-gp the gradient penalty
  lambda_gp * mean_b((||dD(x_hat)/dx_hat||_2 - 1)^2), x_hat = alpha T + (1 - alpha) S,
  alpha ~ U[0, 1) per sample; both weighted 0.1.

Why the official D loss can turn NaN, and what we do instead (tests/test_holistic.py shows each):
1. The official penalty takes sqrt(sum g^2). The derivative of sqrt at 0 is infinite, and autograd
   multiplies it by 2g = 0: 0 * inf = NaN in every D parameter's gradient as soon as one sample's
   input gradient is exactly zero. That happens with preprocess_GAN_mode 2 (tanh): logits beyond
   about +-9 saturate fp32 tanh to exactly +-1, whose derivative is exactly 0, and confident
   teacher/student logits do that. One NaN step poisons D's weights for good. Ours uses
   torch.linalg.vector_norm, whose gradient at 0 is 0 (the subgradient), so the step stays finite.
2. With preprocess_GAN_mode 1, the input BatchNorm uses the statistics of each batch (T, S and
   x_hat separately). A channel that is (nearly) constant over a batch, e.g. a class the student
   never predicts or degenerate maps, has variance ~0 and is scaled by 1/sqrt(var + 1e-5) ~ 316:
   the input gradient, hence the penalty and D's update, blow up by that factor, and a few such SGD
   steps overflow to inf/NaN. This is the official behaviour and part of the module's semantics,
   so we keep it; the penalty is computed in float32 (float64 for float64) so that it stays finite
   where the values themselves are finite.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._validation import check_choice, check_float_tensor, check_nonempty_batch, check_same
from .modules import first_output

ADV_TYPES = ("wgan-gp", "hinge")


def _check_pair(name_s: str, s: torch.Tensor, name_t: str, t: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
        raise TypeError(f"{name_s} and {name_t} must be tensors (or lists whose element 0 is one)")
    if s.shape != t.shape:
        raise ValueError(f"{name_s} {tuple(s.shape)} and {name_t} {tuple(t.shape)} must have the same shape")


def _check_maps(discriminator: nn.Module, image: Optional[torch.Tensor], **maps) -> None:
    """Score maps (B, K, H, W) given to a holistic loss, checked before the discriminator runs, so that
    errors name the argument: the discriminator's own `check_input` when it has one (channels, device),
    else float, 4-d and a non-empty batch."""
    check_input = getattr(discriminator, "check_input", None)
    for name, x in maps.items():
        if check_input is not None:
            check_input(x, image, name)
        else:
            check_float_tensor(name, x, 4, "(B, K, H, W)")
            check_nonempty_batch(name, x)


def adversarial_d_loss(d_out_s: torch.Tensor, d_out_t: torch.Tensor, adv_type: str = "wgan-gp") -> torch.Tensor:
    """The critic's loss from its outputs on student (fake) and teacher (real) maps, any equal shapes.

    wgan-gp: -mean(d_out_t) + mean(d_out_s); hinge: relu(1 - d_out_t).mean() + relu(1 + d_out_s).mean().
    """
    check_choice("adv_type", adv_type, ADV_TYPES)
    _check_pair("d_out_S", d_out_s, "d_out_T", d_out_t)
    if adv_type == "wgan-gp":
        return -d_out_t.mean() + d_out_s.mean()
    return torch.relu(1.0 - d_out_t).mean() + torch.relu(1.0 + d_out_s).mean()


def adversarial_g_loss(d_out_s: torch.Tensor) -> torch.Tensor:
    """The student's (generator's) loss, -mean(D(S)), for both adversarial types."""
    return -d_out_s.mean()


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, lambda_gp: float = 10.0,
                     alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """WGAN-GP: lambda_gp * mean_b((||d sum(critic(x_hat)) / d x_hat[b]||_2 - 1)^2).

    real, fake: (B, ...) critic inputs (detached here); x_hat = alpha * real + (1 - alpha) * fake with
    alpha (B,) ~ U[0, 1) drawn per sample (CPU generator, float32) unless given. critic(x) returns the
    output tensor or a list whose element 0 it is. The input gradient is taken with create_graph=True, so backward of the
    result reaches the critic's parameters through a second-order graph. The per-sample norm's
    gradient at a zero input gradient is 0, not NaN (see the module docstring).
    """
    _check_pair("fake", fake, "real", real)
    check_same("fake", fake, "real", real)
    check_float_tensor("real", real, real.dim(), "(B, ...)")
    check_nonempty_batch("real", real)
    b = real.shape[0]
    if alpha is None:
        # Drawn as the official code does (float32 on the CPU generator, then moved), so that a seed
        # reproduces its alpha.
        alpha = torch.rand(b)
    alpha = alpha.to(real.device, real.dtype).reshape(b, *([1] * (real.dim() - 1)))
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = first_output(critic(x_hat))
    (grad,) = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(grad.reshape(b, -1).to(compute), dim=1)
    return lambda_gp * ((norm - 1) ** 2).mean()


class HolisticDistillLoss(nn.Module):
    """The holistic loss of one training step around a discriminator.

    d_loss(student, teacher[, image][, alpha=]) -> the D loss on detached score maps (B, K, H, W):
        adversarial (wgan-gp or hinge) + for wgan-gp the gradient penalty (lambda_gp), times `weight`.
        With return_terms=True: (total, adversarial, penalty) (penalty 0 for hinge).
    d_step(student, teacher[, image][, alpha=]) -> the same terms, detached, after running their backward one
        graph at a time (same gradients, a third of the graphs alive: use it in training loops).
    g_loss(student[, image]) -> -mean D(S) times `weight`, differentiable w.r.t. the student.

    The penalty interpolates the discriminator's inputs: the raw score maps (so its preprocessing
    is differentiated too, as in the official code) or, for an image-conditioned discriminator, the
    prepared inputs cat(image, softmax(score)) (as the CVPR-era code penalises them).
    `weight` is the official lambda_d (0.1 in the recipe); the default 1 leaves weighting to the caller.
    """

    def __init__(self, discriminator: nn.Module, adv_type: str = "wgan-gp", lambda_gp: float = 10.0,
                 weight: float = 1.0):
        super().__init__()
        check_choice("adv_type", adv_type, ADV_TYPES)
        self.discriminator, self.adv_type = discriminator, adv_type
        self.lambda_gp, self.weight = float(lambda_gp), float(weight)

    def _conditioned(self) -> bool:
        return bool(getattr(self.discriminator, "image_conditioned", False))

    def _critic_and_inputs(self, student, teacher, image):
        d = self.discriminator
        if self._conditioned():
            return d.critic, d.prepare(student, image), d.prepare(teacher, image)
        return d, student, teacher

    def d_loss(self, student: torch.Tensor, teacher: torch.Tensor, image: Optional[torch.Tensor] = None,
               *, return_terms: bool = False, alpha: Optional[torch.Tensor] = None):
        _check_pair("student", student, "teacher", teacher)
        _check_maps(self.discriminator, image, student=student, teacher=teacher)
        critic, s_in, t_in = self._critic_and_inputs(student.detach(), teacher.detach(), image)
        # Teacher first, then student, then x_hat: the official order, which matters for the input
        # BatchNorm's running statistics and the spectral norms' power iterations.
        d_out_t = first_output(critic(t_in))
        d_out_s = first_output(critic(s_in))
        adversarial = adversarial_d_loss(d_out_s, d_out_t, self.adv_type)
        penalty = adversarial.new_zeros(())
        if self.adv_type == "wgan-gp":
            penalty = gradient_penalty(critic, t_in, s_in, self.lambda_gp, alpha).to(adversarial.dtype)
        total = self.weight * (adversarial + penalty)
        return (total, adversarial, penalty) if return_terms else total

    def d_step(self, student: torch.Tensor, teacher: torch.Tensor, image: Optional[torch.Tensor] = None, *,
               alpha: Optional[torch.Tensor] = None):
        """The D loss and its backward, one graph at a time: (total, adversarial, penalty), detached.

        Accumulates into the discriminator's .grad exactly what `d_loss(...).backward()` does (the
        same forwards in the same order, so the same BatchNorm statistics, power iterations and
        alpha), but backpropagates each term right after its forward, so only one of the three
        graphs (teacher, student, penalty) is alive at a time: the peak is the penalty's graph
        instead of all three. Call optimiser.step() after it. `alpha` (B,): the penalty's
        interpolation weights, drawn as gradient_penalty draws them when None (a CUDA graph passes
        ones drawn on the GPU: skd_kernels.graphs).
        """
        _check_pair("student", student, "teacher", teacher)
        _check_maps(self.discriminator, image, student=student, teacher=teacher)
        critic, s_in, t_in = self._critic_and_inputs(student.detach(), teacher.detach(), image)
        w = self.weight
        if self.adv_type == "wgan-gp":
            real = -first_output(critic(t_in)).mean()
            (w * real).backward()
            fake = first_output(critic(s_in)).mean()
        else:
            real = torch.relu(1.0 - first_output(critic(t_in))).mean()
            (w * real).backward()
            fake = torch.relu(1.0 + first_output(critic(s_in))).mean()
        (w * fake).backward()
        adversarial = (real + fake).detach()
        penalty = adversarial.new_zeros(())
        if self.adv_type == "wgan-gp":
            penalty = gradient_penalty(critic, t_in, s_in, self.lambda_gp, alpha)
            (w * penalty).backward()
            penalty = penalty.detach().to(adversarial.dtype)
        return w * (adversarial + penalty), adversarial, penalty

    def g_loss(self, student: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_maps(self.discriminator, image, student=student)
        return self.weight * adversarial_g_loss(first_output(self.discriminator(student, image)
                                                       if self._conditioned() else self.discriminator(student)))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, image: Optional[torch.Tensor] = None):
        """(D loss, G loss) of one step: the D loss on detached maps, the G loss through the student."""
        return self.d_loss(student, teacher, image), self.g_loss(student, image)

    def extra_repr(self) -> str:
        return f"adv_type={self.adv_type!r}, lambda_gp={self.lambda_gp}, weight={self.weight}"


# --- drop-ins for the official utils/criterion.py ---------------------------------------------------

class CriterionAdv(nn.Module):
    """Official `CriterionAdv(adv_type)`: forward(d_out_S, d_out_T) on the discriminator's output lists
    (element 0 used) -> the critic loss of :func:`adversarial_d_loss` (no penalty, no weight)."""

    def __init__(self, adv_type: str):
        super().__init__()
        check_choice("adv_type", adv_type, ADV_TYPES)
        self.adv_loss = adv_type

    def forward(self, d_out_S, d_out_T) -> torch.Tensor:
        return adversarial_d_loss(first_output(d_out_S), first_output(d_out_T), self.adv_loss)


class CriterionAdvForG(nn.Module):
    """Official `CriterionAdvForG(adv_type)`: forward(d_out_S[, unused]) -> -mean(d_out_S[0]).
    (The official forward takes a second, unused argument; it is optional here.)"""

    def __init__(self, adv_type: str):
        super().__init__()
        check_choice("adv_type", adv_type, ADV_TYPES)
        self.adv_loss = adv_type

    def forward(self, d_out_S, d_out_S_no_use=None) -> torch.Tensor:
        return adversarial_g_loss(first_output(d_out_S))


class CriterionAdditionalGP(nn.Module):
    """Official `CriterionAdditionalGP(D_net, lambda_gp)`: forward(d_in_S, d_in_T) on the student's and
    teacher's model outputs (lists, element 0 = score maps (B, K, H, W); tensors accepted) ->
    lambda_gp * mean((||g|| - 1)^2) of :func:`gradient_penalty` on D_net (zero-safe norm)."""

    def __init__(self, D_net: nn.Module, lambda_gp: float):
        super().__init__()
        self.D, self.lambda_gp = D_net, float(lambda_gp)

    def forward(self, d_in_S, d_in_T) -> torch.Tensor:
        _check_maps(self.D, None, d_in_S=first_output(d_in_S), d_in_T=first_output(d_in_T))
        return gradient_penalty(self.D, first_output(d_in_T), first_output(d_in_S), self.lambda_gp)
