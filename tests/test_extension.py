"""The JIT extension: built at first use, once, by concurrent processes, announced while it compiles,
never hung by a builder that was killed; cheap once loaded; a clear warning and the reference when it
cannot be built; every CUDA source compiles with nvcc."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from skd_kernels import _extension

from conftest import REPO, run_python

FIRST_USE = """
import warnings, torch, skd_kernels as sk
from skd_kernels.reference import pixelwise_official
warnings.simplefilter("error")  # a fallback warning would fail this process
s, t = torch.randn(2, 19, 8, 8, dtype=torch.float64), torch.randn(2, 19, 8, 8, dtype=torch.float64)
assert torch.allclose(sk.pixelwise_distill_loss(s.float(), t.float(), backend="cpu").double(),
                      pixelwise_official(s, t), rtol=1e-5)
from skd_kernels import _extension; assert _extension._loaded["cpu"] is not None
print("ok")
"""
# The same, where no process may start: a cached build needs neither the compiler nor ninja.
CACHED_USE = FIRST_USE.replace("warnings.simplefilter", """
import subprocess
def no_subprocess(*args, **kwargs): raise AssertionError(f"a subprocess was started: {args}")
subprocess.Popen = subprocess.run = no_subprocess
warnings.simplefilter""", 1)
BUILD_TIMEOUT_S = 1500  # a build takes minutes on a loaded 2-core machine; fail rather than hang
COMPILING = "skd_kernels: compiling the cpu kernels"


def start(code: str, extensions_dir, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True, **kwargs)


@pytest.fixture(scope="module")
def concurrent_first_use(tmp_path_factory):
    """Two processes that use the cpu backend at once on an empty extensions folder: the folder, and
    each process's (return code, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("extensions")
    processes = [start(FIRST_USE, folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=BUILD_TIMEOUT_S) for p in processes]
    return folder, [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def test_two_processes_using_the_library_first_at_once_both_work(concurrent_first_use):
    folder, results = concurrent_first_use
    for returncode, out, err in results:
        assert returncode == 0 and out.strip() == "ok", err[-3000:]
    builds = [p for p in folder.iterdir() if p.is_dir()]
    assert len(builds) == 1 and list(builds[0].glob("*.so")), builds  # built once, shared


def test_first_use_says_once_that_it_compiles_and_the_other_process_that_it_waits(concurrent_first_use):
    _, results = concurrent_first_use
    errs = sorted((err for _, _, err in results), key=lambda err: COMPILING not in err)
    builder, waiter = errs
    assert builder.count(COMPILING) == 1 and "first use; usually" in builder, builder[-3000:]
    assert "skd_kernels: compiled the cpu kernels in" in builder, builder[-3000:]
    assert COMPILING not in waiter and "waiting for another process to finish building" in waiter, waiter


def test_a_cached_build_loads_silently_without_starting_any_process(concurrent_first_use):
    folder, _ = concurrent_first_use
    result = run_python(CACHED_USE, env={"TORCH_EXTENSIONS_DIR": str(folder)}, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert "skd_kernels:" not in result.stderr, result.stderr


def test_loaded_extension_and_tool_check_start_no_process_the_second_time(concurrent_first_use, monkeypatch):
    folder, _ = concurrent_first_use
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(folder))
    monkeypatch.setattr(_extension, "_loaded", {})
    _extension.missing_tool.cache_clear()
    first_module, first_answer = _extension.load_extension("cpu"), _extension.missing_tool("cpu")
    assert first_module is not None and first_answer is None

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert _extension.load_extension("cpu") is first_module
    assert _extension.missing_tool("cpu") is first_answer


def kill_during_build(signal_number: int, extensions_dir, log) -> None:
    """Start first use (stderr into the file `log`), and kill its Python process with `signal_number`
    once it compiles."""
    started = time.time()
    with open(log, "w") as stderr:
        process = start(FIRST_USE, extensions_dir, stdout=subprocess.DEVNULL, stderr=stderr,
                        start_new_session=True)
    try:
        deadline = started + 300
        while time.time() < deadline and process.poll() is None:
            ninja_files = list(extensions_dir.rglob("build.ninja"))
            if COMPILING in log.read_text() and any(f.stat().st_mtime >= started for f in ninja_files):
                break
            time.sleep(0.2)
        assert process.poll() is None, f"the build ended before it could be killed: {log.read_text()[-3000:]}"
        time.sleep(2)  # let ninja start the compilers
        process.send_signal(signal_number)
        process.wait(timeout=60)
    finally:
        # The orphaned compilers would only slow the next build down: it does not need them gone (it
        # deletes the folder they write to), but the machine's cores are better spent on it.
        kill_session(process.pid)
        process.wait(timeout=60)


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session: ninja gives each compiler its own process group."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == session_id:
                    os.kill(int(entry.name), signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="kills a build with POSIX signals, finds its processes in /proc")
def test_a_build_killed_by_sigterm_then_sigkill_leaves_nothing_that_hangs_the_next_one(tmp_path):
    extensions = tmp_path / "extensions"
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        kill_during_build(signal_number, extensions, tmp_path / f"killed_by_{signal_number}.log")
    # What a killed build leaves, including torch's baton file that cpp_extension.load waits on.
    assert [p for p in extensions.rglob("lock") if p.parent.name.endswith(".building")], list(extensions.rglob("*"))
    result = run_python(FIRST_USE, env={"TORCH_EXTENSIONS_DIR": str(extensions)}, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert result.stderr.count(COMPILING) == 1, result.stderr  # the killed builds were not taken as done
    assert "waiting for another process" not in result.stderr, result.stderr
    assert [p.name for p in extensions.iterdir() if p.is_dir()] == [_extension._extension_name("cpu")]


def test_import_compiles_nothing_and_loads_no_triton_kernels(tmp_path):
    code = "import sys, skd_kernels; print('skd_kernels.triton.pixelwise' in sys.modules)"
    result = run_python(code, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert not (tmp_path / "ext").exists()


def test_missing_compiler_warns_once_naming_it_and_falls_back(tmp_path):
    code = """
import warnings, torch, skd_kernels as sk
from skd_kernels.reference import pixelwise_official
s, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        assert torch.allclose(sk.pixelwise_distill_loss(s, t, backend="cpu"), pixelwise_official(s, t))
messages = [str(w.message) for w in caught if "skd_kernels" in str(w.message)]
print(len(messages)); print(messages[0])
"""
    result = run_python(code, env={"CXX": "/nonexistent/g++", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.strip().splitlines()
    assert count == "1"
    assert "/nonexistent/g++" in message and "falling back to the PyTorch reference" in message


@pytest.fixture
def fresh_tool_check():
    """missing_tool answers once per process: forget its answers before and after the test."""
    _extension.missing_tool.cache_clear()
    yield
    _extension.missing_tool.cache_clear()


def test_missing_ninja_is_named_in_the_warning(monkeypatch, tmp_path, fresh_tool_check):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build to load instead
    monkeypatch.setattr(_extension, "_loaded", {})  # a fresh cache, and the real one back afterwards
    with pytest.warns(RuntimeWarning, match="ninja was not found"):
        assert _extension.load_extension("cpu") is None


def test_failed_build_warns_with_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(_extension, "sources", lambda kind: [broken])
    # Its own name: torch renames a module built twice in one process (name_v1), which would leave
    # the real build of this process under a name that other processes do not look for.
    monkeypatch.setattr(_extension, "_extension_name", lambda kind: "skd_kernels_broken_test")
    monkeypatch.setattr(_extension, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="the build failed"):
        assert _extension.load_extension("cpu") is None
    assert [p.name for p in (tmp_path / "ext").iterdir()] == ["skd_kernels_broken_test.lock"]  # no half build


CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    result = subprocess.run(["nvcc", "-c", "-std=c++17", "-O3", f"-I{REPO / 'csrc'}", str(source),
                             "-o", str(tmp_path / "out.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_there_are_cuda_sources_to_check():
    assert CUDA_SOURCES, "csrc/cuda/*.cu not found"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extension_builds_and_loads_on_a_gpu_machine():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.load_extension("cuda") is not None
