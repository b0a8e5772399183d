"""Backend choice: by device, by SKD_BACKEND, by backend=; clear errors; fallback to the reference."""
import pytest
import torch

import skd_kernels as sk
from skd_kernels import _extension
from skd_kernels.backends import resolve_backend
from skd_kernels.reference import pixelwise_official


def test_auto_picks_the_cpu_kernels_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    assert resolve_backend("cpu") == "cpu"


def test_environment_variable_chooses_and_the_argument_overrides_it(monkeypatch):
    monkeypatch.setenv("SKD_BACKEND", "torch")
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend("cpu", "cpu") == "cpu"


@pytest.mark.parametrize("cuda_builds", [True, False], ids=["cuda_builds", "no_nvcc"])
@pytest.mark.parametrize("has_triton", [True, False], ids=["triton", "no_triton"])
def test_auto_on_a_gpu_takes_the_first_preferred_backend_that_is_there(cuda_builds, has_triton, monkeypatch):
    from skd_kernels import backends

    monkeypatch.delenv("SKD_BACKEND", raising=False)
    monkeypatch.setattr(backends, "triton_available", lambda: has_triton)
    monkeypatch.setattr(_extension, "missing_tool", lambda kind: None if cuda_builds else "nvcc was not found")
    monkeypatch.setattr(_extension, "load_extension", lambda kind: object() if cuda_builds else None)
    fallback = "triton" if has_triton else "torch"
    assert resolve_backend("cuda", "auto", ("cuda", "triton")) == ("cuda" if cuda_builds else fallback)
    assert resolve_backend("cuda", "auto", ("triton", "cuda")) == ("triton" if has_triton else
                                                                   "cuda" if cuda_builds else "torch")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_on_cpu_tensors_is_a_clear_error(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run on cpu tensors"):
        sk.pixelwise_distill_loss(s, s, backend=backend)


def test_cpu_backend_on_a_cuda_device_is_a_clear_error():
    with pytest.raises(ValueError, match="'cpu' cannot run on cuda tensors"):
        resolve_backend("cuda", "cpu")


def test_environment_variable_naming_an_impossible_backend_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("SKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SKD_BACKEND='cuda' cannot run on cpu tensors"):
        resolve_backend("cpu")


def test_available_backends_lists_cpu_and_torch_here():
    assert {"cpu", "torch"} <= set(sk.available_backends("cpu"))
    assert "cuda" not in sk.available_backends("cpu")


def test_unbuildable_extension_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setitem(_extension._loaded, "cpu", None)  # as after a failed build
    assert resolve_backend("cpu", "cpu") == "torch"
    s, t = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    assert torch.allclose(sk.pixelwise_distill_loss(s, t, backend="cpu"), pixelwise_official(s, t))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_a_gpu_runs_the_cuda_kernels_of_the_distillation_losses(monkeypatch):
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    assert _extension.load_extension("cuda") is not None, "the CUDA extension must build on a GPU machine"
    from skd_kernels.ops import pairwise, pixelwise

    for ops in (pairwise, pixelwise):
        assert resolve_backend("cuda", None, ops._GPU_PREFERENCE) == "cuda"
    from skd_kernels.backends import triton_available

    assert resolve_backend("cuda") == ("triton" if triton_available() else "cuda")  # the default preference
