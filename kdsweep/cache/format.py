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

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FORMAT_VERSION = 3  # written for q8 values or sampled ids; an fp16 top-k cache is still version 2
SELF_NORMALIZED_VERSION = 4  # a sampled cache of proposal log-probabilities, no normaliser grid
READABLE_VERSIONS = (2, 3, 4)
# What TeacherLogitCache.read returns (decoded), and what a version-2 file (fp16 top-k) stores.
DATASETS = ("input_ids", "topk_ids", "topk_logits", "log_normalizer", "log_normalizer_slope")
STORED = ("input_ids", "topk_id_deltas", "topk_logits", "tail_log_normalizer_residual", "tail_log_normalizer_slope")
Q8_LEVELS = 255  # codes 0..255: 0 is the position's largest stored logit (s = 0 for a top-k cache)
LOG_NORMALIZER_QUANTUM = 2.0**-14
TAIL_FLOOR = -200.0  # log of a negligible (or empty) tail: exp(-200) vanishes next to the top token's 1
FP16_MIN = float(np.finfo(np.float16).min)
PADDING_LOGIT = -1e4  # a sampled cache's empty slots read as this logit: exp(b * -1e4) == 0
_MASKED = PADDING_LOGIT  # stands in for -inf logits: exp(b * _MASKED) == 0 and 0 * _MASKED is not NaN
GZIP_LEVEL = 4
MAX_INTERPOLATION_ERROR = 1e-3  # the stated log-normaliser bound; above it the temperature grid is too coarse


@dataclass
class CacheLayout:
    """Everything fixed before the first sequence is written."""

    top_k: int
    betas: np.ndarray
    vocab_size: int  # tokenizer's vocabulary; padded LM-head rows beyond it are dropped
    seq_len: int
    fingerprint: dict
    mode: str = "topk"  # topk | sampled: which ids a position keeps
    values: str = "fp16"  # fp16 | q8: how their logits are stored
    sample_draws: int = 0  # sampled: tokens drawn per position (top_k is then the slot count, = draws)
    sample_temperature: float = 1.0  # sampled: the proposal temperature (not a KD temperature)
    sample_weights: str = "exact"  # sampled: exact (normaliser grid) | self_normalized (log q_tau, no grid)

    @property
    def self_normalized(self) -> bool:
        """A sampled cache of proposal log-probabilities and no normaliser grid (any KD temperature)."""
        return self.sample_weights == "self_normalized"

    @property
    def version(self) -> int:
        """The format version these settings are written as (see :func:`format_version`)."""
        return format_version(self.mode, self.values, self.sample_weights)

    @property
    def stored(self) -> tuple[str, ...]:
        """The datasets a file of this layout stores (see :func:`stored_names`)."""
        return stored_names(self.mode, self.values, self.sample_weights)


def format_version(mode: str, values: str, sample_weights: str = "exact") -> int:
    """2 for an fp16 top-k cache (unchanged, so older readers and caches keep working), 4 for a
    self-normalised sampled cache (older readers would miss its grid and call it damaged), else 3."""
    if sample_weights == "self_normalized":
        return SELF_NORMALIZED_VERSION
    return 2 if (mode, values) == ("topk", "fp16") else FORMAT_VERSION


def stored_names(mode: str, values: str, sample_weights: str = "exact") -> tuple[str, ...]:
    """The stored datasets of a cache, in file order.

    ``<p>`` is ``topk`` or ``sample``: ``input_ids``, ``<p>_id_deltas``, ``sample_counts``
    (sampled only), ``<p>_logits`` (fp16) or ``<p>_logit_codes`` + ``<p>_logit_min`` (q8),
    and the two tail normaliser datasets. A self-normalised sampled cache stores the proposal's
    log-probabilities instead of logits, ``sample_log_probs`` (fp16) or ``sample_log_prob_codes``
    + ``sample_log_prob_min`` (q8), and no normaliser.
    """
    prefix = "topk" if mode == "topk" else "sample"
    counts = ("sample_counts",) if mode == "sampled" else ()
    if sample_weights == "self_normalized":
        values_ = ("sample_log_probs",) if values == "fp16" else ("sample_log_prob_codes", "sample_log_prob_min")
        return ("input_ids", "sample_id_deltas", *counts, *values_)
    logits = (f"{prefix}_logits",) if values == "fp16" else (f"{prefix}_logit_codes", f"{prefix}_logit_min")
    return ("input_ids", f"{prefix}_id_deltas", *counts, *logits, *STORED[3:])


