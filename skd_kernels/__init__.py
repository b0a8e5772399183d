"""skd-kernels: fused losses of Structured Knowledge Distillation for semantic segmentation.

Importing compiles nothing: C++/CUDA kernels build at first use, Triton is imported when used.
"""
from . import reference
from .backends import BACKENDS, available_backends
from .discriminator import Discriminator, SelfAttention, SpectralNorm
from .holistic import (CriterionAdditionalGP, CriterionAdv, CriterionAdvForG, HolisticDistillLoss,
                       adversarial_d_loss, adversarial_g_loss, gradient_penalty)
from .modules import (CriterionPairWiseforWholeFeatAfterPool, CriterionPixelWise, PairWiseDistillLoss,
                      PixelWiseDistillLoss)
from .ops.attention import fused_attention
from .ops.pairwise import pairwise_distill_loss
from .ops.pixelwise import pixelwise_distill_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CriterionAdditionalGP",
    "CriterionAdv",
    "CriterionAdvForG",
    "CriterionPairWiseforWholeFeatAfterPool",
    "CriterionPixelWise",
    "Discriminator",
    "HolisticDistillLoss",
    "PairWiseDistillLoss",
    "PixelWiseDistillLoss",
    "SelfAttention",
    "SpectralNorm",
    "adversarial_d_loss",
    "adversarial_g_loss",
    "available_backends",
    "fused_attention",
    "gradient_penalty",
    "pairwise_distill_loss",
    "pixelwise_distill_loss",
    "reference",
]
