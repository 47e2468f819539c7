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

from kdsweep.cache import (
    FORMAT_VERSION,
    GZIP_LEVEL,
    CacheLayout,
    TeacherLogitCache,
    generate,
    ids_dtype,
    shard_path,
    temperature_grid,
)
from kdsweep.config import Params
from kdsweep.data import SPLITS, Prepared, load_prepared
from kdsweep.errors import UserError
from kdsweep.models import default_device, load_teacher, output_vocab_size, teacher_identity


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


def layout_for(prepared: Prepared, teacher_dir: Path, params: Params, split: str) -> CacheLayout:
    cfg = params.teacher
    lo, hi = cfg.temperature_range
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    if cfg.top_k > vocab:
        raise UserError(f"teacher.top_k: {cfg.top_k} exceeds the vocabulary size {vocab}")
    return CacheLayout(
        cfg.top_k,
        temperature_grid(lo, hi, cfg.temperature_grid),
        vocab,
        prepared.split(split).shape[1],
        expected_fingerprint(prepared, teacher_dir, params, split),
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
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    print("teacher_logits:", json.dumps(metrics))
    return metrics


def _inputs(params: Params) -> dict:
    """The settings that decide the prepared data and the teacher (see :func:`standalone`)."""
    t = params.teacher
    return {
        "dataset": params.dataset.model_dump(mode="json"),
        "tokenizer": params.tokenizer.model_dump(mode="json"),
        "teacher": {
            "model": t.model,
            "revision": t.revision,
            "trust_remote_code": t.trust_remote_code,
            "arch": t.arch.model_dump(mode="json"),
            "train": t.train.model_dump(mode="json"),
        },
    }


def standalone(params: Params, output_dir: Path, shard: tuple[int, int] | None = None) -> dict:
    """The whole cache run outside DVC, everything under ``output_dir``.

    Writes ``prepared/`` (tokenizer and packed sequences), ``teacher/`` (pointer, or the
    trained embedded teacher), the caches ``{train,validation}.h5`` (or their shards) and
    ``metrics/``. Prepared data and teacher are reused when ``inputs.json`` says they were
    made from the same settings, so a re-run (or another shard) resumes instead of redoing them.
    """
    from kdsweep.stages import prepare, teacher

    output_dir.mkdir(parents=True, exist_ok=True)
    prepared_dir, teacher_dir, record = output_dir / "prepared", output_dir / "teacher", output_dir / "inputs.json"
    inputs = _inputs(params)
    fresh = (
        record.is_file()
        and json.loads(record.read_text()) == inputs
        and (prepared_dir / "meta.json").is_file()
        and teacher_dir.is_dir()
    )
    if fresh:
        print(f"{output_dir}: prepared data and teacher are up to date; reusing them")
    else:
        record.unlink(missing_ok=True)
        prepare.main(params, out=prepared_dir)
        teacher.main(
            params, prepared_dir=prepared_dir, out=teacher_dir, metrics_path=output_dir / "metrics/teacher.json"
        )
        record.write_text(json.dumps(inputs, indent=2))
    return main(
        params,
        prepared_dir=prepared_dir,
        teacher_dir=teacher_dir,
        out=output_dir,
        metrics_path=output_dir / "metrics/teacher_logits.json",
        shard=shard,
    )