# --------------------------------------------------------------------------- metadata checksums
# HDF5 checks each chunk of data (fletcher32) but nothing of the attributes: a flipped bit in the
# temperature grid, the quantum or the fingerprint would be read as a valid value, and the student
# would train on shifted probabilities. So the writer stores, last, one checksum per attribute and
# per dataset description (shape, dtype, chunks, filters, virtual sources), and the reader
# compares them at open.
METADATA_CHECKSUMS = "metadata_sha256"  # JSON {"attribute NAME" | "dataset NAME": sha256 hex}


def _attr_bytes(value) -> bytes:
    """A canonical byte string of an attribute value as h5py reads it (type, shape and content)."""
    a = np.asarray(value)
    content = repr(a.tolist()).encode() if a.dtype.kind == "O" else a.tobytes()
    return f"{a.dtype.str}|{a.shape}|".encode() + content


def _dataset_bytes(ds) -> bytes:
    """A canonical byte string of what a reader relies on in a dataset besides its chunks' data."""
    parts = [ds.shape, ds.dtype.str, ds.chunks, ds.compression, ds.compression_opts, ds.shuffle, ds.fletcher32]
    if ds.is_virtual:
        parts += [(v.file_name, v.dset_name, v.vspace.get_select_bounds()) for v in ds.virtual_sources()]
    parts += sorted((k, _attr_bytes(v)) for k, v in ds.attrs.items())
    return repr(parts).encode()


def metadata_checksums(f) -> dict[str, str]:
    """``{"attribute NAME" | "dataset NAME": sha256}`` of an open h5py file's root attributes (but the
    checksums themselves) and its datasets' descriptions."""
    out = {f"attribute {k}": _attr_bytes(v) for k, v in f.attrs.items() if k != METADATA_CHECKSUMS}
    out |= {f"dataset {k}": _dataset_bytes(v) for k, v in f.items() if hasattr(v, "dtype")}
    return {k: hashlib.sha256(v).hexdigest() for k, v in sorted(out.items())}


def seal_metadata(f) -> None:
    """Store :func:`metadata_checksums` of an h5py file open for writing (after every other attribute)."""
    f.attrs[METADATA_CHECKSUMS] = json.dumps(metadata_checksums(f), sort_keys=True)


