"""Stage ``teacher_logits``: run the teacher once over every split and cache its top-k.

Writes ``data/teacher_logits/{train,validation,test}.h5`` (format: ``docs/cache-format.md``).
Every trial of a sweep reads these files instead of running the teacher.

Unfinished work is kept in ``data/teacher_logits.partial/``, outside the stage's output
(``dvc repro`` deletes an output before it runs the stage), so re-running an interrupted
stage resumes it. :func:`standalone` is the same run outside DVC (``kdsweep cache generate
--output-dir ...``): it prepares the data and the teacher pointer under the output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdsweep.cache.fingerprint import expected_fingerprint
from kdsweep.cache.format import GZIP_LEVEL, CacheLayout, temperature_grid
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.writer import generate, shard_path
from kdsweep.config import Params
from kdsweep.data import SPLITS, Prepared, load_prepared
from kdsweep.errors import UserError
from kdsweep.fsio import write_json
from kdsweep.models import default_device, load_teacher, output_vocab_size


def layout_for(prepared: Prepared, teacher_dir: Path, params: Params, split: str) -> CacheLayout:
    """What the cache of ``split`` holds: top-k, temperature grid, vocabulary, sequence length, fingerprint."""
    cfg = params.teacher
    lo, hi = cfg.temperature_range
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    if cfg.top_k > vocab and cfg.cache_mode == "topk":
        raise UserError(f"teacher.top_k: {cfg.top_k} exceeds the vocabulary size {vocab}")
    sampled = cfg.cache_mode == "sampled"
    return CacheLayout(
        cfg.sample_draws if sampled else cfg.top_k,
        temperature_grid(lo, hi, cfg.temperature_grid),
        vocab,
        prepared.split(split).shape[1],
        expected_fingerprint(prepared, teacher_dir, params, split),
        cfg.cache_mode,
        cfg.cache_values,
        cfg.sample_draws if sampled else 0,
        cfg.sample_temperature,
    )


def main(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    teacher_dir: Path = Path("models/teacher"),
    out: Path = Path("data/teacher_logits"),
    metrics_path: Path = Path("metrics/teacher_logits.json"),
    shard: tuple[int, int] | None = None,
) -> dict:
    """Generate (or resume) the cache for every split (``SPLITS``); return the metrics written to ``metrics_path``."""
    cfg = params.teacher
    prepared = load_prepared(prepared_dir)
    device = default_device()
    teacher = load_teacher(teacher_dir, cfg, device)
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    rows = output_vocab_size(teacher)
    if rows < vocab:
        raise UserError(
            f"teacher: its LM head has {rows} rows but the tokenizer has {vocab} tokens; "
            "use the teacher's own tokenizer"
        )
    if rows > vocab:
        print(
            f"teacher_logits: LM head has {rows} rows for {vocab} tokens (padded vocabulary); "
            f"the {rows - vocab} padding rows are dropped"
        )
    out.mkdir(parents=True, exist_ok=True)
    work = out.absolute()
    partial_root = work.parent / f"{work.name}.partial"
    metrics = {}
    for split in SPLITS:
        layout = layout_for(prepared, teacher_dir, params, split)
        target = out / f"{split}.h5"
        name = shard_path(target, shard).name if shard else target.name
        path = generate(
            teacher,
            prepared.split(split),
            target,
            layout,
            batch_size=cfg.cache_batch_size,
            device=device,
            shard=shard,
            desc=f"teacher logits ({split})",
            partial_dir=partial_root / name,
            compression=GZIP_LEVEL if cfg.cache_compression == "gzip" else 0,
        )
        c = TeacherLogitCache(path)
        tokens = c.num_sequences * c.seq_len
        size = path.stat().st_size
        metrics[split] = {
            "sequences": c.num_sequences,
            "bytes_per_token": round(size / tokens, 1),
            "bytes_per_logit": round(size / tokens / c.top_k, 3),
            "log_normalizer_max_error": float(c.attrs["log_normalizer_max_error"]),
        }
        c.close()
    if partial_root.is_dir() and not any(partial_root.iterdir()):
        partial_root.rmdir()
    write_json(metrics_path, metrics)
    print("teacher_logits:", json.dumps(metrics))
    return metrics
