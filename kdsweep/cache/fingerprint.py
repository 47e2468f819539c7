"""What a cache was made from, and how two such records differ.

Every cache file stores a fingerprint (JSON): the data, tokenizer, teacher and settings it was
made from (the field table is in ``docs/cache-format.md``). The writer stores
:func:`expected_fingerprint` of its inputs; training recomputes it from its own config and
refuses a cache whose fingerprint differs, naming every field (:func:`diff_fingerprints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdsweep.cache.format import format_version, stored_dtypes, temperature_grid
from kdsweep.models import teacher_identity

if TYPE_CHECKING:
    from kdsweep.config import Params
    from kdsweep.data import Prepared


def expected_fingerprint(prepared: Prepared, teacher_dir: Path | None, params: Params, split: str) -> dict:
    """What a cache for this data, teacher and config must have been made from.

    Fields come from the config where it decides them (max_length, top_k, temperatures),
    so a cache, or prepared data, that is out of date with ``params.yaml`` is refused.
    ``teacher_dir=None`` leaves the teacher out (it is then not compared).
    """
    cfg = params.teacher
    lo, hi = cfg.temperature_range
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    width = cfg.sample_draws if cfg.cache_mode == "sampled" else cfg.top_k
    g = len(temperature_grid(lo, hi, cfg.temperature_grid))
    weights = cfg.sample_weights if cfg.cache_mode == "sampled" else "exact"
    dtypes = stored_dtypes(cfg.cache_mode, cfg.cache_values, vocab, width, g, weights)
    fingerprint = {
        "format_version": format_version(cfg.cache_mode, cfg.cache_values, weights),
        "split": split,
        "dataset": prepared.meta["dataset"],
        "max_length": params.dataset.max_length,
        "packing": prepared.meta["packing"],
        "tokenizer_sha256": prepared.meta["tokenizer"]["sha256"],
        "vocab_size": vocab,
        "teacher": teacher_identity(teacher_dir) if teacher_dir is not None else None,
        "top_k": cfg.top_k,
        "temperature_range": [lo, hi],
        "temperature_grid": cfg.temperature_grid,
        "dtypes": {name: dtype.name for name, (dtype, _) in dtypes.items()},
    }
    if fingerprint["format_version"] >= 3:  # version 2 fingerprints stay as they were
        fingerprint |= {"cache_mode": cfg.cache_mode, "cache_values": cfg.cache_values}
    if cfg.cache_mode == "sampled":
        del fingerprint["top_k"]
        fingerprint |= {"sample_draws": cfg.sample_draws, "sample_temperature": cfg.sample_temperature}
    if weights == "self_normalized":  # no grid: the temperature settings do not shape the file
        del fingerprint["temperature_range"], fingerprint["temperature_grid"]
        fingerprint["sample_weights"] = weights
    if teacher_dir is None:
        del fingerprint["teacher"]
    return fingerprint


def diff_fingerprints(cached: dict, expected: dict) -> list[str]:
    """Fields whose values differ, as ``key: cache has X, config has Y`` lines."""
    out = []
    for key in sorted(set(cached) | set(expected)):
        if key in expected and cached.get(key) != expected.get(key):
            out.append(f"{key}: cache has {cached.get(key)!r}, config has {expected.get(key)!r}")
    return out
