"""Stage ``teacher_logits``: run the teacher once over both splits and cache its top-k.

Writes ``data/teacher_logits/{train,validation}.h5`` (format: ``docs/cache-format.md``).
Every trial of a sweep reads these files instead of running the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdsweep.cache import CacheLayout, FORMAT_VERSION, TeacherLogitCache, generate, ids_dtype, temperature_grid
from kdsweep.config import Params
from kdsweep.data import SPLITS, Prepared, load_prepared
from kdsweep.errors import UserError
from kdsweep.models import default_device, load_teacher, output_vocab_size, teacher_identity


def expected_fingerprint(prepared: Prepared, teacher_dir: Path, params: Params, split: str) -> dict:
    """What a cache for this data, teacher and config must have been made from.

    Fields come from the config where it decides them (max_length, top_k, temperatures),
    so a cache, or prepared data, that is out of date with ``params.yaml`` is refused.
    """
    cfg = params.teacher
    lo, hi = cfg.temperature_range
    return {
        "format_version": FORMAT_VERSION,
        "split": split,
        "dataset": prepared.meta["dataset"],
        "max_length": params.dataset.max_length,
        "packing": prepared.meta["packing"],
        "tokenizer_sha256": prepared.meta["tokenizer"]["sha256"],
        "vocab_size": prepared.meta["tokenizer"]["vocab_size"],
        "teacher": teacher_identity(teacher_dir),
        "top_k": cfg.top_k,
        "temperature_range": [lo, hi],
        "temperature_grid": cfg.temperature_grid,
        "dtypes": {"topk_ids": ids_dtype(prepared.meta["tokenizer"]["vocab_size"]).name, "topk_logits": "float16",
                   "log_normalizer": "float32", "log_normalizer_slope": "float16"},
    }


def layout_for(prepared: Prepared, teacher_dir: Path, params: Params, split: str) -> CacheLayout:
    cfg = params.teacher
    lo, hi = cfg.temperature_range
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    if cfg.top_k > vocab:
        raise UserError(f"teacher.top_k: {cfg.top_k} exceeds the vocabulary size {vocab}")
    return CacheLayout(cfg.top_k, temperature_grid(lo, hi, cfg.temperature_grid), vocab,
                       prepared.split(split).shape[1], expected_fingerprint(prepared, teacher_dir, params, split))


def main(params: Params, prepared_dir: Path = Path("data/prepared"), teacher_dir: Path = Path("models/teacher"),
         out: Path = Path("data/teacher_logits"), metrics_path: Path = Path("metrics/teacher_logits.json"),
         shard: tuple[int, int] | None = None) -> dict:
    """Generate (or resume) the cache for both splits."""
    cfg = params.teacher
    prepared = load_prepared(prepared_dir)
    device = default_device()
    teacher = load_teacher(teacher_dir, cfg, device)
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    rows = output_vocab_size(teacher)
    if rows < vocab:
        raise UserError(f"teacher: its LM head has {rows} rows but the tokenizer has {vocab} tokens; "
                        "use the teacher's own tokenizer")
    if rows > vocab:
        print(f"teacher_logits: LM head has {rows} rows for {vocab} tokens (padded vocabulary); "
              f"the {rows - vocab} padding rows are dropped")
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for split in SPLITS:
        layout = layout_for(prepared, teacher_dir, params, split)
        path = generate(teacher, prepared.split(split), out / f"{split}.h5", layout, batch_size=cfg.cache_batch_size,
                        device=device, shard=shard, desc=f"teacher logits ({split})")
        c = TeacherLogitCache(path)
        tokens = c.num_sequences * c.seq_len
        metrics[split] = {"sequences": c.num_sequences, "bytes_per_token": round(path.stat().st_size / tokens, 1),
                          "log_normalizer_max_error": float(c.attrs["log_normalizer_max_error"])}
        c.close()
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    print("teacher_logits:", json.dumps(metrics))
    return metrics
