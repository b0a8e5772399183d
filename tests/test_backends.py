"""Backend choice: by op and device, by SKD_BACKEND, by backend=; made once; clear errors; fallback."""
import subprocess

import pytest
import torch

import skd_kernels as sk
from skd_kernels import _extension, backends
from skd_kernels.backends import ONE_TILE, REFERENCE, passes, resolve
from skd_kernels.reference import pixelwise_official

OPS = tuple(backends.AUTO_PREFERENCE)


@pytest.mark.parametrize("op", OPS)
def test_auto_picks_the_cpu_kernels_for_cpu_tensors(op, monkeypatch):
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    assert resolve(op, "cpu", size=4096) == "cpu"


def test_environment_variable_chooses_and_the_argument_overrides_it(monkeypatch):
    monkeypatch.setenv("SKD_BACKEND", "torch")
    assert resolve("pixelwise", "cpu") == "torch"
    assert resolve("pixelwise", "cpu", "cpu") == "cpu"


def _gpu_tools(monkeypatch, cuda_builds: bool, has_triton: bool):
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    monkeypatch.setattr(backends, "triton_available", lambda: has_triton)
    monkeypatch.setattr(_extension, "missing_tool", lambda kind: None if cuda_builds else "nvcc was not found")
    monkeypatch.setattr(_extension, "load_extension", lambda kind: object() if cuda_builds else None)


@pytest.mark.parametrize("cuda_builds", [True, False], ids=["cuda_builds", "no_nvcc"])
@pytest.mark.parametrize("has_triton", [True, False], ids=["triton", "no_triton"])
def test_auto_on_a_gpu_takes_each_ops_first_preferred_backend_that_is_there(cuda_builds, has_triton, monkeypatch):
    _gpu_tools(monkeypatch, cuda_builds, has_triton)
    cuda_first = "cuda" if cuda_builds else "triton" if has_triton else "torch"
    assert backends.AUTO_PREFERENCE["pixelwise"]["cuda"][0] == "cuda"
    assert resolve("pixelwise", "cuda") == cuda_first
    assert resolve("pairwise", "cuda") == cuda_first
    # attention has no CUDA C++ kernels: Triton's, else the stock passes, whether nvcc is there or not
    assert resolve("attention", "cuda", size=4096) == ("triton" if has_triton else "torch")


def test_a_second_choice_starts_no_process_and_reads_no_environment(monkeypatch):
    """Backend choice is made once per (op, device, request): later calls cost a dictionary lookup."""
    _gpu_tools(monkeypatch, cuda_builds=True, has_triton=True)
    first = resolve("pixelwise", "cuda"), resolve("pairwise", "cpu"), resolve("attention", "cpu", size=4096)

    def forbidden(*args, **kwargs):
        raise AssertionError("the backend choice started a process or re-decided")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(backends, "_choose", forbidden)
    monkeypatch.setattr(backends.os, "environ", {})  # an environment read would now see nothing
    assert (resolve("pixelwise", "cuda"), resolve("pairwise", "cpu"), resolve("attention", "cpu", size=4096)) == first


def test_a_second_loss_call_starts_no_process(monkeypatch):
    s, t = torch.randn(2, 5, 3, 3, requires_grad=True), torch.randn(2, 5, 3, 3)
    sk.pixelwise_distill_loss(s, t).backward()
    sk.pairwise_distill_loss(s, t, node_size=2).backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("a loss call started a process")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    sk.pixelwise_distill_loss(s, t).backward()
    sk.pairwise_distill_loss(s, t, node_size=2).backward()


@pytest.mark.parametrize("requested", [None, "auto"])
def test_one_tile_rule_runs_the_reference_only_for_auto(requested, monkeypatch):
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    assert resolve("attention", "cpu", requested, size=ONE_TILE["attention"]) == REFERENCE
    assert resolve("attention", "cpu", requested, size=ONE_TILE["attention"] + 1) == "cpu"
    assert resolve("attention", "cpu", "cpu", size=16) == "cpu"
    assert resolve("pixelwise", "cpu", requested, size=1) == "cpu"  # no one-tile rule there


def test_every_backend_offers_each_ops_whole_pass_api():
    for op, names in backends.PASS_API.items():
        for backend in ("torch", "cpu"):
            table = passes(op, backend)
            assert all(callable(getattr(table, name)) for name in names), (op, backend)


def test_attention_passes_are_tritons_own_and_the_cuda_backend_borrows_the_stock_ones(monkeypatch):
    pytest.importorskip("triton")
    from skd_kernels.pytorch import attention as stock
    from skd_kernels.triton import attention as triton_attention

    triton_table = passes("attention", "triton")
    monkeypatch.setattr(_extension, "load_extension", lambda kind: object())  # cuda needs no kernel of its own
    cuda_table = passes.__wrapped__("attention", "cuda")  # uncached: the stand-in module must not stay
    for name in backends.PASS_API["attention"]:
        assert getattr(triton_table, name) is getattr(triton_attention, name), name
        assert getattr(cuda_table, name) is getattr(stock, name), name


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_on_cpu_tensors_is_a_clear_error(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run on cpu tensors"):
        sk.pixelwise_distill_loss(s, s, backend=backend)


def test_cpu_backend_on_a_cuda_device_is_a_clear_error():
    with pytest.raises(ValueError, match="'cpu' cannot run on cuda tensors"):
        resolve("pixelwise", "cuda", "cpu")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="'fast' is not a backend; choose from auto, torch, cpu, cuda, triton"):
        resolve("pairwise", "cpu", "fast")


def test_environment_variable_naming_an_impossible_backend_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("SKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SKD_BACKEND='cuda' cannot run on cpu tensors"):
        resolve("pixelwise", "cpu")


def test_available_backends_lists_cpu_and_torch_here():
    assert {"cpu", "torch"} <= set(sk.available_backends("cpu"))
    assert "cuda" not in sk.available_backends("cpu")


def test_unbuildable_extension_falls_back_to_the_torch_backend(monkeypatch):
    monkeypatch.setitem(_extension._loaded, "cpu", None)  # as after a failed build
    assert resolve("pixelwise", "cpu", "cpu") == "torch"
    assert resolve("pixelwise", "cpu") == "torch"
    s, t = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    assert torch.allclose(sk.pixelwise_distill_loss(s, t, backend="cpu"), pixelwise_official(s, t))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_a_gpu_runs_the_cuda_kernels_of_the_distillation_losses(monkeypatch):
    monkeypatch.delenv("SKD_BACKEND", raising=False)
    assert _extension.load_extension("cuda") is not None, "the CUDA extension must build on a GPU machine"
    assert resolve("pixelwise", "cuda") == "cuda"
    assert resolve("pairwise", "cuda") == "cuda"
    expected = "triton" if backends.triton_available() else "cuda"
    assert resolve("attention", "cuda", size=4096) == expected
