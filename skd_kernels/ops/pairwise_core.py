"""The similarity core of pair-wise distillation, shared by every backend: given the float64 nodes
us (B, Cs, M) and ut (B, Ct, M), the loss sum_b ||Us_b^T Us_b - Ut_b^T Ut_b||_F^2 and its gradients
with respect to the nodes, by one of two exact algorithms, never building the M x M matrix:

- ``lowrank``: sum_ij (a^s - a^t)^2 = ||Us Us^T||^2 + ||Ut Ut^T||^2 - 2 ||Us Ut^T||^2 with the
  (C x C) Gram matrices; O(M C^2) work, O(C^2) memory; gradient d/dUs = 4 (Gss Us - Gst Ut);
- ``tiled``: row blocks D_I = A^s_I - A^t_I (R x M) formed, squared and summed, and the gradient
  D_I Us accumulated block by block; O(M^2 C) work, O(R M) memory.

Exactness. Plain Gram products cancel: the low-rank form subtracts terms of size ||A||^2 ~ M^2 to
get a loss that can be 1e-9 of that (student close to teacher, post-ReLU features whose similarities
all sit near 1), and returns 0 or garbage in float32. So the low-rank core (see `_lowrank`) centres
the nodes (the shared mean direction is handled exactly in float64 vector work) and, when Cs == Ct,
works on S = (Rs + Rt) / 2 and E = Rs - Rt, whose products' rounding errors scale with the
student-teacher difference itself. Every low-rank result comes with a statistical estimate of its
rounding error and is kept only when that is below FLOAT32_LOSS_RTOL (float32 products, CPU, for
non-float64 input; on oneDNN there, see `_onednn_float32`) or FLOAT64_LOSS_RTOL (float64); otherwise
the core retries in float64, then falls back to the tiled algorithm on float64 nodes, whose absolute
error is about 1e-16 M^2 max|a| relative to M^2 B. The nodes are float64 so that the similarities of
fp32/fp16/bf16 inputs are formed exactly. That is the guarantee the tests check, against the float64
reference.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

# Working-set budget (bytes) of one tile row block of the tiled algorithm.
_TILE_BYTES = 1 << 25


def choose_algorithm(nodes: int, student_channels: int, teacher_channels: int, want_teacher: bool) -> str:
    """The exact algorithm with fewer flops for M nodes and Cs, Ct channels."""
    m, cs, ct = nodes, student_channels, teacher_channels
    lowrank = m * (cs * cs + ct * ct + cs * ct) + m * cs * (cs + ct) + (m * ct * (cs + ct) if want_teacher else 0)
    tiled = m * m * (cs + ct) + m * m * cs + (m * m * ct if want_teacher else 0)
    return "tiled" if tiled < lowrank else "lowrank"


class NodeGrad(NamedTuple):
    """d loss / d u as the core leaves it: residual[b, c, m] + bias[b, c] + outer_c[b, c] * outer_q[b, m],
    the residual in float32 or float64, the low-rank form's rank-2 mean terms in float64 (or None),
    all of the unscaled sum (the node backward applies 1 / (M^2 B))."""
    residual: torch.Tensor
    bias: Optional[torch.Tensor] = None
    outer_c: Optional[torch.Tensor] = None
    outer_q: Optional[torch.Tensor] = None

    def dense(self) -> torch.Tensor:
        grad = self.residual.double()
        if self.bias is not None:
            grad = grad + self.bias[..., None] + self.outer_c[..., None] * self.outer_q[:, None, :]
        return grad


class Centred(NamedTuple):
    """Nodes centred over the nodes: residual r = u - mean (B, C, M) in the core's dtype, mean (B, C),
    q = r . mean (B, M) and the per-channel sums of r^2 (B, C), those three in float64."""
    residual: torch.Tensor
    mean: torch.Tensor
    q: torch.Tensor
    sumsq: torch.Tensor


def centre_nodes(u: torch.Tensor, out: torch.Tensor) -> Centred:
    """Stock-PyTorch centring into `out` (B, C, M), whose dtype is the core's (the CPU backend fuses
    it: csrc/cpu/pairwise.cpp `pairwise_centre`)."""
    mean = u.mean(2)
    r = u - mean[..., None]
    out.copy_(r)
    return Centred(out, mean, torch.einsum("bcm,bc->bm", r, mean), r.square().sum(2))


class CentredPair(NamedTuple):
    """Both sides' nodes centred for the difference form (Cs == Ct): stacked [S; E] (B, 2C, M) in the
    core's dtype, S = (rs + rt) / 2 and E = rs - rt each rounded once from float64; the means (B, C),
    q = r . mean (B, M) of each side and the per-row sums of squares of [S; E] (B, 2C), in float64."""
    stacked: torch.Tensor
    mean_s: torch.Tensor
    mean_t: torch.Tensor
    q_s: torch.Tensor
    q_t: torch.Tensor
    sumsq: torch.Tensor


def centre_pair_nodes(us: torch.Tensor, ut: torch.Tensor, dtype: torch.dtype) -> CentredPair:
    """Stock-PyTorch centring for the difference form, [S; E] in `dtype` (the CPU backend fuses it:
    csrc/cpu/pairwise.cpp `pairwise_centre_pair`)."""
    b, c, m = us.shape
    out = torch.empty((b, 2 * c, m), dtype=dtype, device=us.device)
    mean_s, mean_t = us.mean(2), ut.mean(2)
    # At most one node-sized float64 temporary (none for a float64 core): on a GPU the whole batch is
    # one chunk, and r_s, r_t, their sum, difference and squares took five.
    scratch = None if dtype == torch.float64 else torch.empty_like(us)
    sumsq = []
    halves = ((slice(0, c), _half_sum, (mean_s + mean_t) * 0.5), (slice(c, 2 * c), torch.sub, mean_s - mean_t))
    for half, combine, shift in halves:
        target = out[:, half] if scratch is None else scratch
        combine(us, ut, out=target).sub_(shift[..., None])
        sumsq.append(torch.linalg.vector_norm(target, dim=2).square_())
        if scratch is not None:
            out[:, half].copy_(scratch)
    return CentredPair(out, mean_s, mean_t, _dot_mean(us, mean_s), _dot_mean(ut, mean_t), torch.cat(sumsq, 1))


def _half_sum(a, b, out):
    return torch.add(a, b, out=out).mul_(0.5)


def _dot_mean(u, mean):
    """q = (u - mean) . mean per node, (B, M), without forming u - mean."""
    return torch.bmm(mean[:, None, :], u)[:, 0] - mean.square().sum(1, keepdim=True)


def similarity_core(us: torch.Tensor, ut: torch.Tensor, algorithm: str, want_s: bool, want_t: bool,
                    try_float32: bool = False, centre=centre_nodes, centre_pair=centre_pair_nodes):
    """sum_b ||Us_b^T Us_b - Ut_b^T Ut_b||_F^2 and its gradients with respect to Us, Ut.

    us (B, Cs, M), ut (B, Ct, M): float64 nodes, one column per node. Returns (loss, NodeGrad or
    None for Us, for Ut), the loss a 0-d float64 tensor. `try_float32`: run the low-rank products
    in float32 first and keep them when their estimated rounding error is small. `centre(u, out)`
    writes the residuals into `out` and gives the `Centred` nodes; `centre_pair(us, ut, dtype)`
    gives the difference form's `CentredPair` (Cs == Ct).
    """
    if algorithm == "lowrank":
        result = _lowrank(us, ut, want_s, want_t, try_float32, centre, centre_pair)
        if result is not None:
            return result
        # The low-rank form cancels beyond even float64 here (plain form, Cs != Ct, student within
        # ~1e-5 of the teacher); the tiled form subtracts the similarities themselves and stays exact.
    return _tiled(us, ut, want_s, want_t)


# A low-rank result is kept when its estimated relative error is below these: float32 (CPU, for
# non-float64 input) at about the rounding error of the official formula itself evaluated in
# float32; float64 at 1e-10. Otherwise: float64, then the tiled algorithm.
FLOAT32_LOSS_RTOL = 1e-5
FLOAT64_LOSS_RTOL = 1e-10


def _lowrank(us, ut, want_s, want_t, try_float32, centre, centre_pair):
    """The low-rank form on centred nodes, or None when even its float64 rounding error would
    exceed FLOAT64_LOSS_RTOL.

    With c the mean node and r_i = u_i - c (so sum_i r_i = 0), A = 1 1^T c.c + 1 p^T + p 1^T + R R^T,
    p = R c. The difference D = A^s - A^t splits into E (the first three terms, rank <= 3) and
    F = Rs Rs^T - Rt Rt^T, and <E, F> = 0 because R^T 1 = 0: sum D^2 = ||E||^2 + ||F||^2. ||E||^2 and
    its gradient are O(M C) float64 vector work; only ||F||^2 needs Gram matrices, now of the
    residuals: post-ReLU features share a large mean direction, which no longer cancels.

    ||F||^2 in two forms, each kept only when its estimated error is within the dtype's bound:
    `_plain_form` (Grams of Rs and Rt), whose rounding error scales with ||R||^2 and so cancels
    when the student is close to the teacher; and, for Cs == Ct, `_difference_form` (Grams of
    (Rs + Rt) / 2 and Rs - Rt), whose error scales with ||Rs - Rt|| (the only one tried for
    Cs == Ct: never much less exact than the plain form, and as fast). In float32 (try_float32),
    then in float64.
    """
    forms = _FORMS["difference" if us.shape[1] == ut.shape[1] else "plain"]
    for dtype, rtol in ((torch.float32, FLOAT32_LOSS_RTOL), (torch.float64, FLOAT64_LOSS_RTOL)):
        if dtype == torch.float32 and not try_float32:
            continue
        for form in forms:
            result = form(us, ut, dtype, rtol, want_s, want_t, centre, centre_pair)
            if result is not None:
                return result
    return None


class _MeanTerms(NamedTuple):
    """||E||^2 and what its gradient needs (see `_lowrank`), float64: alpha = |cs|^2 - |ct|^2 (B,),
    q = qs - qt (B, M) and its sum (B,)."""
    loss: torch.Tensor
    alpha: torch.Tensor
    q: torch.Tensor
    q_sum: torch.Tensor

    @staticmethod
    def of(mean_s, q_s, mean_t, q_t, m: int) -> "_MeanTerms":
        alpha = mean_s.square().sum(1) - mean_t.square().sum(1)
        q = q_s - q_t
        q_sum = q.sum(1)  # 0 up to rounding; kept so the identity holds for the computed R
        loss = (alpha.square() * m * m + 2 * m * q.square().sum(1) + 4 * alpha * m * q_sum + 2 * q_sum.square()).sum()
        return _MeanTerms(loss, alpha, q, q_sum)

    def grad(self, residual: torch.Tensor, sign: float, mean: torch.Tensor, r_times_q: torch.Tensor) -> NodeGrad:
        """The node gradient, given F's part `residual` (B, C, M): sign 4 D U with E U =
        1 (alpha M c + (1.q) c + R^T q)^T + M q c^T; c = `mean` (B, C), r_times_q = R^T q (B, C)."""
        m = self.q.shape[1]
        bias = 4 * sign * ((self.alpha * m + self.q_sum)[:, None] * mean + r_times_q)
        return NodeGrad(residual, bias, 4 * sign * m * mean, self.q)


def _plain_form(us, ut, dtype, rtol, want_s, want_t, centre, centre_pair):
    """||F||^2 = ||Gss||^2 + ||Gtt||^2 - 2 ||Gst||^2 on the stacked residuals R = [Rs; Rt]
    (B, Cs + Ct, M): one Gram G = R R^T holds Gss, Gst and Gtt, and each gradient is one product
    with R. None when the estimated error exceeds rtol."""
    b, cs, m = us.shape
    stacked = torch.empty((b, cs + ut.shape[1], m), dtype=dtype, device=us.device)
    s, t = centre(us, stacked[:, :cs]), centre(ut, stacked[:, cs:])
    mean = _MeanTerms.of(s.mean, s.q, t.mean, t.q, m)
    gram = _stacked_gram(stacked, cs)
    sign = torch.ones(stacked.shape[1], dtype=torch.float64, device=us.device)
    sign[cs:] = -1
    loss_f, estimate = _plain_gram_loss(gram, sign, s.sumsq, t.sumsq, m, unit_roundoff=torch.finfo(dtype).eps / 2)
    loss = mean.loss + loss_f
    if not bool(estimate <= rtol * loss):  # NaN fails too
        return None
    # F Us = Rs Gss - Rt Gts in node-row layout (Rs^T Us = Rs^T Rs since Rs^T 1 = 0), i.e.
    # [Gss, -Gst] R in columns; d/dUt = -4 D Ut: F Ut = -[Gts, -Gtt] R.
    signed = gram.mul_((4 * sign).to(dtype))  # 4 [G_s., -G_.t], in place: G is not needed any more
    grad_s = grad_t = None
    if want_s:
        grad_s = mean.grad(_times_stacked(signed[:, :cs], stacked), 1.0, s.mean, _times(s.residual, mean.q))
    if want_t:
        grad_t = mean.grad(_times_stacked(signed[:, cs:].neg(), stacked), -1.0, t.mean, _times(t.residual, mean.q))
    return loss, grad_s, grad_t


def _difference_form(us, ut, dtype, rtol, want_s, want_t, centre, centre_pair):
    """||F||^2 for Cs == Ct from S = (Rs + Rt) / 2 and E = Rs - Rt, so that F = S^T E + E^T S (node
    space) and ||F||^2 = 2 <S S^T, E E^T> + 2 <H, H^T>, H = E S^T: each term is of size
    ||S||^2 ||E||^2, and so is its rounding error; nothing cancels however close the student is to
    the teacher. Stacked Z = [S; E] (B, 2C, M), one Gram Z Z^T = [[S S^T, H^T], [H, E E^T]].
    Gradients: F Rs = (Rs S^T) E + (Rs E^T) S with Rs S^T = S S^T + H / 2, Rs E^T = H^T + E E^T / 2;
    for Rt the halves change sign. None when the estimated error exceeds rtol."""
    b, c, m = us.shape
    pair = centre_pair(us, ut, dtype)
    z = pair.stacked
    mean = _MeanTerms.of(pair.mean_s, pair.q_s, pair.mean_t, pair.q_t, m)
    sumsq = pair.sumsq
    gram = _stacked_gram(z, c)
    loss_f, estimate = _difference_gram_loss(gram, sumsq[:, :c], sumsq[:, c:], m,
                                             unit_roundoff=torch.finfo(dtype).eps / 2)
    loss = mean.loss + loss_f
    if not bool(estimate <= rtol * loss):
        return None
    # [Rs S^T, Rs E^T] = G[:C] + G[C:] / 2 = [S S^T + H / 2, H^T + E E^T / 2]; the gradient takes
    # them against [E; S], i.e. the column halves swapped against Z = [S; E].
    # Rs^T q = (S + E / 2)^T q, Rt^T q = (S - E / 2)^T q.
    zq = _times(z, mean.q)
    grads = []
    for want, sign, centre_mean in ((want_s, 1.0, pair.mean_s), (want_t, -1.0, pair.mean_t)):
        if not want:
            grads.append(None)
            continue
        blocks = torch.add(gram[:, :c], gram[:, c:], alpha=0.5 * sign).mul_(4 * sign)
        blocks = torch.cat([blocks[..., c:], blocks[..., :c]], 2)
        grads.append(mean.grad(_times_stacked(blocks, z), sign, centre_mean, zq[:, :c] + 0.5 * sign * zq[:, c:]))
    return loss, grads[0], grads[1]


# Which forms the low-rank core tries, in order: the difference form is never much less exact than
# the plain one (|S|, |E| <= |R|), so it alone serves Cs == Ct.
_FORMS = {"plain": (_plain_form,), "difference": (_difference_form,)}


def _times(residual, q):
    """R^T q per image, (B, C), in float64."""
    return torch.bmm(residual, q.to(residual.dtype)[..., None])[..., 0].double()


# --- the core's GEMMs: oneDNN for float32 on CPU ---------------------------------------------------
# PyTorch's CPU bmm calls MKL, whose float32 GEMM runs AVX2 kernels on AMD processors; oneDNN's
# (the matmul behind torch.ops.mkldnn._linear_pointwise, x @ w^T) picks AVX-512 by the CPU's
# features: 2 to 2.5x faster at the core's shapes (C x C x M and C x M x 2C). Same float32
# arithmetic, so the error estimate holds; only while float32 matmuls are set to full precision.

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


def _stacked_gram(r: torch.Tensor, cs: int) -> torch.Tensor:
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


def _times_stacked(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A R per image: a (B, C, K), r (B, K, M) -> (B, C, M)."""
    if _onednn_float32(r):
        if r.shape[0] == 1:
            return _linear(a[0], r[0].t())[None]
        return torch.stack([_linear(x, y.t()) for x, y in zip(a, r)])
    return torch.bmm(a, r)


