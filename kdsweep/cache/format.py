"""The cache format: top-k teacher logits in HDF5, exact at any KD temperature in a declared range.

The full format is documented in ``docs/cache-format.md``. In short, per split one
HDF5 file with, for N sequences of L tokens, the teacher's top k and G grid points:

=================================  ============  ==========  ================================================
stored dataset                     shape         dtype       meaning
=================================  ============  ==========  ================================================
``input_ids``                      (N, L)        int32       the tokens the teacher read
``topk_id_deltas``                 (N, L, k)     uint16/32   the k most likely next tokens in ascending id
                                                             order, as the first id and then the gaps
``topk_logits``                    (N, L, k)     float16     their logits minus the position's max logit
``tail_log_normalizer_residual``   (N, L, G)     int32       t(b_j), coded against the trapezoid rule
``tail_log_normalizer_slope``      (N, L, G)     float16     t'(b_j)
=================================  ============  ==========  ================================================

Position t holds the teacher's prediction for token t + 1 (the Hugging Face convention).

Why a normaliser: top-k logits alone cannot give the teacher's probabilities at a
temperature T != 1, because the normaliser over the full vocabulary is lost. With
s = z - max(z) and b = 1/T, ``log p_i(T) = b * s_i - f(b)`` where f(b) = logsumexp_v(b * s_v).
The cache stores the part of f that the top-k cannot give, the log-normaliser of the
*other* tokens, t(b) = logsumexp_{v not in top-k}(b * s_v), at a uniform grid of b's over the
declared temperature range, with its slope t'(b) = E[s] under the tail's own softmax.
Then, exactly up to t's interpolation::

    f(b) = logaddexp(logsumexp_{i in top-k}(b * s_i), t(b))      tail mass = exp(t(b) - f(b))

Why the tail and not f itself: for a confident teacher, f bends sharply where the bulk of
the vocabulary overtakes the few top tokens (often inside [1, 4]); a cubic through f needs
~16 grid points to stay within 1e-3 there. The tail alone has no such crossover and is
nearly quadratic in b, and the crossover is then computed exactly from the top-k: 4 points
give a few 1e-4 (``bench/cache.py``). Between grid points t is a cubic Hermite spline
through the stored values and slopes. The writer measures the error of the resulting f
(with the float16 logits, as readers compute it) at every grid point and interval
midpoint, and keeps the maximum as the attribute ``log_normalizer_max_error``.

How t is coded (quantum q = 2^-14, at most 3.1e-5 in log space; a tail below e^-200 of the
top token, or an empty one, is stored as -200): with ``r`` the residuals, ``d`` the stored
slopes (float16, used exactly) and ``c_j = (b_j - b_{j-1}) / 2``::

    t_0 = q * r_0
    t_j = (t_{j-1} + c_j * (d_{j-1} + d_j)) + q * r_j      (float64, in this order)

The trapezoid rule predicts each value from the previous one and the two slopes, so the
residuals are small integers that compress to ~1.5 bytes where a float32 takes ~3.2.

:class:`~kdsweep.cache.reader.TeacherLogitCache` decodes ids and t on read and returns
:data:`DATASETS`; its ``log_normalizer`` array is what :func:`log_normalizer` takes: t at the
grid followed by the top-k logits, so ``log_normalizer(batch["log_normalizer"], batch["log_normalizer_slope"],
betas, 1 / T)`` is f(1/T) and callers never see the coding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FORMAT_VERSION = 2
# What TeacherLogitCache.read returns (decoded), and what the file stores.
DATASETS = ("input_ids", "topk_ids", "topk_logits", "log_normalizer", "log_normalizer_slope")
STORED = ("input_ids", "topk_id_deltas", "topk_logits", "tail_log_normalizer_residual", "tail_log_normalizer_slope")
LOG_NORMALIZER_QUANTUM = 2.0**-14
TAIL_FLOOR = -200.0  # log of a negligible (or empty) tail: exp(-200) vanishes next to the top token's 1
FP16_MIN = float(np.finfo(np.float16).min)
_MASKED = -1e4  # stands in for -inf logits: exp(b * _MASKED) == 0 and 0 * _MASKED is not NaN
GZIP_LEVEL = 4


@dataclass
class CacheLayout:
    """Everything fixed before the first sequence is written."""

    top_k: int
    betas: np.ndarray
    vocab_size: int  # tokenizer's vocabulary; padded LM-head rows beyond it are dropped
    seq_len: int
    fingerprint: dict


# --------------------------------------------------------------------------- pure math
def temperature_grid(t_low: float, t_high: float, points: int) -> np.ndarray:
    """Inverse temperatures b = 1/T, evenly spaced from 1/t_high to 1/t_low (ascending)."""
    if t_low == t_high:
        return np.array([1.0 / t_low, 1.0 / t_low + 1e-3])
    return np.linspace(1.0 / t_high, 1.0 / t_low, points)


def hermite(values: torch.Tensor, slopes: torch.Tensor, betas: Sequence[float], beta: float) -> torch.Tensor:
    """Cubic Hermite interpolation at ``beta`` of a function given on the grid ``betas``.

    Args:
        values: (..., G) the function at the grid points.
        slopes: (..., G) its derivative there.
        betas: (G,) ascending grid; ``beta`` must lie within it.
    Returns:
        (...,) float32; exact at grid points.
    """
    g = len(betas)
    j = int(np.clip(np.searchsorted(betas, beta, side="right") - 1, 0, g - 2))
    b0, b1 = float(betas[j]), float(betas[j + 1])
    h = b1 - b0
    t = (beta - b0) / h
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    v0, v1 = values[..., j].float(), values[..., j + 1].float()
    d0, d1 = slopes[..., j].float(), slopes[..., j + 1].float()
    return h00 * v0 + h10 * h * d0 + h01 * v1 + h11 * h * d1


def log_normalizer(values: torch.Tensor, slopes: torch.Tensor, betas: Sequence[float], beta: float) -> torch.Tensor:
    """The full-vocabulary log-normaliser f(beta) = logsumexp_v(beta * s_v) of cached positions.

    Args:
        values: (..., G + k) float: the tail's log-normaliser t at the G grid points, then the
            k top-k logits s (as ``TeacherLogitCache.read`` returns under ``log_normalizer``).
        slopes: (..., G) t' at the grid points.
        betas: (G,) ascending grid; ``beta = 1/T`` must lie within it.
    Returns:
        (...,) float32 ``logaddexp(logsumexp(beta * s), t(beta))``, t cubic-Hermite
        interpolated (with k = 0 columns, just t(beta)).
    """
    g = len(betas)
    tail = hermite(values[..., :g], slopes, betas, beta)
    if values.shape[-1] == g:
        return tail
    return torch.logaddexp(torch.logsumexp(values[..., g:].float() * beta, dim=-1), tail)


def encode_log_normalizer(values: torch.Tensor, slopes: torch.Tensor, betas: Sequence[float]) -> torch.Tensor:
    """Residuals (..., G) int32 of a grid function against the trapezoid rule (see the module docstring).

    Args:
        values: (..., G) exact values at the grid (float64 preferred).
        slopes: (..., G) the slopes as stored (float16).
        betas: (G,) the grid.
    Closed loop: each residual is taken against the *decoded* previous value, so errors do
    not accumulate along the grid; the decoded values are within q / 2 of ``values``.
    """
    q = LOG_NORMALIZER_QUANTUM
    f = values.double()
    d = slopes.double()
    out = torch.empty(f.shape, dtype=torch.int32, device=f.device)
    out[..., 0] = torch.round(f[..., 0] / q).to(torch.int32)
    prev = out[..., 0].double() * q
    for j in range(1, f.shape[-1]):
        pred = prev + (float(betas[j]) - float(betas[j - 1])) / 2 * (d[..., j - 1] + d[..., j])
        out[..., j] = torch.round((f[..., j] - pred) / q).to(torch.int32)
        prev = pred + out[..., j].double() * q
    return out


def decode_log_normalizer(residuals: np.ndarray, slopes: np.ndarray, betas: Sequence[float]) -> np.ndarray:
    """The grid values (..., G) float32 from the stored residuals and slopes (numpy).

    Same arithmetic, in the same order, as :func:`encode_log_normalizer`, so the result is
    bit-identical to what the writer measured its error bound on (grid-major buffers only
    for speed).
    """
    q = LOG_NORMALIZER_QUANTUM
    shape, g = residuals.shape, residuals.shape[-1]
    d = slopes.reshape(-1, g).astype(np.float64).T
    trapezoid = (np.diff(np.asarray(betas, dtype=np.float64)) / 2)[:, None] * (d[:-1] + d[1:])  # (G - 1, n)
    corrections = residuals.reshape(-1, g).T * q
    f = np.empty((g, d.shape[1]), dtype=np.float64)
    f[0] = corrections[0]
    for j in range(1, g):
        np.add(f[j - 1], trapezoid[j - 1], out=f[j])
        f[j] += corrections[j]
    return f.T.astype(np.float32).reshape(shape)


def _decode_torch(residuals: torch.Tensor, slopes: torch.Tensor, betas: Sequence[float]) -> torch.Tensor:
    """:func:`decode_log_normalizer` in torch float64 on the tensors' device."""
    q = LOG_NORMALIZER_QUANTUM
    d = slopes.double()
    f = torch.empty(residuals.shape, dtype=torch.float64, device=residuals.device)
    f[..., 0] = residuals[..., 0].double() * q
    for j in range(1, residuals.shape[-1]):
        f[..., j] = (
            f[..., j - 1] + (float(betas[j]) - float(betas[j - 1])) / 2 * (d[..., j - 1] + d[..., j])
        ) + residuals[..., j].double() * q
    return f


