"""What every Triton launcher shares."""
from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU, whatever the current one is (a no-op on CPU, the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