def _plain_gram_loss(gram, sign, sumsq_s, sumsq_t, nodes: int, unit_roundoff: float):
    """||F||^2 = sum Gss^2 + sum Gtt^2 - 2 sum Gst^2 = sign^T (G o G) sign summed over the images, and
    a statistical estimate of its rounding error; both float64 0-d tensors.

    gram (B, K, K): the stacked Gram in the core's dtype; sign (K,) float64: +1 on the student's
    rows, -1 on the teacher's; sumsq_s (B, Cs), sumsq_t (B, Ct): the residuals' per-channel sums of
    squares over the M nodes. The squares are formed and summed in float64: the loss is their small
    difference.

    Error estimate: a Gram entry G_ab = sum over M nodes carries an error of about
    unit_roundoff sqrt(M) n_a n_b (n_a^2 = sumsq; rounding errors of a blocked sum add like a random
    walk, and the rounding of the inputs adds as much again). The loss sum_ab G_ab^2 (with signs) then
    errs by about 2 sqrt(sum_ab G_ab^2 dG_ab^2), counting Gst twice:
    4 unit_roundoff sqrt(M) sqrt(n^T (G o G) n + 2 ns^T (Gst o Gst) nt), n = [ns; nt].
    Checked against float64 on independent, correlated, post-ReLU and near-identical features (tests).
    """
    cs = sumsq_s.shape[1]
    square = gram.to(torch.float64, copy=True).square_()  # (B, K, K); G itself is needed after
    n = torch.cat([sumsq_s, sumsq_t], 1)  # (B, K)
    n_t = torch.cat([torch.zeros_like(sumsq_s), sumsq_t], 1)
    products = torch.bmm(square, torch.stack([sign.expand_as(n), n, n_t], 2))  # (B, K, 3): G^2 [sign, n, n_t]
    loss = (products[..., 0] * sign).sum()
    weighted = (products[..., 1] * n).sum() + 2 * (products[:, :cs, 2] * sumsq_s).sum()
    return loss, 4 * unit_roundoff * nodes**0.5 * weighted.sqrt()