def _exp_sums(s: torch.Tensor, betas: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Z(b) = sum_v exp(b s_v) at the grid and at the interval midpoints, and sum_v s_v exp(b s_v) at the grid.

    Args:
        s: (C, V) shifted logits (max 0), float32, finite.
        betas: (G,) uniform ascending grid.
    Returns:
        Z: (C, 2G - 1) at b_0, (b_0 + b_1)/2, b_1, ...; S: (C, G) at the grid.
    The grid is uniform, so exp(b s) at the next half-step is the previous one times
    exp(h/2 * s): two exp passes instead of 2G - 1 (the exp dominates on a CPU). Going up
    from the smallest b, the factor is <= 1 and a term can only underflow where it is
    negligible next to the max term exp(0) = 1. On a CPU the rows go in blocks of ~1 MB
    that stay in cache, with preallocated buffers (fresh 16 MB tensors cost more in page
    faults than the arithmetic), and denormals are flushed to zero.
    """
    g, (c, v) = len(betas), s.shape
    half = (float(betas[-1]) - float(betas[0])) / (2 * (g - 1))
    z = torch.empty(c, 2 * g - 1, dtype=torch.float32, device=s.device)
    m = torch.empty(c, g, dtype=torch.float32, device=s.device)
    rows = c if s.device.type != "cpu" else max(1, min(c, 2**18 // v))
    e_buf = torch.empty(rows, v, dtype=torch.float32, device=s.device)
    step_buf, prod_buf = torch.empty_like(e_buf), torch.empty_like(e_buf)
    flush = torch.set_flush_denormal(True) if s.device.type == "cpu" else False
    try:
        for a in range(0, c, rows):
            sb = s[a : a + rows]
            n = sb.shape[0]
            e, step, prod = e_buf[:n], step_buf[:n], prod_buf[:n]
            torch.mul(sb, float(betas[0]), out=e).exp_()
            torch.mul(sb, half, out=step).exp_()
            for p in range(2 * g - 1):
                if p:
                    e.mul_(step)
                torch.sum(e, dim=-1, out=z[a : a + n, p])
                if p % 2 == 0:
                    torch.sum(torch.mul(e, sb, out=prod), dim=-1, out=m[a : a + n, p // 2])
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return z, m


def summarize_logits(logits: torch.Tensor, k: int, betas: np.ndarray) -> dict[str, torch.Tensor]:
    """What the cache stores for each position, computed on the logits' device.

    Args:
        logits: (N, V) teacher logits, any float dtype (computed in float32).
        k: how many to keep.
        betas: (G,) uniform inverse-temperature grid.
    Returns:
        ``topk_ids`` (N, k) int64 ascending ids; ``topk_logits`` (N, k) float16 shifted logits;
        ``tail_log_normalizer`` (N, G) float32, t at the grid as a reader decodes it;
        ``tail_log_normalizer_residual`` (N, G) int32, its stored coding;
        ``log_normalizer`` (N, G + k) float32 and ``log_normalizer_slope`` (N, G) float16, the
        arguments of :func:`log_normalizer` (as ``TeacherLogitCache.read`` returns them); and
        ``max_error`` (scalar): the largest |f_cache - f| over positions, grid points and
        interval midpoints, f_cache computed from exactly what a reader gets.
    """
    s = logits.float()
    s = s - s.max(dim=-1, keepdim=True).values
    vals, ids = s.topk(k, dim=-1, sorted=False)
    ids, order = ids.sort(dim=-1)  # ascending ids: the gaps are small and compress well
    vals = vals.gather(-1, order)
    vals16 = vals.clamp(min=FP16_MIN).half()
    tail = s.clamp(min=_MASKED).scatter_(-1, ids, _MASKED)  # the tokens outside the top-k
    z, m = _exp_sums(tail, betas)  # at b_0, midpoint, b_1, ...: 2G - 1 points
    t_all = torch.log(z.double()).clamp(min=TAIL_FLOOR)
    z_grid = z[:, 0::2].double()
    slopes = torch.where(z_grid > 0, m.double() / z_grid.clamp(min=1e-300), 0.0)
    slopes = torch.where(t_all[:, 0::2] > TAIL_FLOOR, slopes, 0.0).float().clamp(min=FP16_MIN).half()
    residuals = encode_log_normalizer(t_all[:, 0::2], slopes, betas)
    t_dec = _decode_torch(residuals, slopes, betas).float()
    packed = torch.cat([t_dec, vals16.float()], dim=-1)
    points = np.stack([betas[:-1], 0.5 * (betas[:-1] + betas[1:])], -1).reshape(-1).tolist() + [float(betas[-1])]
    max_error = torch.zeros((), dtype=torch.float64, device=s.device)
    for p, beta in enumerate(points):
        exact = torch.logaddexp(torch.logsumexp(vals.double() * beta, dim=-1), torch.log(z[:, p].double()))
        approx = log_normalizer(packed, slopes, betas, beta).double()
        max_error = torch.maximum(max_error, (exact - approx).abs().max())
    return {
        "topk_ids": ids,
        "topk_logits": vals16,
        "tail_log_normalizer": t_dec,
        "tail_log_normalizer_residual": residuals,
        "log_normalizer": packed,
        "log_normalizer_slope": slopes,
        "max_error": max_error.float(),
    }


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id (and every gap between two)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def ids_to_deltas(ids: np.ndarray) -> np.ndarray:
    """Ascending ids (..., k) -> first id, then the gaps (same dtype)."""
    out = ids.copy()
    out[..., 1:] = np.diff(ids, axis=-1)
    return out


def deltas_to_ids(deltas: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ids_to_deltas`, as int32 (torch's cumsum is ~3x numpy's on short rows)."""
    return torch.from_numpy(deltas.astype(np.int32)).cumsum_(dim=-1).numpy()


def teacher_topk_probs(
    batch: dict[str, np.ndarray | torch.Tensor], betas: Sequence[float], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k probabilities (..., k) and tail mass (...,) at ``temperature`` from read arrays.

    ``p_i = exp(s_i / T - f(1/T))`` and tail mass ``exp(t(1/T) - f(1/T))``; they sum to 1.
    """
    g = len(betas)
    values = torch.as_tensor(batch["log_normalizer"])
    slopes = torch.as_tensor(batch["log_normalizer_slope"])
    s = torch.as_tensor(batch["topk_logits"]).float() / temperature
    lse = log_normalizer(values, slopes, betas, 1.0 / temperature)
    tail = hermite(values[..., :g], slopes, betas, 1.0 / temperature)
    return torch.exp(s - lse.unsqueeze(-1)), torch.exp(tail - lse)


def reconstruct_full(
    batch: dict[str, np.ndarray | torch.Tensor], betas: Sequence[float], temperature: float, vocab_size: int
) -> torch.Tensor:
    """Full-vocabulary teacher probabilities (..., V) from cached top-k arrays at ``temperature``.

    The top-k entries get their exact probabilities; the tail mass 1 - sum(top-k) is spread
    uniformly over the other V - k tokens (the cache does not know how it is distributed).
    Memory is (..., V): use it for inspection, not for training at large vocabularies.
    """
    ids = torch.as_tensor(np.asarray(batch["topk_ids"], dtype=np.int64))
    p_top, tail = teacher_topk_probs(batch, betas, temperature)
    k = ids.shape[-1]
    full = (tail.unsqueeze(-1) / max(vocab_size - k, 1)).expand(*ids.shape[:-1], vocab_size).clone()
    full.scatter_(-1, ids, p_top)
    return full
