"""Stage ``evaluate``: the student on the validation and the held-out test split, as DVC metrics.

For the student before (``models/student_init``) and after distillation, on each split:
CE and perplexity, KL to the teacher at T = 1 and top-1 agreement with the teacher::

    for model in (initial, distilled):
        for split in (validation, test):
            metrics[split keys] = evaluate(model, split's sequences, split's teacher logits)

Validation keys keep the names ``distill`` reports (``val_loss``, ``val_kl``...); test keys
are ``test_ce``, ``test_perplexity``, ``test_kl``, ``test_top1_agreement``. Selection (sweeps,
``best_val_loss``) uses validation only; this stage is the only one that reads the test split.
"""

from __future__ import annotations

import math
from pathlib import Path

from kdsweep.cache.fingerprint import expected_fingerprint
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.compress import load_student
from kdsweep.config import Params
from kdsweep.data import Prepared, load_prepared
from kdsweep.fsio import write_json
from kdsweep.losses import LossSpec
from kdsweep.models import default_device, load_teacher
from kdsweep.student_metrics import evaluate
from kdsweep.teacher_targets import cached_teacher_fn, live_teacher_fn, validation_batches

EVAL_SPLITS = ("validation", "test")

# evaluation.evaluate's names -> the test split's metric names.
TEST_NAMES = {
    "val_loss": "test_ce",
    "val_perplexity": "test_perplexity",
    "val_kl": "test_kl",
    "val_top1_agreement": "test_top1_agreement",
    "val_tokens": "test_tokens",
}


def teacher_fns(
    params: Params, data: Prepared, teacher_dir: Path, cache_dir: Path, device, splits: tuple[str, ...] = EVAL_SPLITS
):
    """Per split, the cache to read (None for a live teacher) and the batch -> teacher function; the loss spec."""
    chunk = params.loss.chunk_size
    if params.teacher.use_cached_logits:
        caches = {}
        for split in splits:
            caches[split] = TeacherLogitCache(cache_dir / f"{split}.h5")
            caches[split].check_fingerprint(expected_fingerprint(data, teacher_dir, params, split))
        fns = {split: (lambda b, c=c: cached_teacher_fn(b, c.betas, 1.0)) for split, c in caches.items()}
        return caches, fns, LossSpec(alpha=0.0, temperature=1.0, mode="topk_tail", chunk_size=chunk)
    teacher = load_teacher(teacher_dir, params.teacher, device)
    vocab = data.meta["tokenizer"]["vocab_size"]

    def live(b):
        return live_teacher_fn(teacher, b["input_ids"], 1.0, "dense", 1, vocab)

    caches = dict.fromkeys(splits)
    return (
        caches,
        dict.fromkeys(splits, live),
        LossSpec(alpha=0.0, temperature=1.0, mode="dense", chunk_size=chunk),
    )


def split_metrics(model, data: Prepared, split: str, cache, teacher_fn, spec: LossSpec, cfg, device) -> dict:
    """``model`` on one split: validation under distill's names (``val_loss``...), test under :data:`TEST_NAMES`."""
    sequences = data.split(split)
    n_batches = math.ceil(len(sequences) / cfg.batch_size)
    scores = evaluate(
        model,
        validation_batches(sequences, cache, cfg.batch_size, cfg.max_batches, device),
        teacher_fn,
        spec,
        progress=True,
        total=n_batches if cfg.max_batches is None else min(n_batches, cfg.max_batches),
    )
    return scores if split == "validation" else {TEST_NAMES[k]: v for k, v in scores.items()}


def main(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    teacher_dir: Path = Path("models/teacher"),
    cache_dir: Path = Path("data/teacher_logits"),
    init_dir: Path = Path("models/student_init"),
    student_dir: Path = Path("models/student"),
    metrics_path: Path = Path("metrics/evaluate.json"),
) -> dict:
    """Evaluate the initial and the distilled student on validation and test; write ``metrics_path``."""
    device = default_device()
    data = load_prepared(prepared_dir)
    cfg = params.evaluate
    caches, fns, spec = teacher_fns(params, data, teacher_dir, cache_dir, device)
    results = {}
    for name, path in (("initial", init_dir), ("distilled", student_dir)):
        model = load_student(path).to(device)
        results[name] = {}
        for split in EVAL_SPLITS:
            results[name].update(split_metrics(model, data, split, caches[split], fns[split], spec, cfg, device))
    for cache in caches.values():
        if cache is not None:
            cache.close()
    token_counts = ("val_tokens", "test_tokens")
    metrics = {
        **results["distilled"],
        "initial": {k: v for k, v in results["initial"].items() if k not in token_counts},
    }
    write_json(metrics_path, metrics)
    d, i = results["distilled"], results["initial"]
    print(
        f"evaluate: val_loss {i['val_loss']:.4f} -> {d['val_loss']:.4f}, val_kl {i['val_kl']:.4f} -> "
        f"{d['val_kl']:.4f}, top-1 agreement {i['val_top1_agreement']:.3f} -> {d['val_top1_agreement']:.3f}; "
        f"test_ce {i['test_ce']:.4f} -> {d['test_ce']:.4f}, test_kl {i['test_kl']:.4f} -> {d['test_kl']:.4f}"
    )
    return metrics
