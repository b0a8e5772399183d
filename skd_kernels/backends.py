"""Which backend runs an op, decided once: the only module that reads a backend name.

Backends: `torch` (the op's passes in stock PyTorch ops, `skd_kernels/pytorch/`) runs anywhere;
`cpu` (C++/OpenMP) takes CPU tensors; `cuda` (CUDA C++) and `triton` take CUDA tensors, and `triton`
also takes CPU tensors under TRITON_INTERPRET=1. Every backend runs the same op and autograd; only
the passes differ.

An op asks `resolve(op, device_type, requested, size)` for a name and `passes(op, name)` for the
functions; both are cached, so after the first call per (op, device, request) the choice costs a
dictionary lookup: no subprocess, no environment read, no extension probing. The request is the
call's `backend=`, else SKD_BACKEND, else `auto` (the table below). SKD_BACKEND and TRITON_INTERPRET
are read at the first resolve; `reset()` forgets everything (tests that change them call it).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import types

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")

# `auto`: the first of these that is there, per op and device type. On a GPU the CUDA kernels of
# the distillation losses measured faster than the Triton ones (Triton's Python launch costs about
# 45 us a kernel; bench/results/historical/history.md, H100); attention is Triton's alone.
AUTO_PREFERENCE = {
    "pixelwise": {"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    "pairwise": {"cpu": ("cpu",), "cuda": ("cuda", "triton")},
    "attention": {"cpu": ("cpu",), "cuda": ("triton", "torch")},
}

# `auto` on problems of at most this size (given, not 0) prefers these backends instead: pair-wise
# distillation with at most 64 nodes (the official 3 x 3) is one fused Triton pass of two launches
# (triton/pairwise_few.py), where the CUDA backend's node passes and similarity core make about
# eleven, and at that size a loss costs its launches, not its arithmetic.
FEW_NODES = 64
SMALL_PROBLEM = {"pairwise": FEW_NODES}
SMALL_PREFERENCE = {"pairwise": {"cpu": ("cpu",), "cuda": ("triton", "cuda")}}

# `auto` on problems of at most this size runs the op's reference formula under autograd instead
# of a backend: for attention, N positions whose whole map is one tile (64 KB in float32 per image),
# where the platform's batched GEMM and softmax beat our kernels (the official discriminator's
# blocks see N = 64 and 16) and autograd differentiates it exactly to any order.
ONE_TILE = {"attention": 128}

# The answer for the one-tile rule: not a backend, the reference formula.
REFERENCE = "reference"

# Each op's pass API: the functions its op module calls, with the signatures that op module states.
PASS_API = {
    "pixelwise": ("loss_and_grad",),
    "pairwise": ("nodes_forward", "nodes_backward", "centre", "centre_pair", "keep_or_tiled", "few_nodes"),
    "attention": ("forward", "backward", "double_backward"),
}

# Passes a backend takes from the `torch` backend: the low-rank centring is fused on the CPU only;
# the pair-wise low-rank fallback and the fused few-node pass are Triton's or none (see pytorch/pairwise.py);
# the CUDA C++ backend has no attention kernels (untiled ones ran at 0.1x the naive block and were
# removed): on a GPU, attention is Triton's, or the torch passes (cuBLAS) when the cuda backend is asked for.
_BORROWED_FROM_TORCH = {
    ("attention", "cuda"): ("forward", "backward", "double_backward"),
    ("pairwise", "triton"): ("centre", "centre_pair"),
    ("pairwise", "cuda"): ("centre", "centre_pair", "keep_or_tiled", "few_nodes"),
    ("pairwise", "cpu"): ("keep_or_tiled", "few_nodes"),
}

_choices: dict[tuple, str] = {}
_environment: dict[str, str] | None = None


def reset() -> None:
    """Forget every choice and the environment read at the first resolve."""
    global _environment
    _choices.clear()
    _environment = None
    passes.cache_clear()


def _env(name: str) -> str:
    global _environment
    if _environment is None:
        _environment = {key: os.environ.get(key, "") for key in ("SKD_BACKEND", "TRITON_INTERPRET")}
    return _environment[name]


def triton_interpreting() -> bool:
    return _env("TRITON_INTERPRET") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _serves(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend in ("cpu", "cuda"):
        return device_type == backend
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can serve tensors on `device` here (compiled ones may still fall back to
    `torch` at first use if their build fails; that is warned about then)."""
    device_type = torch.device(device).type
    return [b for b in BACKENDS if _serves(b, device_type) and (b != "triton" or triton_available())]


