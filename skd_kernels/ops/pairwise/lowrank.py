"""The low-rank algorithm of the similarity core: centred Gram matrices, O(M C^2) work, O(C^2)
memory, with an a-posteriori rounding-error estimate that decides whether a result is kept.
The derivation (centring, the mean terms, the plain and difference expansions): docs/ops/pairwise.md."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .onednn import stacked_gram, times_stacked
from .types import Centred, CentredPair, NodeGrad


class Centring:
    """How the low-rank algorithm centres nodes: the backend's `centre` and `centre_pair` passes
    (fused on the CPU, stock ops elsewhere), and one [S; E] buffer per dtype reused by every tile
    of images of a call (on a CPU, first-touch page faults of a fresh one cost as much as the
    centring itself); and how it keeps a result or falls back to the tiled algorithm (`keep_or_tiled`)."""

    def __init__(self, passes):
        self._passes = passes
        self._stacked: dict[torch.dtype, torch.Tensor] = {}

    def centre(self, u: torch.Tensor, out: torch.Tensor) -> Centred:
        """Residuals of `u` (B, C, M) written into `out`, whose dtype is the core's."""
        return self._passes.centre(u, out)

    def centre_pair(self, us: torch.Tensor, ut: torch.Tensor, dtype: torch.dtype) -> CentredPair:
        """Both sides centred for the difference expansion (Cs == Ct), [S; E] in `dtype`."""
        shape = (us.shape[0], 2 * us.shape[1], us.shape[2])
        out = self._stacked.get(dtype)
        if out is None or out.shape != shape:
            out = self._stacked[dtype] = torch.empty(shape, dtype=dtype, device=us.device)
        return self._passes.centre_pair(us, ut, out)

    def keep_or_tiled(self, us: torch.Tensor, ut: torch.Tensor, want_s: bool, want_t: bool, result):
        """(loss, grad_s, grad_t): the low-rank `result` where its estimate is within bound, else the
        tiled algorithm's, by the backend's `keep_or_tiled` pass (decided on the device on a GPU)."""
        return self._passes.keep_or_tiled(us, ut, want_s, want_t, *result)


# A low-rank result is kept when its estimated relative error is below these: float32 (CPU, for
# non-float64 input) at about the rounding error of the official formula itself evaluated in
# float32; float64 at 1e-10. Otherwise: float64, then the tiled algorithm.
FLOAT32_LOSS_RTOL = 1e-5
FLOAT64_LOSS_RTOL = 1e-10


def lowrank(us, ut, want_s, want_t, try_float32, centring) -> "LowRank":
    """The low-rank algorithm on centred nodes: a `LowRank` result whose `within` (a 0-d bool tensor)
    says whether its estimated rounding error is within the bound of its dtype. The caller keeps it or
    falls back to the tiled algorithm (`Centring.keep_or_tiled`), on the device: no host sync.

    With c the mean node and r_i = u_i - c (so sum_i r_i = 0), A = 1 1^T c.c + 1 p^T + p 1^T + R R^T,
    p = R c. The difference D = A^s - A^t splits into E (the first three terms, rank <= 3) and
    F = Rs Rs^T - Rt Rt^T, and <E, F> = 0 because R^T 1 = 0: sum D^2 = ||E||^2 + ||F||^2. ||E||^2 and
    its gradient are O(M C) float64 vector work; only ||F||^2 needs Gram matrices, now of the
    residuals: post-ReLU features share a large mean direction, which no longer cancels.

    ||F||^2 in two expansions, each kept only when its estimated error is within the dtype's bound:
    `_plain_expansion` (Grams of Rs and Rt), whose rounding error scales with ||R||^2 and so cancels
    when the student is close to the teacher; and, for Cs == Ct, `_difference_expansion` (Grams of
    (Rs + Rt) / 2 and Rs - Rt), whose error scales with ||Rs - Rt|| (the only one tried for
    Cs == Ct: never much less exact than the plain expansion, and as fast). With try_float32 (CPU)
    first in float32, kept on the host's decision (free there, and it saves the float64 work);
    then in float64.
    """
    expansion = _EXPANSIONS["difference" if us.shape[1] == ut.shape[1] else "plain"]
    if try_float32:
        result = expansion(us, ut, torch.float32, FLOAT32_LOSS_RTOL, want_s, want_t, centring)
        if result is not None:
            return result
    return expansion(us, ut, torch.float64, FLOAT64_LOSS_RTOL, want_s, want_t, centring, host_decides=False)


