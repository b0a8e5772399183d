"""A plain SAGAN discriminator and the holistic losses, used only while `skd_kernels` does not ship
its own (`skd_kernels.Discriminator`, `skd_kernels.holistic`, branch `disc`). Same architecture and
loss semantics as /work/shared/SKD.md; none of the fused attention, none of the official state_dict keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class SelfAttention(nn.Module):
    """SAGAN self-attention: energy = q^T k (no 1/sqrt(d)), softmax over keys, out = gamma * v A^T + x."""

    def __init__(self, channels: int):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels // 8, 1)
        self.key_conv = nn.Conv2d(channels, channels // 8, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)          # (B, N, C/8)
        k = self.key_conv(x).flatten(2)                              # (B, C/8, N)
        attn = torch.softmax(torch.bmm(q, k), dim=-1)                # (B, N, N)
        v = self.value_conv(x).flatten(2)                            # (B, C, N)
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x, attn


class Discriminator(nn.Module):
    """Official constructor signature; preprocess_GAN_mode 1 = input BatchNorm2d. Returns [out, attn1, attn2]."""

    def __init__(self, preprocess_GAN_mode: int, input_channel: int, batch_size: int = 64,
                 image_size: int = 65, conv_dim: int = 64):
        super().__init__()
        self.preprocess_GAN_mode = preprocess_GAN_mode
        self.input_bn = nn.BatchNorm2d(input_channel) if preprocess_GAN_mode == 1 else None
        dims = [input_channel, conv_dim, conv_dim * 2, conv_dim * 4, conv_dim * 8]
        blocks = [nn.Sequential(spectral_norm(nn.Conv2d(a, b, 4, 2, 1)), nn.LeakyReLU(0.1))
                  for a, b in zip(dims[:-1], dims[1:])]
        self.l1, self.l2, self.l3, self.l4 = blocks
        self.attn1, self.attn2 = SelfAttention(dims[3]), SelfAttention(dims[4])
        self.last = nn.Conv2d(dims[4], 1, 4)

    def forward(self, x):
        if self.preprocess_GAN_mode == 1:
            x = self.input_bn(x)
        elif self.preprocess_GAN_mode == 2:
            x = torch.tanh(x)
        elif self.preprocess_GAN_mode == 3:
            x = 2 * (x / 255 - 0.5)
        x = self.l3(self.l2(self.l1(x)))
        x, a1 = self.attn1(x)
        x, a2 = self.attn2(self.l4(x))
        return [self.last(x), a1, a2]


class CriterionAdv(nn.Module):
    """D loss on the output lists: wgan-gp -mean D(T) + mean D(S), or hinge."""

    def __init__(self, adv_type: str):
        super().__init__()
        self.adv_type = adv_type

    def forward(self, d_out_S, d_out_T):
        s, t = d_out_S[0], d_out_T[0]
        if self.adv_type == "hinge":
            return F.relu(1 - t).mean() + F.relu(1 + s).mean()
        return -t.mean() + s.mean()


class CriterionAdvForG(nn.Module):
    """G loss: -mean D(S) (both adversarial types)."""

    def __init__(self, adv_type: str):
        super().__init__()
        self.adv_type = adv_type

    def forward(self, d_out_S):
        return -d_out_S[0].mean()


class CriterionAdditionalGP(nn.Module):
    """Gradient penalty lambda_gp * mean((||dD/dx_hat||_2 - 1)^2), x_hat = a T + (1 - a) S, a ~ U[0,1) per sample.

    The norm is sqrt(sum g^2 + 1e-12): finite gradient even where g = 0 (the official sqrt gives NaN there).
    """

    def __init__(self, D_net: nn.Module, lambda_gp: float):
        super().__init__()
        self.D, self.lambda_gp = D_net, lambda_gp

    def forward(self, d_in_S, d_in_T):
        fake, real = d_in_S[0].detach(), d_in_T[0].detach()
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = self.D(x_hat)[0]
        (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
        norm = (grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt()
        return self.lambda_gp * ((norm - 1) ** 2).mean()
