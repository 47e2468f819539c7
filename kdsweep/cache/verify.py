"""Checking and describing cache files (``kdsweep cache verify`` and ``kdsweep cache inspect``).

    verify_cache(path):
        open it (the reader refuses a missing, truncated, incomplete or damaged file)
        read every chunk (HDF5 checks each chunk's fletcher32 on read); name each sequence that fails
        check every readable position: ids in range and ascending, logits finite and <= 0 with max 0,
            tail finite and below the top-k, top-k mass <= 1 at T = 1 and the range ends
        the stored interpolation error bound <= MAX_INTERPOLATION_ERROR
        (self-normalised sampled caches: no grid; the stored log q error bound <= what the stored codes
        allow and <= MAX_LOG_PROB_ERROR, and with the teacher log q against a fresh forward instead of top-1)
        with --params: the fingerprint and the stored input ids against the config and prepared data
        with the teacher at hand: top-1 agreement with a fresh forward on a sample of sequences
        report every check; raise one UserError listing every failed one and the fix
    inspect_cache(path): shapes, filters, sizes, top-k mass histogram, error bound, fingerprint

Both read any cache file, merged or not, and need no params.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from kdsweep.cache.fingerprint import diff_fingerprints, expected_fingerprint
from kdsweep.cache.format import (
    MAX_INTERPOLATION_ERROR,
    METADATA_CHECKSUMS,
    Q8_LEVELS,
    TAIL_FLOOR,
    log_normalizer,
    teacher_topk_probs,
)
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.config import load_params
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.models import POINTER, default_device, load_causal_lm, resolve_dtype, teacher_identity, teacher_source

TOP1_TIE = 0.05  # logits this close to the max count as a tie for the top-1 agreement check
MIN_TOP1_AGREEMENT = 0.99
FRESH_SLACK_FACTOR, FRESH_SLACK = 1.5, 1e-5  # a stored bound vs a fresh forward (see _bound_against_fresh)
SAMPLED_AGREEMENT = 1e-2  # sampled caches: |p_cache - p_fresh| at every sampled id within this
MASS_TOLERANCE = 2e-3  # top-k mass may exceed 1 by this much (float16 logits, interpolation)
MAX_VALUE_ERROR = 1e-2  # version 3: the largest |p_cache - p| of a bucket the writer may have measured
LISTED_SEQUENCES = 20  # unreadable sequences named one by one; the rest are counted
# Self-normalised sampled caches: the largest |log q_cache - log q| the writer may have measured. A log
# q error e moves a weight's log by at most 2 |a - 1| e and log p^_T by at most (a + |a - 1|) e, a = tau/T.
MAX_LOG_PROB_ERROR = 0.1

Report = Callable[[str], object]

SANITY = (
    "input_ids in [0, vocab_size)",
    "top-k ids < vocab_size and strictly ascending",
    "top-k logits finite and <= 0, the largest exactly 0 (logits minus the max)",
    "tail log-normaliser and slopes finite",
    "tail below the top-k (t(b) <= log(V - k) + b * min top-k logit; t' <= min top-k logit)",
)
SAMPLED_CHECK = "sampled: counts sum to sample_draws, kept slots first"
SELF_NORMALIZED_SANITY = (
    SANITY[0],
    "sampled ids < vocab_size and strictly ascending",
    "log q finite and <= 0, the kept ids' q sum to <= 1 + tolerance (the stored bound's)",
    SAMPLED_CHECK,
)


class Scan(NamedTuple):
    """What reading every chunk found: failed checks, and the sequences that cannot be read."""

    problems: list[str]
    unreadable: dict[int, list[str]]  # sequence -> the datasets whose chunk fails
    value_bound: float  # the largest probability error the stored values allow (see value_error_bound);
    # self-normalised sampled caches: the largest log q error their codes allow (see _half_steps)


class Candidate(NamedTuple):
    """Where the teacher might be loaded from, and whether its identity must match the fingerprint first."""

    source: str
    check_identity: bool


class Agreement(NamedTuple):
    """The top-1 check: fraction of positions whose stored top-1 is the fresh forward's (ties within
    TOP1_TIE count), the largest |p_cache - p_fresh| over the top-k, and the positions checked."""

    fraction: float
    max_dp: float
    positions: int


# --------------------------------------------------------------------------- shared
def _readable(n: int, unreadable: dict | None = None) -> list[int]:
    return [i for i in range(n) if not unreadable or i not in unreadable]


def _sample_indices(n: int, count: int, unreadable: dict | None = None) -> list[int]:
    """About ``count`` sequences spread evenly over the readable ones, the first and last included."""
    readable = _readable(n, unreadable)
    picks = np.linspace(0, len(readable) - 1, min(len(readable), count)).round().astype(int)
    return sorted({readable[p] for p in picks.tolist()})


def _fingerprint_lines(fingerprint: dict) -> list[str]:
    return [f"    {key}: {json.dumps(value, sort_keys=True)}" for key, value in sorted(fingerprint.items())]


def _display_temperature(c: TeacherLogitCache) -> float:
    """T = 1 when the cache covers it, else the lowest temperature it does."""
    lo, hi = c.temperature_range
    return 1.0 if lo <= 1.0 <= hi else lo


# --------------------------------------------------------------------------- inspect
def _file_bytes(cache: TeacherLogitCache) -> int:
    return cache.path.stat().st_size + sum((cache.path.parent / s).stat().st_size for s in cache.shards)


def _filters(ds: h5py.Dataset) -> str:
    parts = []
    if ds.compression:
        parts.append(f"{ds.compression}({ds.compression_opts})")
    if ds.shuffle:
        parts.append("shuffle")
    if ds.fletcher32:
        parts.append("fletcher32")
    return "+".join(parts) or "none"


def _histogram(values: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()), 1)
    return [
        f"  [{lo:.1f}, {hi:.1f}{']' if i == bins - 1 else ')'} {'#' * round(width * c / top):<{width}} "
        f"{c / len(values):6.1%}"
        for i, (lo, hi, c) in enumerate(zip(edges[:-1], edges[1:], counts))
    ]


def _dataset_lines(c: TeacherLogitCache, tokens: int) -> list[str]:
    """One table row per stored dataset: shape, dtype, chunks, filters and stored bytes per token."""
    lines = [f"  {'dataset':<30}{'shape':<17}{'dtype':<9}{'chunks':<15}{'filters':<28}bytes/token"]
    shards = [h5py.File(c.path.parent / name, "r") for name in c.shards]
    try:
        for key, ds in c.datasets().items():
            # A merged file's datasets are virtual: their bytes are in the shards.
            stored = sum(sh[key].id.get_storage_size() for sh in shards) if ds.is_virtual else ds.id.get_storage_size()
            src = shards[0][key] if ds.is_virtual else ds
            lines.append(
                f"  {key:<30}{str(ds.shape):<17}{ds.dtype.name:<9}{str(src.chunks):<15}{_filters(src):<28}"
                f"{stored / tokens:.1f}"
            )
    finally:
        for sh in shards:
            sh.close()
    return lines


def _kept(c: TeacherLogitCache) -> str:
    if c.mode == "topk":
        return f"top-{c.top_k}"
    return f"the unique ids of {int(c.attrs['sample_draws'])} draws at T = {c.sample_temperature:g}"


def _mean_unique(c: TeacherLogitCache, idx: list[int]) -> float:
    """Sampled caches: the mean number of unique ids per position over sequences ``idx``."""
    return float((c.read(idx)["sample_counts"] > 0).sum(-1).mean())


def inspect_cache(path: Path, sample: int = 256) -> str:
    """The report of ``kdsweep cache inspect``."""
    c = TeacherLogitCache(path)
    n, length, k = c.num_sequences, c.seq_len, c.top_k
    tokens = n * length
    size = _file_bytes(c)
    weights = ", self-normalised weights (log q at the sampled ids, no normaliser)" if c.self_normalized else ""
    grid = "no temperature grid" if c.self_normalized else f"{len(c.betas)} temperature grid points"
    lines = [
        f"{path}: teacher-logit cache, format version {c.attrs['format_version']}, complete; "
        f"mode {c.mode}, {c.values} values{weights}",
        f"  {n} sequences x {length} tokens = {tokens:,} tokens; {_kept(c)} of {c.vocab_size:,} tokens; {grid}",
    ]
    if c.shards:
        lines.append(f"  merged (virtual datasets) over {len(c.shards)} shards: {', '.join(c.shards)}")
    if c.mode == "topk":
        size_line = (
            f"  file size {size:,} bytes: {size / tokens / k:.3f} bytes per logit, {size / tokens:.1f} bytes per "
            "token (ids, values and per-token extras all counted)"
        )
    else:
        unique = _mean_unique(c, _sample_indices(n, sample))
        size_line = (
            f"  file size {size:,} bytes: {size / tokens:.1f} bytes per token (everything counted); "
            f"{unique:.1f} unique sampled ids per position on average: {size / tokens / unique:.3f} bytes per id"
        )
    lines += [size_line, "", *_dataset_lines(c, tokens)]
    lines += _self_normalized_lines(c, _sample_indices(n, sample)) if c.self_normalized else _grid_lines(c, sample)
    lines += [
        f"  teacher ran in {c.attrs.get('teacher_dtype', '?')} on {c.attrs.get('device', '?')}",
        "",
        "  fingerprint:",
        *_fingerprint_lines(c.fingerprint),
    ]
    c.close()
    return "\n".join(lines)


def _self_normalized_lines(c: TeacherLogitCache, idx: list[int]) -> list[str]:
    """Inspect: the sampled ids' proposal mass and the stored log q bound of a self-normalised cache."""
    batch = c.read(idx)
    mass = np.where(batch["sample_counts"] > 0, np.exp(batch["sample_log_probs"]), 0.0).sum(-1).reshape(-1)
    return [
        "",
        f"  sampled ids' probability mass at the proposal T={c.sample_temperature:g} ({len(idx)} sequences, "
        f"{mass.size:,} positions): mean {mass.mean():.3f}, median {np.median(mass):.3f}, min {mass.min():.3f}",
        *_histogram(mass),
        "",
        f"  KD temperatures: any T > 0 (self-normalised weights: exact at T = {c.sample_temperature:g}, "
        "biased elsewhere, consistent as the draws grow)",
        f"  log q error bound (measured by the writer, log space): {float(c.attrs['log_prob_max_error']):.2e}",
        f"  probability error bound (measured by the writer, any sampled id): {float(c.attrs['value_max_error']):.2e}",
    ]


