"""The similarity core of pair-wise distillation, shared by every backend: given the float64 nodes
us (B, Cs, M) and ut (B, Ct, M), the loss sum_b ||Us_b^T Us_b - Ut_b^T Ut_b||_F^2 and its gradients
with respect to the nodes, by one of two exact algorithms, never building the M x M matrix:

- ``lowrank``: sum_ij (a^s - a^t)^2 = ||Us Us^T||^2 + ||Ut Ut^T||^2 - 2 ||Us Ut^T||^2 with the
  (C x C) Gram matrices; O(M C^2) work, O(C^2) memory; gradient d/dUs = 4 (Gss Us - Gst Ut);
- ``tiled``: tiles of rows D_I = A^s_I - A^t_I (R x M) formed, squared and summed, and the gradient
  D_I Us accumulated block by block; O(M^2 C) work, O(R M) memory.

Exactness. Plain Gram products cancel: the low-rank algorithm subtracts terms of size ||A||^2 ~ M^2 to
get a loss that can be 1e-9 of that (student close to teacher, post-ReLU features whose similarities
all sit near 1), and returns 0 or garbage in float32. So the low-rank core (see `lowrank.py`) centres
the nodes (the shared mean direction is handled exactly in float64 vector work) and, when Cs == Ct,
works on S = (Rs + Rt) / 2 and E = Rs - Rt, whose products' rounding errors scale with the
student-teacher difference itself. Every low-rank result comes with a statistical estimate of its
rounding error and is kept only when that is below FLOAT32_LOSS_RTOL (float32 products, CPU, for
non-float64 input; on oneDNN there, see `_onednn_float32`) or FLOAT64_LOSS_RTOL (float64); otherwise
the core retries in float64, then falls back to the tiled algorithm on float64 nodes (on a GPU
decided on the device: `keep_or_tiled`, no host sync), whose absolute
error is about 1e-16 M^2 max|a| relative to M^2 B. The nodes are float64 so that the similarities of
fp32/fp16/bf16 inputs are formed exactly. That is the guarantee the tests check, against the float64
reference.
"""
from __future__ import annotations

import torch

from .lowrank import Centring, lowrank
from .tiled import tiled


def choose_algorithm(nodes: int, student_channels: int, teacher_channels: int, want_teacher: bool) -> str:
    """The exact algorithm with fewer flops for M nodes and Cs, Ct channels."""
    m, cs, ct = nodes, student_channels, teacher_channels
    lowrank_flops = m * (cs * cs + ct * ct + cs * ct) + m * cs * (cs + ct) + (m * ct * (cs + ct) if want_teacher else 0)
    tiled_flops = m * m * (cs + ct) + m * m * cs + (m * m * ct if want_teacher else 0)
    return "tiled" if tiled_flops < lowrank_flops else "lowrank"


def similarity_core(us: torch.Tensor, ut: torch.Tensor, algorithm: str, want_s: bool, want_t: bool,
                    centring: Centring, try_float32: bool = False):
    """sum_b ||Us_b^T Us_b - Ut_b^T Ut_b||_F^2 and its gradients with respect to Us, Ut.

    us (B, Cs, M), ut (B, Ct, M): float64 nodes, one column per node. Returns (loss, NodeGrad or
    None for Us, for Ut), the loss a 0-d float64 tensor. `centring`: how the low-rank algorithm
    centres the nodes (the backend's passes). `try_float32`: run the low-rank products in float32
    first and keep them when their estimated rounding error is small.
    """
    if algorithm == "lowrank":
        # The tiled fallback serves where the low-rank algorithm cancels beyond even float64 (plain
        # expansion, Cs != Ct, student within ~1e-5 of the teacher): it subtracts the similarities
        # themselves and stays exact.
        return centring.keep_or_tiled(us, ut, want_s, want_t, lowrank(us, ut, want_s, want_t, try_float32, centring))
    return tiled(us, ut, want_s, want_t)
