"""Stage ``evaluate``: the distilled student on the validation split, as DVC metrics.

Validation CE (``val_loss``) and perplexity, KL to the teacher at T = 1 and top-1 agreement
with the teacher, for the student before (``models/student_init``) and after distillation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.config import Params
from kdsweep.data import load_prepared
from kdsweep.evaluation import evaluate
from kdsweep.losses import LossSpec
from kdsweep.models import default_device, load_causal_lm, load_teacher
from kdsweep.stages.distill import validation_batches
from kdsweep.teachers import cached_teacher_fn, live_teacher_fn


def main(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    teacher_dir: Path = Path("models/teacher"),
    cache_dir: Path = Path("data/teacher_logits"),
    init_dir: Path = Path("models/student_init"),
    student_dir: Path = Path("models/student"),
    metrics_path: Path = Path("metrics/evaluate.json"),
) -> dict:
    device = default_device()
    data = load_prepared(prepared_dir)
    cfg = params.evaluate
    if params.teacher.use_cached_logits:
        cache = TeacherLogitCache(cache_dir / "validation.h5")
        spec = LossSpec(alpha=0.0, temperature=1.0, mode="topk_tail", chunk_size=params.loss.chunk_size)
        teacher_fn_for = lambda b: cached_teacher_fn(b, cache.betas, 1.0)  # noqa: E731
    else:
        cache = None
        teacher = load_teacher(teacher_dir, params.teacher, device)
        vocab = data.meta["tokenizer"]["vocab_size"]
        spec = LossSpec(alpha=0.0, temperature=1.0, mode="dense", chunk_size=params.loss.chunk_size)
        teacher_fn_for = lambda b: live_teacher_fn(teacher, b["input_ids"], 1.0, "dense", 1, vocab)  # noqa: E731
    n_batches = math.ceil(len(data.validation) / cfg.batch_size)
    total = n_batches if cfg.max_batches is None else min(n_batches, cfg.max_batches)
    results = {}
    for name, path in (("initial", init_dir), ("distilled", student_dir)):
        model = load_causal_lm(path).to(device)
        results[name] = evaluate(
            model,
            validation_batches(data.validation, cache, cfg.batch_size, cfg.max_batches, device),
            teacher_fn_for,
            spec,
            progress=True,
            total=total,
        )
    metrics = {
        **dict(results["distilled"].items()),
        "initial": {k: v for k, v in results["initial"].items() if k != "val_tokens"},
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    d, i = results["distilled"], results["initial"]
    print(
        f"evaluate: val_loss {i['val_loss']:.4f} -> {d['val_loss']:.4f}, val_kl {i['val_kl']:.4f} -> "
        f"{d['val_kl']:.4f}, top-1 agreement {i['val_top1_agreement']:.3f} -> {d['val_top1_agreement']:.3f}"
    )
    return metrics
