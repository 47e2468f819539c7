"""``kdsweep cache generate`` outside DVC: the whole cache run (prepare, teacher, cache) under one directory.

The reference script's standalone mode: a teacher and a dataset named on the command line,
everything written under ``--output-dir``. It runs the pipeline stages' own code in order;
the DVC stage ``teacher_logits`` never takes this path.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdsweep.config import Params, read_yaml, validate
from kdsweep.fsio import write_json
from kdsweep.stages import prepare, teacher, teacher_logits


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


def standalone(
    params: Params,
    output_dir: Path,
    shard: tuple[int, int] | None = None,
    devices: int = 1,
    shard_command: list[str] | None = None,
) -> dict:
    """The whole cache run outside DVC, everything under ``output_dir``.

    Writes ``prepared/`` (tokenizer and packed sequences), ``teacher/`` (pointer, or the
    trained embedded teacher), the caches ``{train,validation}.h5`` (or their shards) and
    ``metrics/``. Prepared data and teacher are reused when ``inputs.json`` says they were
    made from the same settings, so a re-run (or another shard) resumes instead of redoing them.
    With ``devices`` > 1 the cache is written by that many ``shard_command --shard i/N``
    processes (:func:`kdsweep.stages.teacher_logits.on_devices`), after the data and teacher are ready.
    """
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
        write_json(record, inputs)
    if devices > 1:
        return teacher_logits.on_devices(
            shard_command, devices, out=output_dir, metrics_path=output_dir / "metrics/teacher_logits.json"
        )
    return teacher_logits.main(
        params,
        prepared_dir=prepared_dir,
        teacher_dir=teacher_dir,
        out=output_dir,
        metrics_path=output_dir / "metrics/teacher_logits.json",
        shard=shard,
    )


def standalone_params(
    params_path: Path,
    *,
    teacher_model: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> Params:
    """params.yaml (when present) with the reference script's options on top, validated (for :func:`standalone`)."""
    data = (read_yaml(params_path) if params_path.is_file() else None) or {}
    teacher, ds = data.setdefault("teacher", {}), data.setdefault("dataset", {})
    if teacher_model is not None:
        teacher["model"] = teacher_model
    if dataset is not None:
        if dataset == "builtin":
            ds["source"] = "builtin"
        else:
            ds.update(source="hf", name=dataset)
    if dataset_config is not None:
        ds["config_name"] = dataset_config
    if top_k is not None:
        teacher["top_k"] = top_k
    if batch_size is not None:
        teacher["cache_batch_size"] = batch_size
    if max_samples is not None:
        ds["max_samples"] = max_samples
    return validate(data, source=f"{params_path} with the command-line options")