def _grid_lines(c: TeacherLogitCache, sample: int) -> list[str]:
    """Inspect: the kept ids' mass, the temperature range and the stored bounds of a cache with a grid."""
    n, k = c.num_sequences, c.top_k
    lo, hi = c.temperature_range
    t_hist = _display_temperature(c)
    idx = _sample_indices(n, sample)
    mass = teacher_topk_probs(c.read(idx), c.betas, t_hist)[0].sum(-1).reshape(-1).numpy()
    return [
        "",
        f"  {f'top-{k}' if c.mode == 'topk' else 'sampled ids'} probability mass at T={t_hist:g} "
        f"({len(idx)} sequences, {mass.size:,} positions): "
        f"mean {mass.mean():.3f}, median {np.median(mass):.3f}, min {mass.min():.3f}",
        *_histogram(mass),
        "",
        f"  temperature range [{lo:g}, {hi:g}] (b = 1/T on a uniform grid of {len(c.betas)} points)",
        f"  log-normaliser interpolation error bound (measured by the writer, log space): "
        f"{float(c.attrs['log_normalizer_max_error']):.2e}; "
        f"quantum {float(c.attrs['log_normalizer_quantum']):.2e}",
        *(
            [f"  probability error bound (measured by the writer, any bucket): {float(c.attrs['value_max_error']):.2e}"]
            if "value_max_error" in c.attrs
            else []
        ),
    ]


