"""The low-rank core's GEMMs, on oneDNN for float32 on CPU.

PyTorch's CPU bmm calls MKL, whose float32 GEMM runs AVX2 kernels on AMD processors; oneDNN's (the
matmul behind torch.ops.mkldnn._linear_pointwise, x @ w^T) picks AVX-512 by the CPU's features: 2 to
2.5x faster at the core's shapes (C x C x M and C x M x 2C). Same float32 arithmetic, so the error
estimate holds; only while float32 matmuls are set to full precision.
"""
from __future__ import annotations

import functools

import torch


def _onednn_float32(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if not _onednn_linear_works():
        return False
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"


@functools.lru_cache(maxsize=None)
def _onednn_linear_works() -> bool:
    """Whether this torch's private oneDNN linear exists, takes our arguments and computes x @ w^T:
    checked once on a small product, so that another torch version falls back to bmm, not to an error."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    x, w = torch.randn(7, 33, generator=torch.Generator().manual_seed(0)).split([3, 4])
    try:
        got = _linear(x, w)
    except (RuntimeError, TypeError):
        return False
    want = x.double() @ w.double().T
    return got.shape == want.shape and bool(torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5))


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T on oneDNN: x (N, K), w (O, K) with unit stride along K."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def stacked_gram(r: torch.Tensor, cs: int) -> torch.Tensor:
    """G = R R^T per image, (B, K, K), for the stacked residuals R (B, K, M)."""
    # G is symmetric: the leading rows against all rows, then the trailing block against itself,
    # and G_ts mirrored (a quarter fewer flops than the whole K x K when Cs = Ct).
    rs, rt = r[:, :cs], r[:, cs:]
    gram = torch.empty((r.shape[0], r.shape[1], r.shape[1]), dtype=r.dtype, device=r.device)
    if _onednn_float32(r):
        for g, x in zip(gram, r):
            g[:cs] = _linear(x[:cs], x)
            g[cs:, cs:] = _linear(x[cs:], x[cs:])
    else:
        gram[:, :cs] = torch.bmm(rs, r.transpose(1, 2))
        gram[:, cs:, cs:] = torch.bmm(rt, rt.transpose(1, 2))
    gram[:, cs:, :cs] = gram[:, :cs, cs:].transpose(1, 2)
    return gram


def times_stacked(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A R per image: a (B, C, K), r (B, K, M) -> (B, C, M)."""
    if _onednn_float32(r):
        if r.shape[0] == 1:
            return _linear(a[0], r[0].t())[None]
        return torch.stack([_linear(x, y.t()) for x, y in zip(a, r)])
    return torch.bmm(a, r)