def _difference_gram_loss(gram, sumsq_s, sumsq_e, nodes: int, unit_roundoff: float):
    """||F||^2 = 2 <S S^T, E E^T> + 2 <H, H^T> summed over the images, and a statistical estimate of
    its rounding error; float64 0-d tensors. gram (B, 2C, 2C) = Z Z^T with Z = [S; E];
    sumsq_s, sumsq_e (B, C): the per-channel sums of squares of S and E.

    Error estimate as in `_plain_gram_loss`: entry errors u sqrt(M) n_a n_b (twice that for the
    input rounding), weighted by d loss / d G: 2 E E^T on the S S^T block, 2 S S^T on E E^T, and
    4 H^T on H (counting H and H^T as one): 4 u sqrt(M) sqrt(ns^T (Gee o Gee) ns + ne^T (Gss o Gss) ne
    + 4 ne^T (H o H) ns).
    """
    c = sumsq_s.shape[1]
    g = gram.to(torch.float64, copy=True)
    gss, h_t, h, gee = g[:, :c, :c], g[:, :c, c:], g[:, c:, :c], g[:, c:, c:]
    loss = 2 * (gss * gee).sum() + 2 * (h * h_t).sum()  # <H, H^T> = sum_ab H_ab H_ba
    g.square_()

    def bilinear(left, square, right):  # sum_b left_b^T square_b right_b
        return torch.bmm(torch.bmm(left[:, None, :], square), right[:, :, None]).sum()

    weighted = bilinear(sumsq_s, gee, sumsq_s) + bilinear(sumsq_e, gss, sumsq_e) + 4 * bilinear(sumsq_e, h, sumsq_s)
    return loss, 4 * unit_roundoff * nodes**0.5 * weighted.clamp_min(0).sqrt()


