"""What a cache was made from, and how two such records differ.

Every cache file stores a fingerprint (JSON): the data, tokenizer, teacher and settings it was
made from (the field table is in ``docs/cache-format.md``). The writer stores
:func:`expected_fingerprint` of its inputs; training recomputes it from its own config and
refuses a cache whose fingerprint differs, naming every field (:func:`diff_fingerprints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdsweep.cache.format import FORMAT_VERSION, ids_dtype
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
    fingerprint = {
        "format_version": FORMAT_VERSION,
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
        "dtypes": {
            "input_ids": "int32",
            "topk_id_deltas": ids_dtype(vocab).name,
            "topk_logits": "float16",
            "tail_log_normalizer_residual": "int32",
            "tail_log_normalizer_slope": "float16",
        },
    }
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