def _constant_to_torch_compile(fn):
    # torch.compiler.assume_constant_result sets just this mark, but importing it pulls in
    # torch._dynamo (0.8 s) at `import skd_kernels`. Marked, Dynamo calls the function at trace time
    # instead of tracing into it, which matters on first use, when it builds the extension.
    fn._dynamo_marked_constant = True
    return fn


@_constant_to_torch_compile
def resolve(op: str, device_type: str, requested: str | None = None, size: int = 0) -> str:
    """The backend that runs `op` on `device_type` tensors, or REFERENCE (the one-tile rule), or a
    ValueError saying why none can. `size`: the problem size ONE_TILE and SMALL_PROBLEM compare
    (attention: N; pairwise: M nodes, 0 when not given).

    A compiled backend (`cpu`, `cuda`) is built here at first use; if that fails the loader has
    warned once, naming the cause, and the answer is `torch` (or, for `auto` on a GPU, the next
    preferred backend). Cached; constant to torch.compile.
    """
    one_tile = size <= ONE_TILE.get(op, -1)
    small = 0 < size <= SMALL_PROBLEM.get(op, -1)
    key = (op, device_type, requested, one_tile, small)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _choose(op, device_type, requested, one_tile, small)
    return choice


def _choose(op: str, device_type: str, requested: str | None, one_tile: bool, small: bool = False) -> str:
    source = "backend="
    if requested is None:
        requested, source = _env("SKD_BACKEND") or "auto", "SKD_BACKEND="
    if requested == "auto":
        if one_tile:
            return REFERENCE
        preference = SMALL_PREFERENCE[op] if small else AUTO_PREFERENCE[op]
        return _first_buildable(preference.get(device_type, ()))
    _check_request(requested, source, device_type)
    if requested in ("cpu", "cuda") and _extension_module(requested) is None:
        return "torch"
    return requested


def _check_request(requested: str, source: str, device_type: str) -> None:
    if requested not in BACKENDS:
        raise ValueError(f"{source}{requested!r} is not a backend; choose from auto, {', '.join(BACKENDS)}")
    if not _serves(requested, device_type):
        hint = " (Triton runs CPU tensors only with TRITON_INTERPRET=1)" if requested == "triton" else ""
        raise ValueError(
            f"{source}{requested!r} cannot run on {device_type} tensors{hint}; "
            f"backends for {device_type}: {', '.join(available_backends(device_type))}")
    if requested == "triton" and not triton_available():
        raise ValueError(f"{source}'triton' was asked for but Triton is not installed")


def _first_buildable(preference: tuple) -> str:
    for name in preference:
        if name == "triton" and triton_available():
            return name
        if name in ("cpu", "cuda") and _buildable(name) and _extension_module(name) is not None:
            return name
    return "torch"


def _buildable(kind: str) -> bool:
    # For `auto`, no tools means nothing to build: skip silently (a failed build does warn).
    from ._extension import missing_tool

    return kind == "cpu" or missing_tool(kind) is None


def _extension_module(kind: str):
    from ._extension import load_extension

    return load_extension(kind)


@functools.lru_cache(maxsize=None)
def passes(op: str, backend: str) -> types.SimpleNamespace:
    """The pass functions of `op` on `backend` (PASS_API), loaded once."""
    if backend in ("torch", "triton"):
        package = "pytorch" if backend == "torch" else "triton"
        source = importlib.import_module(f"{__package__}.{package}.{op}")
    else:
        module = _extension_module(backend)
        if module is None:
            raise RuntimeError(f"skd_kernels: the {backend} backend could not be built (see the warning above)")
        from . import compiled

        source = compiled.PASSES[op](module, backend)
    borrowed = _BORROWED_FROM_TORCH.get((op, backend), ())
    table = {name: getattr(passes(op, "torch") if name in borrowed else source, name) for name in PASS_API[op]}
    return types.SimpleNamespace(**table)