def _tiled(us, ut, want_s, want_t):
    m = us.shape[-1]
    rows = max(1, min(m, _TILE_BYTES // (8 * m * us.shape[0])))
    if rows == m:
        return _one_tile(us, ut, want_s, want_t)
    loss = us.new_zeros(())
    dus = torch.empty_like(us) if want_s else None
    dut = torch.empty_like(ut) if want_t else None
    for r0 in range(0, m, rows):
        block = slice(r0, r0 + rows)
        # D_I = A^s[I, :] - A^t[I, :], (B, R, M)
        diff = torch.baddbmm(torch.bmm(us[:, :, block].transpose(1, 2), us), ut[:, :, block].transpose(1, 2), ut,
                             alpha=-1)
        loss += diff.square().sum()
        if want_s:  # (D Us)[I], stored as columns: Us D_I^T
            dus[:, :, block] = torch.bmm(us, diff.transpose(1, 2)).mul_(4)
        if want_t:
            dut[:, :, block] = torch.bmm(ut, diff.transpose(1, 2)).mul_(-4)
    return loss, NodeGrad(dus) if want_s else None, NodeGrad(dut) if want_t else None


def _one_tile(us, ut, want_s, want_t):
    """`_tiled` when D = A^s - A^t fits one tile (few nodes, as the official 3x3): the fewest
    launches, which is what a loss this small costs on a GPU. D is symmetric, so D U^T needs no
    transpose."""
    diff = torch.baddbmm(torch.bmm(us.transpose(1, 2), us), ut.transpose(1, 2), ut, alpha=-1)
    flat = diff.view(-1)
    loss = torch.dot(flat, flat)
    dus = NodeGrad(torch.baddbmm(us, us, diff, beta=0, alpha=4)) if want_s else None
    dut = NodeGrad(torch.baddbmm(ut, ut, diff, beta=0, alpha=-4)) if want_t else None
    return loss, dus, dut
