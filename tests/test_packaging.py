"""Packaging: setup.py needs no torch; the wheel carries the C++/CUDA sources."""
import os
import subprocess
import sys
import zipfile

from conftest import REPO


def test_setup_py_runs_where_torch_cannot_be_imported(tmp_path):
    shim = tmp_path / "torch"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('setup.py must not import torch')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "skd-kernels"


def test_wheel_ships_the_sources_compiled_at_first_use(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in ("skd_kernels/csrc/bindings.cpp", "skd_kernels/csrc/bindings/pixelwise_binding.cpp",
                   "skd_kernels/csrc/cpu/pixelwise.cpp",
                   "skd_kernels/csrc/cpu/numeric.h", "skd_kernels/csrc/cuda/pixelwise.cu", "skd_kernels/csrc/cuda/numeric.cuh",
                   "skd_kernels/csrc/common/pixelwise_problem.h", "skd_kernels/triton/pixelwise.py"):
        assert source in names, source
    assert not any(name.endswith(".so") for name in names)
