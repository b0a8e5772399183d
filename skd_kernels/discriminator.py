"""The holistic distillation's discriminator: SAGAN-style spectral-norm convolutions and self-attention.

Drop-in replacements for the official `networks/spectral.py` (SpectralNorm) and
`networks/sagan_models.py` (Self_Attn, Discriminator): same constructors, submodule names and
state_dict keys, so official checkpoints load. What differs is how attention runs: the official
Self_Attn materialises the N x N attention map (N = H*W of the feature map; 4096 at attn1 for a
512x512 input), and so does every extra graph the gradient penalty's double backward builds on it.
Ours calls the fused attention op (`attention="fused"`, the default), which never builds N x N and
supports double backward; `attention="naive"` runs the official formula.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice, check_device, check_float_tensor, check_score_maps
from .ops.attention import fused_attention

ATTENTION_MODES = ("fused", "naive")


def l2normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """v / (||v|| + eps): the official spectral norm's normalisation (eps added, not clamped)."""
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    """Spectral normalisation of `module.<name>` as the official (SAGAN) SpectralNorm does it.

    The wrapped module's parameter `<name>` is replaced by the parameter `<name>_bar` (W-bar) and the
    parameters `<name>_u` (out,) and `<name>_v` (in*kh*kw,) with requires_grad=False, so state_dict
    keys are `module.weight_bar`, `module.weight_u`, `module.weight_v` (+ `module.bias`). Every
    forward runs `power_iterations` power iterations on W-bar viewed as (out, -1), updating u and v
    in place, then uses W = W-bar / sigma with sigma = u . (W-bar v) (gradient through W-bar only).

    One deliberate difference: the official code assigns `u.data = ...`, so a graph built by an
    earlier forward sees the *later* u and v when it is differentiated (the D step runs D three
    times before one backward). Ours differentiates each forward with its own u and v. Forward
    values are identical.
    """

    def __init__(self, module: nn.Module, name: str = "weight", power_iterations: int = 1):
        super().__init__()
        self.module, self.name, self.power_iterations = module, name, power_iterations
        if not hasattr(module, name + "_bar"):
            weight = getattr(module, name)
            height = weight.shape[0]
            width = weight.detach().reshape(height, -1).shape[1]
            u = nn.Parameter(l2normalize(weight.detach().new_empty(height).normal_(0, 1)), requires_grad=False)
            v = nn.Parameter(l2normalize(weight.detach().new_empty(width).normal_(0, 1)), requires_grad=False)
            w_bar = nn.Parameter(weight.detach().clone())
            del module._parameters[name]
            # Registration order as the official module (u, v, bar): state_dict key order matches.
            module.register_parameter(name + "_u", u)
            module.register_parameter(name + "_v", v)
            module.register_parameter(name + "_bar", w_bar)

    def normalized_weight(self) -> torch.Tensor:
        """Run the power iteration (updating u, v) and return W-bar / sigma, shaped like W-bar."""
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w_bar = getattr(self.module, self.name + "_bar")
        matrix = w_bar.reshape(w_bar.shape[0], -1)
        with torch.no_grad():
            new_u, new_v = u.detach(), v.detach()
            for _ in range(self.power_iterations):
                new_v = l2normalize(torch.mv(matrix.detach().t(), new_u))
                new_u = l2normalize(torch.mv(matrix.detach(), new_v))
            u.copy_(new_u)
            v.copy_(new_v)
        # new_u/new_v are fresh tensors owned by this forward's graph: later updates cannot reach it.
        sigma = torch.dot(new_u, torch.mv(matrix, new_v))
        return w_bar / sigma

    def forward(self, *args):
        # Like the official module: set `module.weight` to the normalised weight, then run it. Left
        # behind detached, so that the module holds no graph and deep-copies (EMA, checkpoints).
        weight = self.normalized_weight()
        setattr(self.module, self.name, weight)
        try:
            return self.module(*args)
        finally:
            setattr(self.module, self.name, weight.detach())


def _naive_attention(q, k, v):
    """softmax_j(q_i . k_j) v_j with the N x N map materialised: (B,N,D),(B,N,D),(B,N,Dv) -> out, map."""
    attention = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    return torch.bmm(attention, v), attention


