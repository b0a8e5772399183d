"""Builds and loads the C++/CUDA extension at first use.

`torch.utils.cpp_extension.load` compiles with ninja into torch's extensions directory
(TORCH_EXTENSIONS_DIR when set) and later processes reuse the build. The extension name carries a
digest of the sources and of the torch/Python versions, so a change to any file, header included,
gives a fresh build instead of a stale one. A file lock (flock, released by the OS if a process
dies, unlike torch's own baton file) lets processes that start at once build it exactly once.

When the compiler, ninja or nvcc is missing or the build fails, `load_extension` warns once,
naming the cause, and returns None; the ops then run the PyTorch reference.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

_loaded: dict[str, object] = {}


def csrc_dir() -> Path:
    """The C++/CUDA sources: installed inside the package, or at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"skd_kernels: C++ sources not found next to {here}")


def sources(kind: str) -> list[Path]:
    root = csrc_dir()
    files = [root / "bindings.cpp", *sorted((root / "bindings").glob("*.cpp")), *sorted((root / "cpu").glob("*.cpp"))]
    if kind == "cuda":
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def _flags(kind: str) -> dict:
    # -fno-trapping-math lets GCC turn the clamps in the exp into vector selects; NaN still propagates.
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    flags = dict(extra_cflags=cflags, extra_ldflags=["-fopenmp"], with_cuda=kind == "cuda")
    if kind == "cuda":
        flags["extra_cflags"] = cflags + ["-DSKD_WITH_CUDA"]
        flags["extra_cuda_cflags"] = ["-O3", "-DSKD_WITH_CUDA"]
    return flags


@functools.lru_cache(maxsize=None)
def missing_tool(kind: str) -> str | None:
    """Why `kind` cannot be built here, or None; asked once per process (it runs `ninja --version`)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"the C++ compiler {compiler!r} was not found (set CXX or install g++)"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found (pip install ninja)"
    if kind == "cuda":
        home = cpp_extension.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").exists():
            return "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    return None


def _extension_name(kind: str) -> str:
    # Digest of every file under csrc/, headers included: torch's own versioning hashes sources only.
    digest = hashlib.sha256()
    # The sources' directory too: ninja files hold absolute paths, so two checkouts with identical
    # sources sharing a build folder would keep rebuilding each other's.
    digest.update(f"{torch.__version__} {sys.version_info[:2]} {_flags(kind)} {csrc_dir()}".encode())
    for path in sorted(csrc_dir().rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return f"skd_kernels_{kind}_{digest.hexdigest()[:12]}"


def _extensions_root() -> Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root)


@contextlib.contextmanager
def _build_lock(name: str):
    root = _extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: rely on torch's own baton
        yield
        return
    with open(root / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(kind: str):
    from torch.utils import cpp_extension

    files = sources(kind)
    name = _extension_name(kind)
    with _build_lock(name):
        return cpp_extension.load(
            name=name,
            sources=[str(f) for f in files],
            extra_include_paths=[str(csrc_dir())],
            verbose=os.environ.get("SKD_VERBOSE_BUILD", "0") not in ("", "0"),
            **_flags(kind),
        )


def load_extension(kind: str):
    """The compiled module for `kind` ("cpu" or "cuda"), building it on first use; None (after one
    warning) if it cannot be built here."""
    if kind in _loaded:
        return _loaded[kind]
    cause = missing_tool(kind)
    module = None
    if cause is None:
        try:
            module = _build(kind)
        except Exception as error:  # a failed build must never take the user's job down
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            cause = f"the build failed: {' | '.join(lines[-3:]) or type(error).__name__}"
    if module is None:
        warnings.warn(
            f"skd_kernels: the {kind} backend is unavailable because {cause}; "
            "falling back to the PyTorch reference (slower, same results). "
            "Set SKD_VERBOSE_BUILD=1 to see the full build log.",
            RuntimeWarning,
            stacklevel=3,
        )
    _loaded[kind] = module
    return module