class LowRank(NamedTuple):
    """A low-rank result: the loss (0-d float64), NodeGrad or None per side, and whether the error
    estimate is within bound (0-d bool tensor; NaN is not)."""
    loss: torch.Tensor
    grad_s: Optional[NodeGrad]
    grad_t: Optional[NodeGrad]
    within: torch.Tensor


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


def _plain_expansion(us, ut, dtype, rtol, want_s, want_t, centring, host_decides=True):
    """||F||^2 = ||Gss||^2 + ||Gtt||^2 - 2 ||Gst||^2 on the stacked residuals R = [Rs; Rt]
    (B, Cs + Ct, M): one Gram G = R R^T holds Gss, Gst and Gtt, and each gradient is one product
    with R. A `LowRank`; with host_decides, None instead when the estimated error exceeds rtol."""
    b, cs, m = us.shape
    stacked = torch.empty((b, cs + ut.shape[1], m), dtype=dtype, device=us.device)
    s, t = centring.centre(us, stacked[:, :cs]), centring.centre(ut, stacked[:, cs:])
    mean = _MeanTerms.of(s.mean, s.q, t.mean, t.q, m)
    gram = stacked_gram(stacked, cs)
    sign = torch.ones(stacked.shape[1], dtype=torch.float64, device=us.device)
    sign[cs:] = -1
    loss_f, estimate = _plain_gram_loss(gram, sign, s.sumsq, t.sumsq, m, unit_roundoff=torch.finfo(dtype).eps / 2)
    loss = mean.loss + loss_f
    within = estimate <= rtol * loss  # NaN fails too
    if host_decides and not bool(within):  # a host sync: only on CPU tensors, where it is free
        return None
    # F Us = Rs Gss - Rt Gts in node-row layout (Rs^T Us = Rs^T Rs since Rs^T 1 = 0), i.e.
    # [Gss, -Gst] R in columns; d/dUt = -4 D Ut: F Ut = -[Gts, -Gtt] R.
    signed = gram.mul_((4 * sign).to(dtype))  # 4 [G_s., -G_.t], in place: G is not needed any more
    grad_s = grad_t = None
    if want_s:
        grad_s = mean.grad(times_stacked(signed[:, :cs], stacked), 1.0, s.mean, _times(s.residual, mean.q))
    if want_t:
        grad_t = mean.grad(times_stacked(signed[:, cs:].neg(), stacked), -1.0, t.mean, _times(t.residual, mean.q))
    return LowRank(loss, grad_s, grad_t, within)


def _difference_expansion(us, ut, dtype, rtol, want_s, want_t, centring, host_decides=True):
    """||F||^2 for Cs == Ct from S = (Rs + Rt) / 2 and E = Rs - Rt, so that F = S^T E + E^T S (node
    space) and ||F||^2 = 2 <S S^T, E E^T> + 2 <H, H^T>, H = E S^T: each term is of size
    ||S||^2 ||E||^2, and so is its rounding error; nothing cancels however close the student is to
    the teacher. Stacked Z = [S; E] (B, 2C, M), one Gram Z Z^T = [[S S^T, H^T], [H, E E^T]].
    Gradients: F Rs = (Rs S^T) E + (Rs E^T) S with Rs S^T = S S^T + H / 2, Rs E^T = H^T + E E^T / 2;
    for Rt the halves change sign. A `LowRank`; with host_decides, None instead when the estimated
    error exceeds rtol."""
    b, c, m = us.shape
    pair = centring.centre_pair(us, ut, dtype)
    z = pair.stacked
    mean = _MeanTerms.of(pair.mean_s, pair.q_s, pair.mean_t, pair.q_t, m)
    sumsq = pair.sumsq
    gram = stacked_gram(z, c)
    loss_f, estimate = _difference_gram_loss(gram, sumsq[:, :c], sumsq[:, c:], m,
                                             unit_roundoff=torch.finfo(dtype).eps / 2)
    loss = mean.loss + loss_f
    within = estimate <= rtol * loss
    if host_decides and not bool(within):
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
        grads.append(mean.grad(times_stacked(blocks, z), sign, centre_mean, zq[:, :c] + 0.5 * sign * zq[:, c:]))
    return LowRank(loss, grads[0], grads[1], within)


# Which expansion the low-rank core uses: the difference expansion is never much less exact than the
# plain one (|S|, |E| <= |R|), so it alone serves Cs == Ct.
_EXPANSIONS = {"plain": _plain_expansion, "difference": _difference_expansion}


def _times(residual, q):
    """R^T q per image, (B, C), in float64."""
    return torch.bmm(residual, q.to(residual.dtype)[..., None])[..., 0].double()



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