class SelfAttention(nn.Module):
    """Drop-in for the official `Self_Attn(in_dim, activation)` (SAGAN self-attention).

    query_conv, key_conv: 1x1 conv C -> C//8; value_conv: 1x1 conv C -> C (all with bias);
    gamma = zeros(1). With q, k, v the projections at the N = H*W positions,
    out = gamma * sum_j softmax_j(q_i . k_j) v_j + x (no 1/sqrt(d) scaling, softmax over keys).

    The three projections run as one matmul with the concatenated weights (one pass over x instead
    of three). `attention="fused"` calls `skd_kernels.ops.attention.fused_attention` (no N x N map,
    exact double backward); `"naive"` materialises the map as the official code does.

    forward(x, return_attention=False): x (B, C, H, W) -> (out (B, C, H, W), map). The map
    (B, N, N), map[b, i, j] = softmax_j(q_i . k_j) as the official returns, is built only when
    `return_attention=True`; otherwise it is None (the official always builds it).
    """

    def __init__(self, in_dim: int, activation: str = "relu", *, attention: str = "fused",
                 backend: Optional[str] = None):
        super().__init__()
        check_choice("attention", attention, ATTENTION_MODES)
        if in_dim < 8:
            raise ValueError(f"in_dim must be >= 8 (query/key have in_dim // 8 channels), got {in_dim}")
        self.chanel_in = in_dim  # the official attribute names
        self.activation = activation
        self.attention, self.backend = attention, backend
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def projections(self, x: torch.Tensor):
        """q, k (B, N, C//8) and v (B, N, C) of x (B, C, H, W), position-major, from one matmul."""
        b, c, h, w = x.shape
        weight = torch.cat([self.query_conv.weight, self.key_conv.weight, self.value_conv.weight]).flatten(1)
        bias = torch.cat([self.query_conv.bias, self.key_conv.bias, self.value_conv.bias])
        qkv = F.linear(x.flatten(2).transpose(1, 2), weight, bias)  # (B, N, 2*C//8 + C)
        d = c // 8
        return qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if x.dim() != 4 or x.shape[1] != self.chanel_in:
            raise ValueError(f"x must be (B, {self.chanel_in}, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        q, k, v = self.projections(x)
        attention_map = None
        if self.attention == "naive":
            out, attention_map = _naive_attention(q, k, v)
        else:
            out = fused_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=self.backend)
            if return_attention:
                attention_map = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return self.gamma * out + x, (attention_map if return_attention else None)

    def extra_repr(self) -> str:
        return f"in_dim={self.chanel_in}, attention={self.attention!r}"


class _ScaleTo255Range(nn.Module):
    """preprocess_GAN_mode 3: 2 * (x / 255 - 0.5) (a lambda in the official code; no parameters)."""

    def forward(self, x):
        return 2 * (x / 255 - 0.5)


def _preprocess(mode: int, channels: int) -> nn.Module:
    if mode == 1:
        return nn.BatchNorm2d(channels)
    if mode == 2:
        return nn.Tanh()
    if mode == 3:
        return _ScaleTo255Range()
    raise ValueError(f"preprocess_GAN_mode must be 1 (BatchNorm), 2 (tanh) or 3 (2*(x/255-0.5)), got {mode!r}")


def _sn_conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # In place: autograd then keeps only the activation's output (its backward needs no input when
    # the slope is positive), not both, in every graph of the D step (the penalty keeps three).
    conv = SpectralNorm(nn.Conv2d(in_channels, out_channels, 4, 2, 1))
    return nn.Sequential(conv, nn.LeakyReLU(0.1, inplace=True))


