"""Builds and loads the C++/CUDA extension at first use.

The build lands in torch's extensions directory (TORCH_EXTENSIONS_DIR when set), in a folder named
after the extension, and later processes import it from there. The extension name carries a digest
of the sources and of the torch/Python versions, so a change to any file, header included, gives a
fresh build instead of a stale one.

First use must never hang, whoever died before us. A file lock (flock, released by the OS when its
process dies) makes processes that start at once build exactly once; a process that has to wait for
it says so. The build itself runs in a private folder that is renamed into place only once it is
complete (see `_build`), so a build killed halfway leaves nothing that a later process waits on or
mistakes for a finished one. Compiling is announced on stderr, with its usual duration, because it
takes minutes.

When the compiler, ninja or nvcc is missing or the build fails, `load_extension` warns once,
naming the cause, and returns None; the ops then run the PyTorch reference.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

_loaded: dict[str, object] = {}

# Rough wall times of a first build with 2 cores, shown so that a silent minute is expected: the cpu
# build is about 3 CPU-minutes of g++; the cuda one adds nvcc, not timed here, hence no figure.
_USUAL_BUILD_TIME = {"cpu": "1-3 min", "cuda": "several minutes"}
_LIBRARY_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # as torch.utils.cpp_extension names it


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
    """Why the `kind` ("cpu" or "cuda") extension cannot be built here, or None if the tools are there.

    Asked once per kind and process: the ninja check starts a subprocess (milliseconds), too slow for
    every op call, and the tools do not come and go while a job runs.
    """
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
def _build_lock(root: Path, name: str):
    """Holds the build lock of `name`; yields True, or False where there is no flock (Windows)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: builds may race; each one is whole, the first rename wins
        yield False
        return
    with open(root / f"{name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"skd_kernels: waiting for another process to finish building {name} "
                  f"(lock: {root / (name + '.lock')})...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import_built(name: str, folder: Path):
    """The module built into `folder`, or None if there is none there or it does not load."""
    library = folder / f"{name}{_LIBRARY_SUFFIX}"
    if not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:  # e.g. truncated by a build killed during the link, from an older loader
        return None
    return module


def _build(kind: str, name: str, root: Path, locked: bool):
    """Compiles `name` and moves it to root/name; the caller holds the build lock (if `locked`).

    Why a private folder rather than building in place: a builder killed by SIGKILL or SIGTERM runs
    no cleanup, so torch's baton file (`lock`, which `cpp_extension.load` waits on without limit)
    stays behind, and its orphaned ninja and compilers may go on writing objects for a while. Under
    our lock, whatever is in the private folder is such a leftover: it is deleted, never waited on
    nor mixed into the new build. The final folder appears by one rename, complete, so its library
    existing means the build finished. The price: a killed build restarts from scratch.
    """
    from torch.utils import cpp_extension

    final = root / name
    # A fixed name under the lock, not one per attempt: torch renames the module (name_v1) when one
    # process builds it in a second folder.
    if locked:
        private = root / f"{name}.building"
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir()  # torch creates its baton file before the folder
    else:  # no lock: concurrent builders each need their own folder
        private = Path(tempfile.mkdtemp(prefix=f"{name}.building-", dir=root))
    print(f"skd_kernels: compiling the {kind} kernels (first use; usually {_USUAL_BUILD_TIME[kind]} "
          f"on 2 cores, cached afterwards in {final})...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(f) for f in sources(kind)],
            extra_include_paths=[str(csrc_dir())],
            build_directory=str(private),
            verbose=os.environ.get("SKD_VERBOSE_BUILD", "0") not in ("", "0"),
            **_flags(kind),
        )
        # What is at `final` has no library or one that does not load (an interrupted build by an
        # older loader): replace it. The module is loaded already, so a failed move costs this
        # process nothing; the next one builds again.
        shutil.rmtree(final, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.replace(private, final)
    finally:
        shutil.rmtree(private, ignore_errors=True)  # a failed build's, or one that could not move
    print(f"skd_kernels: compiled the {kind} kernels in {time.perf_counter() - start:.0f} s.",
          file=sys.stderr, flush=True)
    return module


def _load_or_build(kind: str):
    """The module for `kind`, or a string saying why there is none."""
    name = _extension_name(kind)
    root = _extensions_root()
    module = _import_built(name, root / name)  # the common case: no lock, no tools, no subprocess
    if module is not None:
        return module
    with _build_lock(root, name) as locked:
        module = _import_built(name, root / name)  # built by the process we waited for
        if module is not None:
            return module
        cause = missing_tool(kind)
        if cause is not None:
            return cause
        try:
            return _build(kind, name, root, locked)
        except Exception as error:  # a failed build must never take the user's job down
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            return f"the build failed: {' | '.join(lines[-3:]) or type(error).__name__}"


def load_extension(kind: str):
    """The compiled module for `kind` ("cpu" or "cuda"), building it on first use; None (after one
    warning) if it cannot be built here."""
    if kind in _loaded:
        return _loaded[kind]
    module = _load_or_build(kind)
    if isinstance(module, str):
        warnings.warn(
            f"skd_kernels: the {kind} backend is unavailable because {module}; "
            "falling back to the PyTorch reference (slower, same results). "
            "Set SKD_VERBOSE_BUILD=1 to see the full build log.",
            RuntimeWarning,
            stacklevel=3,
        )
        module = None
    _loaded[kind] = module
    return module
