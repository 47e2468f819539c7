"""The teacher-logit cache: top-k teacher logits in HDF5, exact at any KD temperature in a declared range.

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

:class:`TeacherLogitCache` decodes ids and t on read and returns :data:`DATASETS`; its
``log_normalizer`` array is what :func:`log_normalizer` takes: t at the grid followed by the
top-k logits, so ``log_normalizer(batch["log_normalizer"], batch["log_normalizer_slope"],
betas, 1 / T)`` is f(1/T) and callers never see the coding.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from kdsweep.errors import UserError

FORMAT_VERSION = 2
# What TeacherLogitCache.read returns (decoded), and what the file stores.
DATASETS = ("input_ids", "topk_ids", "topk_logits", "log_normalizer", "log_normalizer_slope")
STORED = ("input_ids", "topk_id_deltas", "topk_logits", "tail_log_normalizer_residual", "tail_log_normalizer_slope")
LOG_NORMALIZER_QUANTUM = 2.0**-14
TAIL_FLOOR = -200.0  # log of a negligible (or empty) tail: exp(-200) vanishes next to the top token's 1
FP16_MIN = float(np.finfo(np.float16).min)
_MASKED = -1e4  # stands in for -inf logits: exp(b * _MASKED) == 0 and 0 * _MASKED is not NaN
# Virtual (merged) datasets read these where a shard is missing, so a silent gap cannot
# look like data: ids out of range, NaN logits.
_VDS_FILL = {
    "input_ids": -1,
    "topk_id_deltas": None,
    "topk_logits": np.nan,
    "tail_log_normalizer_residual": np.iinfo(np.int32).min,
    "tail_log_normalizer_slope": np.nan,
}
GZIP_LEVEL = 4


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


# --------------------------------------------------------------------------- fingerprint
def diff_fingerprints(cached: dict, expected: dict) -> list[str]:
    """Fields whose values differ, as ``key: cache has X, config has Y`` lines."""
    out = []
    for key in sorted(set(cached) | set(expected)):
        if key in expected and cached.get(key) != expected.get(key):
            out.append(f"{key}: cache has {cached.get(key)!r}, config has {expected.get(key)!r}")
    return out


# --------------------------------------------------------------------------- writer
@dataclass
class CacheLayout:
    """Everything fixed before the first sequence is written."""

    top_k: int
    betas: np.ndarray
    vocab_size: int  # tokenizer's vocabulary; padded LM-head rows beyond it are dropped
    seq_len: int
    fingerprint: dict


def _teacher_logits_chunks(model, input_ids: torch.Tensor, vocab_size: int, chunk_tokens: int):
    """Teacher logits (T_chunk, V) for the flattened batch, a chunk of positions at a time.

    Only the decoder runs on the whole batch; the LM head runs per chunk, so no
    (B, L, V) tensor is ever built. Rows of a padded LM head beyond ``vocab_size`` are dropped.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    head = model.get_output_embeddings()
    for start in range(0, hidden.shape[0], chunk_tokens):
        yield head(hidden[start : start + chunk_tokens])[:, :vocab_size]