class Discriminator(nn.Module):
    """Drop-in for the official `sagan_models.Discriminator(preprocess_GAN_mode, input_channel,
    batch_size=64, image_size=64, conv_dim=64)`, the holistic loss's critic.

    preprocess (1: BatchNorm2d(input_channel) with batch statistics in training, 2: tanh,
    3: 2*(x/255 - 0.5)) -> l1: SN-conv 4x4/2/1 input_channel -> conv_dim, LeakyReLU 0.1 ->
    l2: -> 2*conv_dim -> l3: -> 4*conv_dim -> attn1 -> l4: -> 8*conv_dim -> attn2 ->
    last: conv 4x4/1/0 -> 1 (no spectral norm).

    forward(x, image=None, *, return_attention=False): x (B, input_channel, H, W) score maps ->
    [out (B, 1, H', W'), attn1 map, attn2 map]; the maps (B, N, N) only with return_attention=True,
    else None. A 65x65 input gives N = 64 at attn1, 16 at attn2 and a 1x1 output; larger inputs
    work as well (512x512: N = 4096 and 1024, out 29x29), the losses average over the output map.
    Inputs must be at least 64x64 so that `last` sees a 4x4 map.

    image_size: the official module builds l4 only for image_size == 65 but its forward always
    runs l4, so only image_size=65 models ever worked. Ours always builds l4 (whatever image_size,
    kept for the signature and as `imsize`); official checkpoints (image_size 65) load unchanged,
    and l4 is registered first as in the official module, so parameters(), named_parameters() and
    state_dict() list them in the official order (an official D optimiser's state loads by position).
    attn1/attn2 have 4*conv_dim and 8*conv_dim channels (the official hard-codes 256 and 512, equal
    for the default conv_dim 64). batch_size is unused, as in the official module.

    image_conditioned=True gives the CVPR-era form: input cat(image resized bilinearly
    (align_corners=True) to the score map's size, softmax(score over classes)), no preprocess;
    input_channel must then be image channels + classes (22 for RGB + 19), preprocess_GAN_mode is
    ignored, and forward needs `image`.
    """

    def __init__(self, preprocess_GAN_mode: Optional[int], input_channel: int, batch_size: int = 64,
                 image_size: int = 64, conv_dim: int = 64, *, attention: str = "fused",
                 image_conditioned: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.imsize = image_size
        self.input_channel, self.image_conditioned = input_channel, image_conditioned
        # Built in the official order (same random draws), but registered l4 first as the official
        # module does: parameters() and state_dict() then list them in its order, so an official D
        # optimiser's state, matched by position, lands on the same parameters.
        l1 = _sn_conv_block(input_channel, conv_dim)
        l2 = _sn_conv_block(conv_dim, conv_dim * 2)
        l3 = _sn_conv_block(conv_dim * 2, conv_dim * 4)
        self.l4 = _sn_conv_block(conv_dim * 4, conv_dim * 8)
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.last = nn.Sequential(nn.Conv2d(conv_dim * 8, 1, 4))
        self.attn1 = SelfAttention(conv_dim * 4, "relu", attention=attention, backend=backend)
        self.attn2 = SelfAttention(conv_dim * 8, "relu", attention=attention, backend=backend)
        if not image_conditioned:
            self.preprocess_additional = _preprocess(preprocess_GAN_mode, input_channel)

    def set_attention(self, attention: str) -> "Discriminator":
        """Switch both attention blocks between "fused" and "naive" (same weights)."""
        check_choice("attention", attention, ATTENTION_MODES)
        self.attn1.attention = self.attn2.attention = attention
        return self

    def check_input(self, x, image: Optional[torch.Tensor] = None, name: str = "x") -> None:
        """Score maps `x` (B, K, H, W) this discriminator was built for, checked before any layer runs
        (else the errors come from BatchNorm or attention): float, a non-empty batch, K =
        input_channel (input_channel minus the image's channels when image-conditioned), on the
        discriminator's device. `name` is the argument named in the error."""
        device = self.last[0].weight.device
        channels = self.input_channel
        if self.image_conditioned:
            check_float_tensor(name, x, 4, "(B, K, H, W)")
            if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != x.shape[0]:
                raise ValueError("the image-conditioned discriminator needs image (B, 3, H_img, W_img) with the "
                                 f"batch of {name} {tuple(x.shape)}, got "
                                 f"{tuple(image.shape) if isinstance(image, torch.Tensor) else image!r}")
            check_device("image", image, device)
            channels -= image.shape[1]
        check_score_maps(name, x, channels, device)

    def prepare(self, x: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The critic's input from score maps (B, K, H, W): preprocess, or cat(image, softmax(x))."""
        self.check_input(x, image)
        if not self.image_conditioned:
            return self.preprocess_additional(x)
        resized = F.interpolate(image.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([resized, torch.softmax(x, dim=1)], dim=1)

    def critic(self, x: torch.Tensor, return_attention: bool = False) -> list:
        """The network after `prepare`: (B, input_channel, H, W) -> [out, attn1 map, attn2 map]."""
        check_score_maps("the discriminator's input", x, self.input_channel, self.last[0].weight.device)
        if min(x.shape[-2:]) < 64:
            raise ValueError(f"the discriminator needs inputs of at least 64x64, got {tuple(x.shape[-2:])}")
        out = self.l3(self.l2(self.l1(x)))
        out, p1 = self.attn1(out, return_attention)
        out = self.l4(out)
        out, p2 = self.attn2(out, return_attention)
        return [self.last(out), p1, p2]

    def forward(self, x: torch.Tensor, image: Optional[torch.Tensor] = None, *,
                return_attention: bool = False) -> list:
        return self.critic(self.prepare(x, image), return_attention)
