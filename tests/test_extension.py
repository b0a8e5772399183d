"""The JIT extension: built at first use, once, by concurrent processes; a clear warning and the
reference when it cannot be built; every CUDA source compiles with nvcc."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from skd_kernels import _extension

from conftest import REPO, run_python

FIRST_USE = """
import warnings, torch, skd_kernels as sk
from skd_kernels.reference import pixelwise_official
warnings.simplefilter("error")  # a fallback warning would fail this process
s, t = torch.randn(2, 19, 8, 8), torch.randn(2, 19, 8, 8)
assert torch.allclose(sk.pixelwise_distill_loss(s, t, backend="cpu"), pixelwise_official(s, t), rtol=1e-5)
from skd_kernels import _extension; assert _extension._loaded["cpu"] is not None
print("ok")
"""


def test_two_processes_using_the_library_first_at_once_both_work(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", FIRST_USE], cwd=REPO, env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0 and out.strip() == "ok", err[-3000:]
    builds = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(builds) == 1 and list(builds[0].glob("*.so")), builds  # built once, shared


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


def test_missing_ninja_is_named_in_the_warning(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(_extension, "_loaded", {})  # a fresh cache, and the real one back afterwards
    with pytest.warns(RuntimeWarning, match="ninja was not found"):
        assert _extension.load_extension("cpu") is None


def test_failed_build_warns_with_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(_extension, "sources", lambda kind: [broken])
    monkeypatch.setattr(_extension, "_loaded", {})
    with pytest.warns(RuntimeWarning, match="the build failed"):
        assert _extension.load_extension("cpu") is None


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