@torch.no_grad()
def teacher_batch_summary(model, input_ids: torch.Tensor, layout: CacheLayout, chunk_tokens: int | None = None) -> dict:
    """Run the teacher on (B, L) ``input_ids`` and return the stored arrays (numpy) plus ``max_error``."""
    if chunk_tokens is None:  # ~16M logits per chunk: bounded memory at any vocabulary
        chunk_tokens = max(1, min(4096, 2**24 // layout.vocab_size))
    parts = [
        summarize_logits(lg, layout.top_k, layout.betas)
        for lg in _teacher_logits_chunks(model, input_ids, layout.vocab_size, chunk_tokens)
    ]
    b, length = input_ids.shape

    def cat(key):
        return torch.cat([p[key] for p in parts]).reshape(b, length, -1).cpu().numpy()

    return {
        "topk_id_deltas": ids_to_deltas(cat("topk_ids").astype(ids_dtype(layout.vocab_size))),
        "topk_logits": cat("topk_logits"),
        "tail_log_normalizer_residual": cat("tail_log_normalizer_residual"),
        "tail_log_normalizer_slope": cat("log_normalizer_slope"),
        "max_error": float(max(p["max_error"] for p in parts)),
    }


def shard_range(num_sequences: int, shard: tuple[int, int] | None, batch_size: int) -> tuple[int, int]:
    """Sequences [start, stop) of shard i of n; boundaries fall on whole batches so that
    sharded and unsharded runs put the same sequences in the same batches (bit-identical output)."""
    if shard is None:
        return 0, num_sequences
    i, n = shard
    batches = -(-num_sequences // batch_size)
    start = min(num_sequences, (batches * i // n) * batch_size)
    stop = min(num_sequences, (batches * (i + 1) // n) * batch_size)
    return start, stop


def shard_path(path: Path, shard: tuple[int, int]) -> Path:
    """``train.h5`` -> ``train.shard-0-of-4.h5``."""
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


def _is_finished(path: Path, layout: CacheLayout, compression: int) -> bool:
    """An existing complete file made from the same inputs, layout and compression (nothing to do)."""
    try:
        with h5py.File(path, "r") as f:
            return (
                bool(f.attrs.get("complete", False))
                and int(f.attrs.get("format_version", -1)) == FORMAT_VERSION
                and json.loads(f.attrs["fingerprint"]) == layout.fingerprint
                and np.array_equal(f.attrs["betas"], layout.betas)
                and int(f.attrs["top_k"]) == layout.top_k
                and (f["topk_logits"].compression_opts or 0) == compression
            )
    except (OSError, KeyError, ValueError):
        return False


def generate(
    model,
    input_ids: np.ndarray,
    path: str | Path,
    layout: CacheLayout,
    *,
    batch_size: int,
    device: torch.device,
    shard: tuple[int, int] | None = None,
    desc: str = "teacher logits",
    partial_dir: str | Path | None = None,
    compression: int = GZIP_LEVEL,
) -> Path:
    """Write the cache for ``input_ids`` (N, L) to ``path``; resumable, atomic at the end.

    Each finished batch is saved as its own small file under ``partial_dir`` (default
    ``<path>.partial/``; written to a temporary name, then renamed), so a run killed at any
    moment loses at most the batch in flight; re-running skips the finished batches. Only
    when every batch is done is the HDF5 file assembled under a temporary name, marked
    complete and renamed into place, so a reader never sees a half-written cache. A
    complete file made from the same inputs is left as it is.

    ``compression`` is the gzip level, 0 for none (see :func:`_dataset_options`). Returns the
    path written (the shard's own name with ``shard``).
    """
    path = Path(path)
    if shard is not None:
        path = shard_path(path, shard)
    if _is_finished(path, layout, compression):
        print(f"{path}: complete and up to date")
        return path
    start, stop = shard_range(len(input_ids), shard, batch_size)
    partial = Path(partial_dir) if partial_dir is not None else path.with_name(path.name + ".partial")
    meta = {
        "fingerprint": layout.fingerprint,
        "batch_size": batch_size,
        "range": [start, stop],
        "betas": layout.betas.tolist(),
        "top_k": layout.top_k,
        "format_version": FORMAT_VERSION,
    }
    meta_file = partial / "meta.json"
    if partial.exists() and (not meta_file.exists() or json.loads(meta_file.read_text()) != meta):
        print(f"{partial}: left by a run with other settings; starting over")
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    tmp_meta = partial / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_file)

    batch_starts = list(range(start, stop, batch_size))
    todo = [s for s in batch_starts if not (partial / f"batch-{s:09d}.npz").exists()]
    if len(todo) < len(batch_starts):
        print(f"{path.name}: resuming, {len(batch_starts) - len(todo)} of {len(batch_starts)} batches already done")
    for s in tqdm(todo, desc=desc, unit="batch", dynamic_ncols=True):
        ids = torch.as_tensor(input_ids[s : min(s + batch_size, stop)], dtype=torch.long, device=device)
        summary = teacher_batch_summary(model, ids, layout)
        tmp = partial / f"batch-{s:09d}.tmp.npz"
        np.savez(tmp, max_error=np.float32(summary.pop("max_error")), **summary)
        os.replace(tmp, partial / f"batch-{s:09d}.npz")

    dtype = next(p.dtype for p in model.parameters()) if hasattr(model, "parameters") else None
    _assemble(
        path,
        partial,
        input_ids[start:stop],
        batch_starts,
        layout,
        shard,
        start,
        len(input_ids),
        compression,
        {"teacher_dtype": str(dtype).removeprefix("torch."), "device": device.type},
    )
    shutil.rmtree(partial)
    return path


def _dataset_options(compression: int) -> dict:
    """Filters of every dataset: shuffle + gzip at level ``compression`` (readable by any HDF5
    build; 0 = neither: files 1.8x larger, lazy reads 2-3x faster, inflating being most of the
    cost of a read), and a fletcher32 checksum per chunk. Chunks are one sequence each (the callers)."""
    if compression == 0:  # shuffling only helps a compressor
        return {"fletcher32": True}
    return {"shuffle": True, "compression": "gzip", "compression_opts": compression, "fletcher32": True}


def _create_datasets(f: h5py.File, n: int, layout: CacheLayout, compression: int) -> None:
    k, g, length = layout.top_k, len(layout.betas), layout.seq_len
    opts = _dataset_options(compression)
    f.create_dataset("input_ids", (n, length), np.int32, chunks=(1, length), **opts)
    f.create_dataset("topk_id_deltas", (n, length, k), ids_dtype(layout.vocab_size), chunks=(1, length, k), **opts)
    f.create_dataset("topk_logits", (n, length, k), np.float16, chunks=(1, length, k), **opts)
    f.create_dataset("tail_log_normalizer_residual", (n, length, g), np.int32, chunks=(1, length, g), **opts)
    f.create_dataset("tail_log_normalizer_slope", (n, length, g), np.float16, chunks=(1, length, g), **opts)


def _write_attrs(f: h5py.File, layout: CacheLayout, **extra) -> None:
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["top_k"] = layout.top_k
    f.attrs["vocab_size"] = layout.vocab_size
    f.attrs["betas"] = layout.betas.astype(np.float64)
    f.attrs["temperature_range"] = np.array([1.0 / layout.betas[-1], 1.0 / layout.betas[0]])
    f.attrs["log_normalizer_quantum"] = LOG_NORMALIZER_QUANTUM
    f.attrs["fingerprint"] = json.dumps(layout.fingerprint, sort_keys=True)
    for key, value in extra.items():
        f.attrs[key] = value


def _assemble(
    path: Path,
    partial: Path,
    input_ids: np.ndarray,
    batch_starts: list[int],
    layout: CacheLayout,
    shard: tuple[int, int] | None,
    offset: int,
    total: int,
    compression: int,
    info: dict,
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    max_error = 0.0
    with h5py.File(tmp, "w") as f:
        _create_datasets(f, len(input_ids), layout, compression)
        f["input_ids"][...] = input_ids
        for s in batch_starts:
            batch_file = partial / f"batch-{s:09d}.npz"
            try:
                with np.load(batch_file) as part:
                    arrays = {key: part[key] for key in (*STORED[1:], "max_error")}
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                batch_file.unlink(missing_ok=True)
                raise UserError(
                    f"{batch_file}: damaged batch file ({e}); it was removed: run the same command again "
                    "to recompute that batch and finish the cache"
                ) from None
            sl = slice(s - offset, s - offset + len(arrays["topk_logits"]))
            for key in STORED[1:]:
                f[key][sl] = arrays[key]
            max_error = max(max_error, float(arrays["max_error"]))
        _write_attrs(
            f,
            layout,
            log_normalizer_max_error=max_error,
            sequence_offset=offset,
            total_sequences=total,
            shard=np.array(shard if shard else (0, 1)),
            **info,
        )
        f.attrs["complete"] = True  # set last: a file without it was never finished
    os.replace(tmp, path)


def shard_files(path: str | Path) -> list[Path]:
    """The shard files ``<stem>.shard-I-of-N<suffix>`` next to ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))


def merge_shards(path: str | Path) -> Path:
    """Write ``path`` as an HDF5 file of virtual datasets over its shard files, so that the
    shards read as one cache (with kdsweep or plain h5py). The shards stay where they are;
    the virtual file names them relative to its own directory, so the directory can move."""
    path = Path(path)
    shards = shard_files(path)
    if not shards:
        raise UserError(
            f"{path}: no shard files {path.stem}.shard-I-of-N{path.suffix} next to it; "
            "generate them with `kdsweep cache generate --shard I/N`"
        )
    heads = sorted(((int(c.attrs["sequence_offset"]), c) for c in map(TeacherLogitCache, shards)), key=lambda t: t[0])
    first = heads[0][1]
    n_shards, total = int(first.attrs["shard"][1]), int(first.attrs["total_sequences"])
    if len(heads) != n_shards:
        have = sorted(int(c.attrs["shard"][0]) for _, c in heads)
        missing = sorted(set(range(n_shards)) - set(have))
        raise UserError(
            f"{path}: found {len(heads)} of {n_shards} shards (missing {missing}); generate them with "
            f"`kdsweep cache generate --shard I/{n_shards}`"
        )
    for _, c in heads:
        if c.fingerprint != first.fingerprint:
            raise UserError(
                f"{c.path}: fingerprint differs from {first.path}: "
                + "; ".join(diff_fingerprints(c.fingerprint, first.fingerprint))
            )
        if not np.array_equal(c.betas, first.betas) or int(c.attrs["shard"][1]) != n_shards:
            raise UserError(f"{c.path}: temperature grid or shard count differs from {first.path}; regenerate it")
    expected = 0
    for off, c in heads:
        if off != expected:
            raise UserError(
                f"{c.path}: starts at sequence {off}, expected {expected}; shards overlap or one is missing"
            )
        expected += c.num_sequences
    if expected != total:
        raise UserError(f"{path}: shards cover {expected} of {total} sequences")
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        for key in STORED:
            src = first.file[key]
            layout = h5py.VirtualLayout(shape=(total,) + src.shape[1:], dtype=src.dtype)
            for off, c in heads:
                n = c.num_sequences
                # Relative to the virtual file's directory (the reader sets that as the prefix).
                layout[off : off + n] = h5py.VirtualSource(c.path.name, key, shape=(n,) + src.shape[1:])
            fill = _VDS_FILL[key]
            f.create_virtual_dataset(key, layout, fillvalue=np.iinfo(src.dtype).max if fill is None else fill)
        for attr, value in first.file.attrs.items():
            if attr != "complete":
                f.attrs[attr] = value
        f.attrs["shard"] = np.array((0, 1))
        f.attrs["sequence_offset"] = 0
        f.attrs["log_normalizer_max_error"] = max(float(c.attrs["log_normalizer_max_error"]) for _, c in heads)
        f.attrs["shards"] = json.dumps([c.path.name for _, c in heads])
        f.attrs["complete"] = True
    for _, c in heads:
        c.close()
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- reader
def _refuse(path: Path, problem: str) -> UserError:
    return UserError(
        f"{path}: {problem}; check it with `kdsweep cache verify {path}`, then delete it and re-run "
        "`dvc repro teacher_logits` (or `kdsweep cache generate` with the same options)"
    )


class TeacherLogitCache:
    """Random access to a finished cache by sequence, decoded to the arrays of :data:`DATASETS`.

    Reads one chunk (= one sequence) per dataset with HDF5's low-level read into
    preallocated buffers: per-item fancy indexing is ~10x slower (FACTS.md), and h5py's
    high-level ``read_direct`` spends more time building selections than decompressing.
    ``in_memory=True`` decodes the whole file once at open. The file is opened lazily
    again in each process, so the object can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid = None
        self._dsets: dict | None = None
        f = self.file
        if not f.attrs.get("complete", False):
            raise UserError(
                f"{self.path}: incomplete teacher-logit cache (generation did not finish); "
                "re-run `dvc repro teacher_logits` (or `kdsweep cache generate` with the same options) to resume it"
            )
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise UserError(
                f"{self.path}: cache format version {version}, this kdsweep reads {FORMAT_VERSION}; "
                "regenerate it with `dvc repro teacher_logits`"
            )
        self.attrs = dict(f.attrs)
        self.top_k = int(f.attrs["top_k"])
        self.vocab_size = int(f.attrs["vocab_size"])
        self.betas = np.asarray(f.attrs["betas"], dtype=np.float64)
        self.fingerprint = json.loads(f.attrs["fingerprint"])
        self.num_sequences, self.seq_len = f["input_ids"].shape
        self.shards = json.loads(f.attrs.get("shards", "[]"))
        for name in self.shards:
            self._check_shard(self.path.parent / name)
        self._arrays = self._decode(self._read_all()) if in_memory else None

    def _check_shard(self, shard: Path) -> None:
        if not shard.is_file():
            raise UserError(
                f"{self.path}: merged cache, but its shard {shard} is missing; copy the shard files "
                "next to it (they are read from there) or re-run `kdsweep cache merge`"
            )
        try:
            with h5py.File(shard, "r") as s:
                complete, fp = bool(s.attrs.get("complete", False)), json.loads(s.attrs.get("fingerprint", "{}"))
        except OSError as e:
            raise _refuse(shard, f"shard of {self.path.name} is not a readable HDF5 file ({e})") from None
        if not complete:
            raise UserError(
                f"{shard}: shard of {self.path.name} is incomplete; resume it with "
                "`kdsweep cache generate --shard I/N`, then run `kdsweep cache merge` again"
            )
        if fp != self.fingerprint:
            raise UserError(
                f"{shard}: shard made from other inputs than {self.path.name}: "
                + "; ".join(diff_fingerprints(fp, self.fingerprint))
                + "; regenerate it and merge again"
            )

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():  # reopen in each DataLoader worker
            try:
                self._file = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise UserError(
                    f"{self.path}: teacher-logit cache not found; run `dvc repro teacher_logits` "
                    "(or `kdsweep cache generate`)"
                ) from None
            except OSError as e:
                raise _refuse(self.path, f"not a readable HDF5 file ({e}): it is truncated or corrupt") from None
            self._pid = os.getpid()
            self._dsets = None
        return self._file

    def _sources(self) -> dict[str, tuple]:
        """name -> (dataset, row shape, dtype, memory space of one row, file space, memory type), all
        built once per process: h5py recomputes shapes and types on every access otherwise. The
        datasets are opened with the file's own directory as the prefix of virtual sources
        (merged files), whatever the working directory."""
        f = self.file
        if self._dsets is None:
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_virtual_prefix(str(self.path.resolve().parent).encode() + b"/")
            self._dsets = {}
            for key in STORED:
                ds = h5py.Dataset(h5py.h5d.open(f.id, key.encode(), dapl=dapl))
                row = tuple(ds.shape[1:])
                self._dsets[key] = (
                    ds,
                    row,
                    ds.dtype,
                    h5py.h5s.create_simple((1,) + row),
                    ds.id.get_space(),
                    h5py.h5t.py_create(ds.dtype),
                )
        return self._dsets

    def datasets(self) -> dict[str, h5py.Dataset]:
        """The stored datasets (:data:`STORED`) as h5py objects, merged files included."""
        return {key: src[0] for key, src in self._sources().items()}

    @property
    def temperature_range(self) -> tuple[float, float]:
        return 1.0 / self.betas[-1], 1.0 / self.betas[0]

    def check_temperature(self, temperature: float, key: str = "loss.temperature") -> None:
        lo, hi = self.temperature_range
        if not lo - 1e-9 <= temperature <= hi + 1e-9:
            raise UserError(
                f"{key}: {temperature} is outside the temperature range [{lo:g}, {hi:g}] of {self.path}; "
                "pick a temperature in range or widen teacher.temperature_range and regenerate the cache"
            )

    def check_fingerprint(self, expected: dict) -> None:
        diffs = diff_fingerprints(self.fingerprint, expected)
        if diffs:
            raise UserError(
                f"{self.path}: teacher-logit cache was made from different inputs:\n  "
                + "\n  ".join(diffs)
                + "\nregenerate it with `dvc repro teacher_logits`"
            )

    def read_stored(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The stored (coded) arrays of the given sequences, (B, L, ...) each, as in :data:`STORED`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"{self.path}: sequence index out of range [0, {self.num_sequences})")
        out = {}
        rows = idx.tolist()
        try:
            for key, (ds, row_shape, dtype, mspace, fspace, mtype) in self._sources().items():
                buf = np.empty((len(rows),) + row_shape, dtype=dtype)
                rest = (0,) * len(row_shape)
                count = (1,) + row_shape
                read = ds.id.read
                for r, i in enumerate(rows):
                    fspace.select_hyperslab((i,) + rest, count)
                    read(mspace, fspace, buf[r : r + 1], mtype)
                out[key] = buf
        except OSError as e:
            raise _refuse(
                self.path,
                f"cannot read sequences {idx[:8].tolist()}: a chunk fails its fletcher32 "
                f"checksum or decompression ({e})",
            ) from None
        return out

    def _read_all(self) -> dict[str, np.ndarray]:
        """Every stored array, whole (``in_memory``)."""
        try:
            return {key: ds[...] for key, ds in self.datasets().items()}
        except OSError as e:
            raise _refuse(self.path, f"cannot read ({e})") from None

    def _decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "input_ids": stored["input_ids"],
            "topk_ids": deltas_to_ids(stored["topk_id_deltas"]),
            "topk_logits": stored["topk_logits"],
            "tail_log_normalizer": decode_log_normalizer(
                stored["tail_log_normalizer_residual"], stored["tail_log_normalizer_slope"], self.betas
            ),
            "log_normalizer_slope": stored["tail_log_normalizer_slope"],
        }

    @staticmethod
    def _pack(decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """t and the top-k logits side by side, as :func:`log_normalizer` takes them (torch
        converts float16 ~5x faster than numpy)."""
        out = dict(decoded)
        tail, logits = torch.from_numpy(out.pop("tail_log_normalizer")), torch.from_numpy(out["topk_logits"])
        out["log_normalizer"] = torch.cat([tail, logits.float()], dim=-1).numpy()
        return out

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The arrays of :data:`DATASETS` for the given sequences, stacked: (B, L, ...) each.

        ``input_ids`` int32 (B, L); ``topk_ids`` int32 (B, L, k), ascending per position;
        ``topk_logits`` float16 (B, L, k), max 0; ``log_normalizer`` float32 (B, L, G + k) and
        ``log_normalizer_slope`` float16 (B, L, G): pass them to :func:`log_normalizer` for
        f(1/T). (``log_normalizer[..., :G]`` is the tail's t at the grid :attr:`betas`,
        ``log_normalizer_slope`` its slope, ``log_normalizer[..., G:]`` the top-k logits.)
        """
        if self._arrays is not None:
            idx = np.asarray(indices)
            return self._pack({key: arr[idx] for key, arr in self._arrays.items()})
        return self._pack(self._decode(self.read_stored(indices)))

    def close(self) -> None:
        self._dsets = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # picklable for DataLoader workers: reopen there
        state = self.__dict__.copy()
        state["_file"] = None
        state["_dsets"] = None
        return state


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
