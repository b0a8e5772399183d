"""The official discriminator, re-written plainly from networks/spectral.py and networks/sagan_models.py
(master) and the CVPR branch's network/discriminator.py: the specification our modules are held to.

Only what the tests need: the same parameter names, registration order and arithmetic, including the
official `.data` assignments in the power iteration; and `official_and_ours`, an official D paired with
ours holding its weights. Not part of the package.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import skd_kernels


def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


class OfficialSpectralNorm(nn.Module):
    def __init__(self, module, name="weight", power_iterations=1):
        super().__init__()
        self.module, self.name, self.power_iterations = module, name, power_iterations
        w = getattr(module, name)
        height = w.data.shape[0]
        width = w.view(height, -1).data.shape[1]
        u = nn.Parameter(w.data.new(height).normal_(0, 1), requires_grad=False)
        v = nn.Parameter(w.data.new(width).normal_(0, 1), requires_grad=False)
        u.data = l2normalize(u.data)
        v.data = l2normalize(v.data)
        w_bar = nn.Parameter(w.data)
        del module._parameters[name]
        module.register_parameter(name + "_u", u)
        module.register_parameter(name + "_v", v)
        module.register_parameter(name + "_bar", w_bar)

    def forward(self, *args):
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        height = w.data.shape[0]
        for _ in range(self.power_iterations):
            v.data = l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data))
            u.data = l2normalize(torch.mv(w.view(height, -1).data, v.data))
        sigma = u.dot(w.view(height, -1).mv(v))
        setattr(self.module, self.name, w / sigma.expand_as(w))
        return self.module.forward(*args)


class OfficialSelfAttn(nn.Module):
    def __init__(self, in_dim, activation):
        super().__init__()
        self.chanel_in, self.activation = in_dim, activation
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, width, height = x.size()
        proj_query = self.query_conv(x).view(b, -1, width * height).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(b, -1, width * height)
        attention = self.softmax(torch.bmm(proj_query, proj_key))
        proj_value = self.value_conv(x).view(b, -1, width * height)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(b, c, width, height)
        return self.gamma * out + x, attention


class OfficialDiscriminator(nn.Module):
    def __init__(self, preprocess_GAN_mode, input_channel, batch_size=64, image_size=64, conv_dim=64):
        super().__init__()
        self.imsize = image_size
        # The official builds the layers' lists in order but assigns self.l4 before l1..l3, so l4 is
        # registered first (parameters() and state_dict() list it first).
        layer1 = [OfficialSpectralNorm(nn.Conv2d(input_channel, conv_dim, 4, 2, 1)), nn.LeakyReLU(0.1)]
        layer2 = [OfficialSpectralNorm(nn.Conv2d(conv_dim, conv_dim * 2, 4, 2, 1)), nn.LeakyReLU(0.1)]
        layer3 = [OfficialSpectralNorm(nn.Conv2d(conv_dim * 2, conv_dim * 4, 4, 2, 1)), nn.LeakyReLU(0.1)]
        curr_dim = conv_dim * 4
        if image_size == 65:
            self.l4 = nn.Sequential(OfficialSpectralNorm(nn.Conv2d(curr_dim, curr_dim * 2, 4, 2, 1)),
                                    nn.LeakyReLU(0.1))
            curr_dim *= 2
        self.l1 = nn.Sequential(*layer1)
        self.l2 = nn.Sequential(*layer2)
        self.l3 = nn.Sequential(*layer3)
        self.last = nn.Sequential(nn.Conv2d(curr_dim, 1, 4))
        self.attn1 = OfficialSelfAttn(256, "relu")
        self.attn2 = OfficialSelfAttn(512, "relu")
        if preprocess_GAN_mode == 1:
            self.preprocess_additional = nn.BatchNorm2d(input_channel)
        elif preprocess_GAN_mode == 2:
            self.preprocess_additional = nn.Tanh()
        elif preprocess_GAN_mode == 3:
            self.preprocess_additional = lambda x: 2 * (x / 255 - 0.5)
        else:
            raise ValueError("preprocess_GAN_mode should be 1:bn or 2:tanh or 3:-1 - 1")

    def forward_prepared(self, x):
        out = self.l3(self.l2(self.l1(x)))
        out, p1 = self.attn1(out)
        out = self.l4(out)
        out, p2 = self.attn2(out)
        return [self.last(out), p1, p2]

    def forward(self, x):
        return self.forward_prepared(self.preprocess_additional(x))


def cvpr_input(score, image):
    """The CVPR branch's critic input: cat(image resized to the score map, softmax(score))."""
    resized = F.interpolate(image, size=score.shape[-2:], mode="bilinear", align_corners=True)
    return torch.cat([resized, F.softmax(score, dim=1)], dim=1)


# --- utils/criterion.py (master) ------------------------------------------------------------------

def official_adv_d(d_out_S, d_out_T, adv_type):
    real, fake = d_out_T[0], d_out_S[0]
    if adv_type == "wgan-gp":
        return -torch.mean(real) + fake.mean()
    return torch.nn.ReLU()(1.0 - real).mean() + torch.nn.ReLU()(1.0 + fake).mean()


def official_adv_g(d_out_S):
    return -d_out_S[0].mean()


def official_gp(D, d_in_S, d_in_T, lambda_gp):
    """CriterionAdditionalGP.forward, with torch.rand on the inputs' device instead of .cuda()."""
    real_images, fake_images = d_in_T[0], d_in_S[0]
    alpha = torch.rand(real_images.size(0), 1, 1, 1).to(real_images).expand_as(real_images)
    interpolated = (alpha * real_images.data + (1 - alpha) * fake_images.data).requires_grad_(True)
    out = D(interpolated)
    grad = torch.autograd.grad(outputs=out[0], inputs=interpolated, grad_outputs=torch.ones_like(out[0]),
                               retain_graph=True, create_graph=True, only_inputs=True)[0]
    grad = grad.view(grad.size(0), -1)
    grad_l2norm = torch.sqrt(torch.sum(grad ** 2, dim=1))
    return lambda_gp * torch.mean((grad_l2norm - 1) ** 2)


def official_and_ours(mode=1, size=65, dtype=torch.float64, seed=0, **ours_kwargs):
    """An official D with random weights (gamma non-zero) and ours loaded from its state_dict."""
    torch.manual_seed(seed)
    official = OfficialDiscriminator(mode, 19, 8, size).to(dtype)
    with torch.no_grad():
        official.attn1.gamma.fill_(0.8)
        official.attn2.gamma.fill_(-0.6)
    ours = skd_kernels.Discriminator(mode, 19, 8, size, **ours_kwargs).to(dtype)
    ours.load_state_dict(official.state_dict())
    return official, ours
