"""skd-kernels: fused losses of Structured Knowledge Distillation for semantic segmentation.

Importing compiles nothing: C++/CUDA kernels build at first use, Triton is imported when used.
"""
from . import reference
from .backends import BACKENDS, available_backends
from .discriminator import Discriminator, SelfAttention, SpectralNorm
from .holistic import (CriterionAdditionalGP, CriterionAdv, CriterionAdvForG, HolisticDistillLoss,
                       adversarial_d_loss, adversarial_g_loss, gradient_penalty)
from .modules import CriterionPixelWise, PixelWiseDistillLoss
from .ops.attention import fused_attention
from .ops.pixelwise import pixelwise_distill_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CriterionAdditionalGP",
    "CriterionAdv",
    "CriterionAdvForG",
    "CriterionPixelWise",
    "Discriminator",
    "HolisticDistillLoss",
    "PixelWiseDistillLoss",
    "SelfAttention",
    "SpectralNorm",
    "adversarial_d_loss",
    "adversarial_g_loss",
    "available_backends",
    "fused_attention",
    "gradient_penalty",
    "pixelwise_distill_loss",
    "reference",
]