def metadata_changes(f) -> list[str] | None:
    """The attributes and datasets whose metadata changed since :func:`seal_metadata`: ``[]`` when
    none did, None for a file sealed by no one (written before checksums existed)."""
    raw = f.attrs.get(METADATA_CHECKSUMS)
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
    except (TypeError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        return [f"attribute {METADATA_CHECKSUMS}"]
    now = metadata_checksums(f)
    return [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]


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


def sample_ids(
    s: torch.Tensor, draws: int, temperature: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``draws`` tokens per row from softmax(s / temperature) (with replacement); keep the unique ones.

    Args:
        s: (C, V) logits (any shift).
        temperature: the proposal temperature (not a KD temperature).
    Returns:
        ids (C, draws) int64: the unique ids ascending in the first u slots of a row, the last
        of them repeated in the other slots (gaps of 0 compress to nothing); counts (C, draws)
        int32: how often each was drawn, 0 in the padding slots (a row's counts sum to ``draws``).
    """
    probs = torch.softmax(s.float() / temperature, dim=-1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator).sort(-1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(-1) - 1
    counts = torch.zeros(drawn.shape, dtype=torch.int32, device=s.device)
    counts.scatter_add_(-1, slot, torch.ones_like(slot, dtype=torch.int32))
    ids = torch.zeros_like(drawn).scatter_(-1, slot, drawn)
    unique = new.sum(-1, keepdim=True)
    return torch.where(torch.arange(draws, device=s.device) < unique, ids, ids.gather(-1, unique - 1)), counts


# (code / 255)^2 as a table, so the writer (any device) and every reader decode bit-identically.
_Q8_SQUARES = torch.from_numpy((np.arange(Q8_LEVELS + 1, dtype=np.float64) / Q8_LEVELS) ** 2).float()


def encode_q8(vals: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The q8 code of shifted logits: square-law companding over each position's own range.

    ``s = low * (code / 255)^2`` with ``low`` the position's smallest stored logit (float16,
    rounded away from nothing: codes are clipped to 255). Steps are fine near the position's
    largest logits (which hold the probability mass) and coarse near ``low``: the step at
    code c is ``|low| * (2c + 1) / 255^2`` (docs/cache-format.md has the justification).

    Args:
        vals: (C, W) logits minus the position's max (<= 0).
        valid: (C, W) which slots hold a logit (padding slots get code 0).
    Returns:
        codes (C, W) uint8 and low (C,) float16.
    """
    low = vals.masked_fill(~valid, 0).amin(-1).clamp(min=FP16_MIN).half()
    scale = low.float().unsqueeze(-1)
    ratio = torch.where(scale < 0, vals / scale.clamp(max=-1e-30), 0.0).clamp(0, 1).masked_fill(~valid, 0)
    return torch.round(Q8_LEVELS * ratio.sqrt()).to(torch.uint8), low


def decode_q8(codes: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(..., W) float32 logits from q8 ``codes`` (..., W) and ``low`` (...,): ``low * (code / 255)^2``."""
    return low.float().unsqueeze(-1) * _Q8_SQUARES.to(codes.device)[codes.long()]


def _select(
    s: torch.Tensor, k: int, sampling: tuple[int, float, torch.Generator | None] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ids a position keeps, ascending: its top-k, or (``sampling`` = (draws, temperature,
    generator)) the unique ids of a sample with their counts (see :func:`sample_ids`)."""
    if sampling is not None:
        return sample_ids(s, *sampling)
    return s.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values, None  # small gaps compress well


def summarize_logits(
    logits: torch.Tensor,
    k: int,
    betas: np.ndarray,
    values: str = "fp16",
    sampling: tuple[int, float, torch.Generator | None] | None = None,
) -> dict[str, torch.Tensor]:
    """What the cache stores for each position, computed on the logits' device.

    Args:
        logits: (N, V) teacher logits, any float dtype (computed in float32).
        k: how many to keep (top-k); with ``sampling`` the slot count is the draw count.
        betas: (G,) uniform inverse-temperature grid.
        values: ``fp16`` or ``q8`` (:func:`encode_q8`).
        sampling: (draws, proposal temperature, generator) for a sampled cache, else None.
    Returns:
        ``topk_ids`` (N, W) int64 ascending ids; ``topk_logits`` (N, W) float16 shifted logits
        (fp16) or ``topk_logit_codes`` uint8 + ``topk_logit_min`` float16 (q8); ``sample_counts``
        (N, W) int32 (sampled); ``tail_log_normalizer`` (N, G) float32, t at the grid as a reader
        decodes it; ``tail_log_normalizer_residual`` (N, G) int32, its stored coding;
        ``log_normalizer`` (N, G + W) float32 and ``log_normalizer_slope`` (N, G) float16, the
        arguments of :func:`log_normalizer` (as ``TeacherLogitCache.read`` returns them); and two
        scalars measured at every grid point and interval midpoint from exactly what a reader
        gets: ``max_error``, the largest |f_cache - f| (log space; f with the stored values for
        q8, with the exact ones for fp16), and ``value_max_error``, the largest |p_cache - p| of a
        bucket (a kept id or the tail) against the exact softmax.
    """
    s = logits.float()
    s = s - s.max(dim=-1, keepdim=True).values
    ids, counts = _select(s, k, sampling)
    valid = torch.ones_like(ids, dtype=torch.bool) if counts is None else counts > 0
    vals = s.gather(-1, ids).masked_fill(~valid, 0)
    out = {"topk_ids": ids} if counts is None else {"topk_ids": ids, "sample_counts": counts}
    if values == "q8":
        out["topk_logit_codes"], out["topk_logit_min"] = encode_q8(vals, valid)
        decoded = decode_q8(out["topk_logit_codes"], out["topk_logit_min"])
    else:
        out["topk_logits"] = vals.clamp(min=FP16_MIN).half()
        decoded = out["topk_logits"].float()
    decoded = decoded.masked_fill(~valid, _MASKED)
    tail = s.clamp(min=_MASKED).scatter_(-1, ids, _MASKED)  # the tokens outside the kept ids
    z, m = _exp_sums(tail, betas)  # at b_0, midpoint, b_1, ...: 2G - 1 points
    t_all = torch.log(z.double()).clamp(min=TAIL_FLOOR)
    z_grid = z[:, 0::2].double()
    slopes = torch.where(z_grid > 0, m.double() / z_grid.clamp(min=1e-300), 0.0)
    slopes = torch.where(t_all[:, 0::2] > TAIL_FLOOR, slopes, 0.0).float().clamp(min=FP16_MIN).half()
    residuals = encode_log_normalizer(t_all[:, 0::2], slopes, betas)
    t_dec = _decode_torch(residuals, slopes, betas).float()
    packed = torch.cat([t_dec, decoded], dim=-1)
    reference = decoded if values == "q8" else vals.masked_fill(~valid, _MASKED)
    errors = _measured_errors(vals.masked_fill(~valid, _MASKED), reference, z, packed, slopes, betas)
    return out | {
        "tail_log_normalizer": t_dec,
        "tail_log_normalizer_residual": residuals,
        "log_normalizer": packed,
        "log_normalizer_slope": slopes,
        "max_error": errors[0],
        "value_max_error": errors[1],
    }


def summarize_log_probs(
    logits: torch.Tensor, values: str, sampling: tuple[int, float, torch.Generator | None]
) -> dict[str, torch.Tensor]:
    """What a self-normalised sampled cache stores for each position: the sampled ids, their counts
    and their log-probabilities under the proposal, log q_tau(u) = log_softmax(z / tau)_u.

    Args:
        logits: (N, V) teacher logits, any float dtype (computed in float32).
        values: ``fp16`` or ``q8`` (:func:`encode_q8` over the position's kept log-probabilities).
        sampling: (draws, proposal temperature tau, generator), as for :func:`summarize_logits`.
    Returns:
        ``topk_ids`` (N, W) int64 ascending; ``sample_counts`` (N, W) int32; ``sample_log_probs``
        (N, W) float16 (fp16) or ``sample_log_prob_codes`` uint8 + ``sample_log_prob_min`` float16
        (q8), 0 in padding slots; and two scalars measured on exactly what a reader decodes:
        ``max_error``, the largest |log q_cache - log q| over the kept ids (log space), and
        ``value_max_error``, the largest |q_cache - q|.
    """
    s = logits.float()
    ids, counts = sample_ids(s, *sampling)
    valid = counts > 0
    lse = torch.logsumexp(s / sampling[1], dim=-1, keepdim=True)
    exact = (s.gather(-1, ids).double() / sampling[1] - lse.double()).masked_fill(~valid, 0)
    vals = exact.float()
    out = {"topk_ids": ids, "sample_counts": counts}
    if values == "q8":
        out["sample_log_prob_codes"], out["sample_log_prob_min"] = encode_q8(vals, valid)
        decoded = decode_q8(out["sample_log_prob_codes"], out["sample_log_prob_min"]).double()
    else:
        out["sample_log_probs"] = vals.clamp(min=FP16_MIN).half()
        decoded = out["sample_log_probs"].double()
    error = (decoded - exact).abs().masked_fill(~valid, 0)
    value_error = (decoded.exp() - exact.exp()).abs().masked_fill(~valid, 0)
    return out | {"max_error": error.max().float(), "value_max_error": value_error.max().float()}


def _measured_errors(
    exact: torch.Tensor,
    reference: torch.Tensor,
    z: torch.Tensor,
    packed: torch.Tensor,
    slopes: torch.Tensor,
    betas: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser's and the buckets' largest errors over the grid points and midpoints.

    Args:
        exact: (C, W) the kept ids' exact shifted logits (``_MASKED`` at padding).
        reference: (C, W) the logits the normaliser error is taken against.
        z: (C, 2G - 1) the tail's exact sum of exp(b s) at the points.
        packed, slopes: what a reader passes to :func:`log_normalizer`.
    """
    g = len(betas)
    points = np.stack([betas[:-1], 0.5 * (betas[:-1] + betas[1:])], -1).reshape(-1).tolist() + [float(betas[-1])]
    max_error = torch.zeros((), dtype=torch.float64, device=z.device)
    value_error = torch.zeros((), dtype=torch.float64, device=z.device)
    for p, beta in enumerate(points):
        log_tail = torch.log(z[:, p].double())
        f_ref = torch.logaddexp(torch.logsumexp(reference.double() * beta, dim=-1), log_tail)
        f_cache = log_normalizer(packed, slopes, betas, beta).double()
        max_error = torch.maximum(max_error, (f_ref - f_cache).abs().max())
        f_true = torch.logaddexp(torch.logsumexp(exact.double() * beta, dim=-1), log_tail)
        p_true = torch.exp(exact.double() * beta - f_true.unsqueeze(-1))
        p_cache = torch.exp(packed[:, g:].double() * beta - f_cache.unsqueeze(-1))
        tail_cache = torch.exp(hermite(packed[:, :g], slopes, betas, beta).double() - f_cache)
        tail_error = (tail_cache - torch.exp(log_tail - f_true)).abs().max()
        value_error = torch.maximum(value_error, torch.maximum((p_cache - p_true).abs().max(), tail_error))
    return max_error.float(), value_error.float()


def stored_dtypes(
    mode: str, values: str, vocab_size: int, k: int, g: int, sample_weights: str = "exact"
) -> dict[str, tuple[np.dtype, int | None]]:
    """Each stored dataset's dtype and last dimension (None: the dataset is (N, L)), in file order."""
    spec = {
        "log_probs": (np.dtype(np.float16), k),
        "log_prob_codes": (np.dtype(np.uint8), k),
        "log_prob_min": (np.dtype(np.float16), None),
        "input_ids": (np.dtype(np.int32), None),
        "id_deltas": (ids_dtype(vocab_size), k),
        "counts": (np.dtype(np.uint8), k),
        "logits": (np.dtype(np.float16), k),
        "logit_codes": (np.dtype(np.uint8), k),
        "logit_min": (np.dtype(np.float16), None),
        "tail_log_normalizer_residual": (np.dtype(np.int32), g),
        "tail_log_normalizer_slope": (np.dtype(np.float16), g),
    }
    names = stored_names(mode, values, sample_weights)
    return {name: spec[name.removeprefix("topk_").removeprefix("sample_")] for name in names}


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
    s = values[..., g:].float() / temperature  # the stored logits as decoded (fp16 or q8)
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
