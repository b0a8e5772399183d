"""Which backend runs an op.

`torch` (the plain reference) runs anywhere; `cpu` (C++/OpenMP) takes CPU tensors; `cuda` (CUDA C++)
and `triton` take CUDA tensors, and `triton` also takes CPU tensors under TRITON_INTERPRET=1.
Resolution: the call's `backend=` argument, else the SKD_BACKEND environment variable, else
`auto` (the fastest compiled backend for the tensors' device).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _serves(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can serve tensors on `device` here (compiled ones may still fall back to
    `torch` at first use if their build fails; that is warned about then)."""
    device_type = torch.device(device).type
    names = [b for b in BACKENDS if _serves(b, device_type)]
    return [b for b in names if b != "triton" or triton_available()]


def _constant_to_torch_compile(fn):
    # torch.compiler.assume_constant_result sets just this mark, but importing it pulls in
    # torch._dynamo (0.8 s) at `import skd_kernels`. Marked, Dynamo calls the function at trace time
    # instead of tracing into it, which matters on first use, when it builds the extension.
    fn._dynamo_marked_constant = True
    return fn


# `auto` on a GPU: the first of these that is there. Triton by default; an op whose CUDA kernels
# measured faster passes ("cuda", "triton").
GPU_PREFERENCE = ("triton", "cuda")


@_constant_to_torch_compile
def resolve_backend(device_type: str, requested: str | None = None, gpu_preference: tuple = GPU_PREFERENCE) -> str:
    """The backend that will run an op on `device_type` tensors, or a ValueError saying why none can.

    A compiled backend (`cpu`, `cuda`) is built here at first use; if that fails the loader has
    warned once, naming the cause, and the answer is `torch` (or, for `auto` on a GPU, the next of
    `gpu_preference`). Constant to torch.compile.
    """
    name = _requested_backend(device_type, requested)
    if name == "auto-gpu":
        return _first_gpu_backend(gpu_preference)
    if name in ("cpu", "cuda"):
        from ._extension import load_extension

        if load_extension(name) is None:
            return "torch"
    return name


def _first_gpu_backend(preference: tuple) -> str:
    from ._extension import load_extension, missing_tool

    for name in preference:
        if name == "triton" and triton_available():
            return name
        # Without the tools there is nothing to build: skip silently; a failed build warns.
        if name == "cuda" and missing_tool("cuda") is None and load_extension("cuda") is not None:
            return name
    return "torch"


def _requested_backend(device_type: str, requested: str | None) -> str:
    source = "backend="
    if requested is None:
        requested, source = os.environ.get("SKD_BACKEND") or "auto", "SKD_BACKEND="
    if requested == "auto":
        if device_type == "cuda":
            return "auto-gpu"
        return "cpu" if device_type == "cpu" else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"{source}{requested!r} is not a backend; choose from auto, {', '.join(BACKENDS)}")
    if not _serves(requested, device_type):
        hint = " (Triton runs CPU tensors only with TRITON_INTERPRET=1)" if requested == "triton" else ""
        raise ValueError(
            f"{source}{requested!r} cannot run on {device_type} tensors{hint}; "
            f"backends for {device_type}: {', '.join(available_backends(device_type))}")
    if requested == "triton" and not triton_available():
        raise ValueError(f"{source}'triton' was asked for but Triton is not installed")
    return requested