# --------------------------------------------------------------------------- verify: every chunk, every position
def _read_block(dsets: dict[str, h5py.Dataset], a: int, b: int) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Sequences [a, b) of every dataset, and {sequence: datasets whose chunk fails} for those that
    cannot be read; a block with a bad chunk is read again sequence by sequence to find it."""
    try:
        return {key: ds[a:b] for key, ds in dsets.items()}, {}
    except OSError:
        pass
    rows, bad = [], {}
    for i in range(a, b):
        row, failed = {}, []
        for key, ds in dsets.items():
            try:
                row[key] = ds[i : i + 1]
            except OSError:
                failed.append(key)
        if failed:
            bad[i] = failed
        else:
            rows.append(row)
    if not rows:
        return None, bad
    return {key: np.concatenate([r[key] for r in rows]) for key in dsets}, bad


def _position_checks(c: TeacherLogitCache, st: dict[str, np.ndarray], betas_checked: list[float]) -> dict:
    """{check name: (B, L) mask of the positions failing it} for the stored arrays ``st``."""
    v, k, betas = c.vocab_size, c.top_k, c.betas
    deltas = st["topk_id_deltas" if c.mode == "topk" else "sample_id_deltas"].astype(np.int64)
    decoded = c.decode(st)
    ids, s = decoded["topk_ids"].astype(np.int64), decoded["topk_logits"].astype(np.float32)
    kept = decoded["sample_counts"] > 0 if c.mode == "sampled" else np.ones(s.shape, dtype=bool)
    slope = st["tail_log_normalizer_slope"].astype(np.float32)
    t = decoded["tail_log_normalizer"]
    s_min = np.where(kept, s, 0).min(-1, keepdims=True)
    live = t > TAIL_FLOOR  # a floored (negligible or empty) tail has nothing to check
    slack = np.abs(s_min) * 2.0**-10 + 1e-3  # float16 rounding of the smallest kept logit
    s_max = np.where(kept, s, -np.inf).max(-1)
    with np.errstate(invalid="ignore"):
        checks = {
            SANITY[0]: (st["input_ids"] < 0) | (st["input_ids"] >= v),
            SANITY[1]: (ids[..., 0] < 0) | (ids[..., -1] >= v) | ((deltas[..., 1:] < 1) & kept[..., 1:]).any(-1),
            SANITY[2]: ~np.isfinite(s).all(-1) | (s > 0).any(-1) | ((s_max != 0) if c.mode == "topk" else False),
            SANITY[3]: ~np.isfinite(t).all(-1) | ~np.isfinite(slope).all(-1),
            SANITY[4]: (live & ((t > np.log(max(v - k, 1)) + betas * s_min + slack) | (slope > s_min + slack))).any(-1),
        }
    if c.mode == "sampled":  # a sample need not hold the largest logits: its tail may be above it
        checks[SANITY[4]] = np.zeros(s.shape[:-1], dtype=bool)
    if c.mode == "sampled":
        draws = decoded["sample_counts"].astype(np.int64).sum(-1)
        checks[SAMPLED_CHECK] = (draws != int(c.attrs["sample_draws"])) | (kept[..., 1:] & ~kept[..., :-1]).any(-1)
    values = torch.from_numpy(np.concatenate([t, np.nan_to_num(s)], -1))
    over = np.zeros(s.shape[:-1], dtype=bool)
    for beta in betas_checked:
        lse = log_normalizer(values, torch.from_numpy(slope), betas, beta)
        over |= (torch.exp(torch.logsumexp(values[..., len(betas) :] * beta, -1) - lse) > 1 + MASS_TOLERANCE).numpy()
    checks[_mass_check(betas_checked)] = over
    return checks


def _self_normalized_checks(c: TeacherLogitCache, st: dict[str, np.ndarray]) -> dict:
    """{check name: (B, L) mask of the positions failing it} for a self-normalised sampled cache."""
    decoded = c.decode(st)
    deltas = st["sample_id_deltas"].astype(np.int64)
    ids, counts = decoded["topk_ids"].astype(np.int64), decoded["sample_counts"].astype(np.int64)
    kept = counts > 0
    log_q = np.where(kept, decoded["sample_log_probs"], 0.0)
    tolerance = np.exp(float(c.attrs["log_prob_max_error"])) + MASS_TOLERANCE
    with np.errstate(invalid="ignore", over="ignore"):
        mass = np.where(kept, np.exp(log_q), 0.0).sum(-1)
        return {
            SELF_NORMALIZED_SANITY[0]: (st["input_ids"] < 0) | (st["input_ids"] >= c.vocab_size),
            SELF_NORMALIZED_SANITY[1]: (ids[..., 0] < 0)
            | (ids[..., -1] >= c.vocab_size)
            | ((deltas[..., 1:] < 1) & kept[..., 1:]).any(-1),
            SELF_NORMALIZED_SANITY[2]: ~np.isfinite(log_q).all(-1) | (log_q > 0).any(-1) | ~(mass <= tolerance),
            SAMPLED_CHECK: (counts.sum(-1) != int(c.attrs["sample_draws"])) | (kept[..., 1:] & ~kept[..., :-1]).any(-1),
        }


def _mass_check(betas_checked: list[float]) -> str:
    temperatures = ", ".join(f"{1 / b:g}" for b in reversed(betas_checked))
    return f"top-k probabilities sum to <= 1 + {MASS_TOLERANCE:g} at T = {temperatures}"


def _unreadable_line(unreadable: dict[int, list[str]]) -> str:
    named = [f"{i} ({', '.join(keys)})" for i, keys in sorted(unreadable.items())[:LISTED_SEQUENCES]]
    more = len(unreadable) - len(named)
    return (
        "checksums: sequences that cannot be read, a chunk failing its fletcher32 checksum or decompression: "
        + ", ".join(named)
        + (f" and {more} more" if more else "")
    )


def _scan(c: TeacherLogitCache, report: Report) -> Scan:
    """Read every chunk (HDF5 checks each chunk's fletcher32 on read) and check every readable position."""
    dsets = c.datasets()
    bad: dict[str, int] = {}
    unreadable: dict[int, list[str]] = {}
    betas = c.betas
    betas_checked = (
        []
        if c.self_normalized
        else sorted({float(betas[0]), float(betas[-1])} | ({1.0} if betas[0] <= 1.0 <= betas[-1] else set()))
    )
    block = max(1, 8192 // c.seq_len)
    value_bound = 0.0
    for a in range(0, c.num_sequences, block):
        st, failed = _read_block(dsets, a, min(a + block, c.num_sequences))
        unreadable |= failed
        if st is None:
            continue
        if c.self_normalized:
            value_bound = max(value_bound, float(np.where(st["sample_counts"] > 0, _half_steps(c, st), 0).max()))
        elif "value_max_error" in c.attrs:
            value_bound = max(value_bound, value_error_bound(c, st))
        checks = _self_normalized_checks(c, st) if c.self_normalized else _position_checks(c, st, betas_checked)
        for name, mask in checks.items():
            if mask.any():
                bad[name] = bad.get(name, 0) + int(mask.sum())
    chunks = len(dsets) * c.num_sequences - sum(len(keys) for keys in unreadable.values())
    if unreadable:
        report(f"  checksums: FAILED: {chunks:,} chunks read; sequences that cannot be read: {len(unreadable):,}")
    else:
        report(f"  checksums: {chunks:,} chunks read, fletcher32 verified")
    positions = c.num_sequences * c.seq_len
    names = (*SANITY, *((SAMPLED_CHECK,) if c.mode == "sampled" else ()), _mass_check(betas_checked))
    if c.self_normalized:
        names = SELF_NORMALIZED_SANITY
    for name in names:
        report(f"  sanity: {name}: " + (f"FAILED at {bad[name]:,} of {positions:,} positions" if name in bad else "ok"))
    problems = [_unreadable_line(unreadable)] if unreadable else []
    return Scan(
        problems + [f"sanity: {name}: fails at {n:,} of {positions:,} positions" for name, n in bad.items()],
        unreadable,
        value_bound,
    )


def _half_steps(c: TeacherLogitCache, st: dict[str, np.ndarray], s: np.ndarray | None = None) -> np.ndarray:
    """(B, L, k) how far each stored logit (self-normalised: log q) may be from the teacher's: half a q8
    step (code c: |low| (c + 1/4) / 255^2, plus float16 rounding of low), or float16 rounding of the
    value itself (``s``, the decoded logits; a self-normalised cache's own)."""
    prefix = "topk" if c.mode == "topk" else "sample"
    name = f"{prefix}_log_prob" if c.self_normalized else f"{prefix}_logit"
    if c.values == "q8":
        low = np.abs(st[f"{name}_min"].astype(np.float64))[..., None]
        codes = st[f"{name}_codes"].astype(np.float64)
        return low * (codes + 0.25) / Q8_LEVELS**2 + low * 2.0**-10
    if c.self_normalized:
        s = st["sample_log_probs"].astype(np.float64)
    return np.abs(s) * 2.0**-11


def value_error_bound(c: TeacherLogitCache, st: dict[str, np.ndarray]) -> float:
    """The largest |p_cache - p| over the buckets that the stored data allow, at the points the writer measured.

    A stored logit is within h_i of the teacher's (:func:`_half_steps`), so f is within b H + eps
    (H = max h_i, eps = the stored normaliser bound) and each log-probability within
    d_i = b (h_i + H) + eps; so |p_cache,i - p_i| <= p_cache,i (exp(d_i) - 1), and the tail's error, the
    negative sum of the others' (both sum to 1), at most their sum. The writer's measured
    ``value_max_error`` can never exceed this; a larger one was not measured on this data.
    """
    decoded = c.decode(st)
    s = decoded["topk_logits"].astype(np.float64)
    kept = decoded["sample_counts"] > 0 if c.mode == "sampled" else np.ones(s.shape, dtype=bool)
    h = np.where(kept, _half_steps(c, st, s), 0.0)
    big_h = h.max(-1, keepdims=True)
    eps = float(c.attrs["log_normalizer_max_error"])
    values = torch.from_numpy(np.concatenate([decoded["tail_log_normalizer"], s.astype(np.float32)], -1))
    slopes = torch.from_numpy(st["tail_log_normalizer_slope"])
    betas = c.betas
    points = np.concatenate([betas, 0.5 * (betas[:-1] + betas[1:])])
    worst = 0.0
    for beta in points.tolist():
        f = log_normalizer(values, slopes, betas, beta).double().numpy()[..., None]
        p = np.where(kept, np.exp(beta * s - f), 0.0)
        worst = max(worst, float((p * np.expm1(beta * (h + big_h) + eps)).sum(-1).max()))
    return worst


# --------------------------------------------------------------------------- verify: against the teacher
def _teacher_candidates(c: TeacherLogitCache, teacher: str | None) -> list[Candidate]:
    if teacher is not None:
        return [Candidate(teacher, False)]
    ident = c.fingerprint.get("teacher", {})
    if ident.get("model") != "embedded":
        return [Candidate(ident["model"], False)] if ident.get("model") else []
    return [Candidate(str(p), True) for p in (c.path.parent / "teacher", Path("models/teacher")) if p.is_dir()]


def _load_teacher_for(c: TeacherLogitCache, teacher: str | None, report: Report):
    """(the teacher that made the cache, where it came from), on the default device (bf16 on a capable
    GPU), or (None, None) with the reason reported."""
    device = default_device()
    dtype = resolve_dtype("auto", device)
    for cand, check in _teacher_candidates(c, teacher):
        p = Path(cand)
        try:
            if check and teacher_identity(p) != c.fingerprint.get("teacher"):
                report(f"  teacher: {p} holds another teacher than the fingerprint names; skipped")
                continue
            if p.is_dir() and (p / POINTER).is_file():  # a teacher stage's pointer to a hub/local model
                src = teacher_source(p)
                model = load_causal_lm(src["model"], revision=src.get("revision"), dtype=dtype)
            else:
                revision = None if teacher is not None else c.fingerprint.get("teacher", {}).get("revision")
                model = load_causal_lm(cand, revision=revision, dtype=dtype)
            return model.to(device).eval(), cand
        except UserError as e:
            report(f"  teacher: {cand} not available ({str(e).splitlines()[0][:160]})")
    return None, None


def _top1_agreement(c: TeacherLogitCache, model, idx: list[int]) -> Agreement:
    """Stored top-1 against a fresh forward of ``model`` on sequences ``idx``, at the display temperature."""
    batch = c.read(idx)
    t = _display_temperature(c)
    with torch.no_grad():
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[..., : c.vocab_size].float().cpu()
    top_ids = torch.as_tensor(batch["topk_ids"].astype(np.int64))
    vals = torch.as_tensor(batch["topk_logits"]).float()
    stored_top1 = top_ids.gather(-1, vals.argmax(-1, keepdim=True))
    fresh_max = logits.max(-1).values
    agree = logits.gather(-1, stored_top1).squeeze(-1) >= fresh_max - TOP1_TIE
    p_cache, _ = teacher_topk_probs(batch, c.betas, t)
    p_fresh = torch.softmax(logits / t, -1).gather(-1, top_ids)
    dp = (p_cache - p_fresh).abs()
    if c.mode == "sampled":  # a sample's largest need not be the top-1: its probabilities must agree instead
        dp = dp.masked_fill(torch.as_tensor(batch["sample_counts"]) == 0, 0)
        agree = dp.max(-1).values <= SAMPLED_AGREEMENT
    return Agreement(float(agree.float().mean()), float(dp.max()), int(agree.numel()))


def _fresh_log_q_error(c: TeacherLogitCache, model, idx: list[int]) -> tuple[float, int]:
    """Self-normalised sampled caches: the largest |log q_cache - log q_fresh| over the sampled ids of
    sequences ``idx``, q_fresh from a fresh forward at the proposal temperature; and the positions checked."""
    batch = c.read(idx)
    with torch.no_grad():
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[..., : c.vocab_size].float().cpu()
    fresh = torch.log_softmax(logits.double() / c.sample_temperature, -1)
    fresh = fresh.gather(-1, torch.as_tensor(batch["topk_ids"].astype(np.int64)))
    error = (torch.as_tensor(batch["sample_log_probs"]).double() - fresh).abs()
    return float(error.masked_fill(torch.as_tensor(batch["sample_counts"]) == 0, 0).max()), int(error[..., 0].numel())


def _check_fresh_log_q(c: TeacherLogitCache, model, source: str, idx: list[int], report: Report) -> list[str]:
    """A self-normalised cache's stored log q against a fresh forward, within its stored bound (plus the
    slack of :func:`_bound_against_fresh`): a cache of another teacher, or a bound altered to claim more
    precision than the codes have, fails."""
    error, positions = _fresh_log_q_error(c, model, idx)
    stored = float(c.attrs["log_prob_max_error"])
    ok = error <= FRESH_SLACK_FACTOR * stored + FRESH_SLACK
    report(
        f"  log q agreement with a fresh forward of {source}: max |log q_cache - log q_fresh| {error:.2e} over "
        f"{positions:,} positions, stored bound {stored:.2e} " + ("ok" if ok else "FAILED")
    )
    if ok:
        return []
    return [
        f"log q agreement: the stored log q differ from a fresh forward of {source} by up to {error:.3e}, above "
        f"the stored bound log_prob_max_error {stored:.3e}: the cache was not made by this teacher, or is corrupt"
    ]


def _check_top1(c: TeacherLogitCache, teacher: str | None, sample: int, scan: Scan, report: Report) -> list[str]:
    model, source = _load_teacher_for(c, teacher, report)
    idx = _sample_indices(c.num_sequences, sample, scan.unreadable)
    if model is None or not idx:
        why = "teacher not available; pass --teacher DIR_OR_ID" if model is None else "no readable sequence"
        report(f"  {'log q' if c.self_normalized else 'top-1'} agreement: skipped ({why})")
        return []
    if c.self_normalized:
        return _check_fresh_log_q(c, model, source, idx, report)
    agreement = _top1_agreement(c, model, idx)
    ok = agreement.fraction >= MIN_TOP1_AGREEMENT
    report(
        f"  top-1 agreement with a fresh forward of {source}: {agreement.fraction:.2%} of {agreement.positions:,} "
        f"positions (max |p_cache - p_fresh| {agreement.max_dp:.1e}) " + ("ok" if ok else "FAILED")
    )
    problems = (
        []
        if ok
        else [
            f"top-1 agreement: {agreement.fraction:.2%} < {MIN_TOP1_AGREEMENT:.0%} with a fresh forward of "
            f"{source}; the cache was not made by this teacher (or is corrupt)"
        ]
    )
    return problems + _bound_against_fresh(c, agreement, report)


def _bound_against_fresh(c: TeacherLogitCache, agreement: Agreement, report: Report) -> list[str]:
    """A stored probability error bound must cover the error measured against the teacher itself.

    The stored data alone only caps the bound from above (``_check_bound``); a bound altered to
    claim more precision than the cache has shows here. The slack covers a forward that differs
    in the last bits and a display temperature between the writer's measured points.
    """
    if "value_max_error" not in c.attrs or c.mode == "sampled":
        return []
    stored = float(c.attrs["value_max_error"])
    if agreement.max_dp <= FRESH_SLACK_FACTOR * stored + FRESH_SLACK:
        return []
    report(
        f"  probability error bound: stored {stored:.2e}, measured against the teacher {agreement.max_dp:.2e}: FAILED"
    )
    return [
        f"probability error bound: the stored value_max_error {stored:.3e} is below the error measured against a "
        f"fresh forward of the teacher ({agreement.max_dp:.3e}): the attribute was altered; regenerate the cache"
    ]


# --------------------------------------------------------------------------- verify: against the config
def _prepared_dir(c: TeacherLogitCache, prepared_dir: Path | None) -> tuple[Path | None, list[Path]]:
    cands = [prepared_dir] if prepared_dir else [c.path.parent / "prepared", Path("data/prepared")]
    return next((p for p in cands if (p / "meta.json").is_file()), None), cands


def _check_against_params(
    c: TeacherLogitCache, params_path: Path, teacher: str | None, prepared_dir: Path | None, scan: Scan, report: Report
) -> list[str]:
    """Fingerprint against the config (and prepared data), and the stored inputs against the prepared split."""
    params = load_params(params_path)
    split = c.fingerprint.get("split", "train")
    prep_dir, cands = _prepared_dir(c, prepared_dir)
    if prep_dir is None:
        report(
            f"  fingerprint vs {params_path}: skipped (no prepared data in {', '.join(map(str, cands))}; "
            "pass --prepared)"
        )
        return []
    prepared = load_prepared(prep_dir)
    teacher_dirs = [Path(teacher)] if teacher else [c.path.parent / "teacher", Path("models/teacher")]
    teacher_dir = next((p for p in teacher_dirs if p.is_dir()), None)
    if teacher_dir is None:
        report("  fingerprint: no teacher directory found; the teacher's identity is not compared")
    diffs = diff_fingerprints(c.fingerprint, expected_fingerprint(prepared, teacher_dir, params, split))
    problems = [f"fingerprint: differs from {params_path} + {prep_dir}: " + "; ".join(diffs)] if diffs else []
    report(f"  fingerprint vs {params_path} + {prep_dir}: " + ("ok" if not diffs else "FAILED: " + "; ".join(diffs)))
    off = int(c.attrs.get("sequence_offset", 0))
    data = prepared.split(split)[off : off + c.num_sequences]
    readable = np.array(_readable(c.num_sequences, scan.unreadable), dtype=np.int64)
    same = data.shape == (c.num_sequences, c.seq_len) and all(
        np.array_equal(c.read_stored(readable[a : a + 256])["input_ids"], data[readable[a : a + 256]])
        for a in range(0, len(readable), 256)
    )
    report(f"  input_ids vs {prep_dir}/{split}.npy: " + ("ok (aligned)" if same else "FAILED"))
    if not same:
        problems.append(f"alignment: stored input_ids differ from {prep_dir}/{split}.npy")
    return problems


# --------------------------------------------------------------------------- verify
def _regenerate(path: Path) -> str:
    return (
        f"delete {path} (and its shards) and regenerate it: `dvc repro teacher_logits`, or "
        "`kdsweep cache generate` with the options that made it"
    )


def _check_sealed(c: TeacherLogitCache, report: Report) -> list[str]:
    """The metadata checksums: a changed one refused the file at open, so here they either hold or
    are missing (a file written before they existed, whose attributes nothing covers)."""
    if METADATA_CHECKSUMS in c.attrs:
        n = len(json.loads(c.attrs[METADATA_CHECKSUMS]))
        report(f"  metadata checksums: ok ({n} attributes and dataset descriptions)")
        return []
    report("  metadata checksums: FAILED (none stored)")
    return [
        "metadata checksums: none stored (the file predates them), so a damaged attribute (temperature grid, "
        "quantum, fingerprint, ...) would go unnoticed; regenerate it"
    ]


def _check_log_q_bound(c: TeacherLogitCache, scan: Scan, report: Report) -> list[str]:
    """A self-normalised cache's stored log q bound: within what its codes allow, and within the limit."""
    bound = float(c.attrs["log_prob_max_error"])
    allowed = scan.value_bound * (1 + 1e-6) + 1e-7
    ok = bound <= min(allowed, MAX_LOG_PROB_ERROR)
    report(
        f"  log q error bound ({c.values} values): stored {bound:.2e}, at most {allowed:.2e} from the stored "
        f"data, limit {MAX_LOG_PROB_ERROR:g}: " + ("ok" if ok else "FAILED")
    )
    if bound > allowed:
        return [
            f"log q error bound: stored log_prob_max_error {bound:.3e} exceeds {allowed:.3e}, the most the stored "
            "values allow: the attribute was altered, or the file is not what the writer measured"
        ]
    if bound > MAX_LOG_PROB_ERROR:
        return [
            f"log q error bound: stored log_prob_max_error {bound:.3e} exceeds {MAX_LOG_PROB_ERROR:g}; "
            "use teacher.cache_values: fp16 and regenerate"
        ]
    return []


def _check_bound(c: TeacherLogitCache, scan: Scan, report: Report) -> list[str]:
    if c.self_normalized:
        return _check_log_q_bound(c, scan, report)
    bound = float(c.attrs["log_normalizer_max_error"])
    ok = bound <= MAX_INTERPOLATION_ERROR
    report(f"  interpolation error bound: {bound:.2e} (log space) " + ("ok" if ok else "FAILED"))
    problems = []
    if not ok:
        problems.append(
            f"interpolation: stored log-normaliser error bound {bound:.2e} exceeds "
            f"{MAX_INTERPOLATION_ERROR:g}; raise teacher.temperature_grid (or narrow "
            "teacher.temperature_range) and regenerate"
        )
    if "value_max_error" not in c.attrs:  # version 2: float16 values, covered by the bound above
        return problems
    value = float(c.attrs["value_max_error"])
    allowed = scan.value_bound * (1 + 1e-6) + 1e-7
    report(
        f"  probability error bound ({c.values} values): stored {value:.2e}, at most {allowed:.2e} from the "
        f"stored data, limit {MAX_VALUE_ERROR:g}: " + ("ok" if value <= min(allowed, MAX_VALUE_ERROR) else "FAILED")
    )
    if value > allowed:
        problems.append(
            f"probability error bound: stored value_max_error {value:.3e} exceeds {allowed:.3e}, the most the "
            "stored values allow: the attribute was altered, or the file is not what the writer measured"
        )
    elif value > MAX_VALUE_ERROR:
        problems.append(
            f"probability error bound: stored value_max_error {value:.3e} exceeds {MAX_VALUE_ERROR:g}; "
            "use teacher.cache_values: fp16, or a finer teacher.temperature_grid, and regenerate"
        )
    return problems


def verify_cache(
    path: Path,
    *,
    params_path: Path | None = None,
    teacher: str | None = None,
    prepared_dir: Path | None = None,
    sample: int = 8,
    report: Report = print,
) -> None:
    """``kdsweep cache verify``: report each check; raise a UserError listing every failed one and the fix."""
    c = TeacherLogitCache(path)  # refuses missing, truncated, incomplete, other-version or damaged files
    report(f"{path}: {c.num_sequences} sequences x {c.seq_len} tokens, top-{c.top_k} of {c.vocab_size}")
    report(
        "  completeness: ok (complete, format version %d%s)"
        % (int(c.attrs["format_version"]), f", {len(c.shards)} shards complete" if c.shards else "")
    )
    try:
        scan = _scan(c, report)
        problems = _check_sealed(c, report) + scan.problems + _check_bound(c, scan, report)
        report("  fingerprint:")
        for line in _fingerprint_lines(c.fingerprint):
            report(line)
        if params_path is not None:
            problems += _check_against_params(c, params_path, teacher, prepared_dir, scan, report)
        problems += _check_top1(c, teacher, sample, scan, report)
    finally:
        c.close()
    if problems:
        raise UserError(f"{path}: verify failed:\n  " + "\n  ".join(problems) + f"\nfix: {_regenerate(path)}")
    report(f"{path}: ok")
