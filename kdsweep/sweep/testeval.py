"""Test-split metrics of a study's trials, for ``kdsweep best`` and ``kdsweep report``.

They are shown for information only: the sweep prunes and selects on validation, and its trials
run ``distill``, which never opens ``test.npy`` or ``test.h5``. Per trial asked about::

    studies/<study>/test_metrics.json holds its commit     -> those numbers (a second `best` is instant)
    its own evaluate stage ran (execution.stages)          -> its metrics/evaluate.json
    outputs removed by retention, or none recorded        -> no metrics, and why
    else: its experiment commit's dvc.lock names models/student (distill's outs) and the upstream
          outputs; their files are linked from the DVC cache into a temporary directory, the
          evaluate stage's evaluation runs on the test split, and the numbers are stored
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdsweep.errors import UserError
from kdsweep.fsio import write_json
from kdsweep.sweep import dvcexp
from kdsweep.sweep.record import TrialRecord

TEST_KEYS = ("test_ce", "test_perplexity", "test_kl", "test_top1_agreement")
# What the evaluation reads: the student, the test split and its teacher logits, the teacher (whose
# identity the cache's fingerprint names; loaded only with teacher.use_cached_logits: false).
STUDENT = "models/student"
NEEDED = (STUDENT, "data/prepared", "data/teacher_logits", "models/teacher")
SELECTION_NOTE = "selection used validation ({metric}); the test metrics are shown for information only"


@dataclass
class HeldOut:
    """A trial's test metrics (:data:`TEST_KEYS`), or why it has none."""

    metrics: dict[str, float] | None = None
    why: str = ""


class Unavailable(Exception):
    """A trial's outputs cannot be read back (not in the repository or not in the DVC cache)."""


def metrics_file(root: Path, study: str) -> Path:
    """Where the test metrics of a study's trials are kept, by experiment name and commit."""
    return root / "studies" / study / "test_metrics.json"


def held_out(
    root: Path, study: str, trials: list[TrialRecord], removed: set[int], keep_best: int | None
) -> dict[int, HeldOut]:
    """The test metrics of ``trials`` (Optuna trials of ``study``), evaluated where not stored yet."""
    path = metrics_file(root, study)
    stored = json.loads(path.read_text()) if path.is_file() else {}
    refs = dvcexp.exp_refs(root)
    out = {}
    for t in trials:
        name = t.experiment
        rev = refs[name][1] if name in refs else None
        if rev is None:
            out[t.number] = HeldOut(why=f"experiment {name} is not in this repository")
        elif (stored.get(name) or {}).get("rev") == rev:
            out[t.number] = HeldOut({k: stored[name][k] for k in TEST_KEYS})
        elif recorded := _recorded(root, rev):
            out[t.number] = HeldOut(recorded)
        elif t.number in removed:
            out[t.number] = HeldOut(why=f"outputs removed by retention (keep_best {keep_best})")
        elif not t.outputs_kept:
            out[t.number] = HeldOut(why="no outputs recorded")
        else:
            print(f"test split: evaluating trial {t.number} ({name}) from its kept outputs", flush=True)
            out[t.number] = _evaluate_trial(root, rev)
            if out[t.number].metrics is not None:
                stored[name] = {"rev": rev, **out[t.number].metrics}
                write_json(path, stored)  # after each trial: an interrupted `best` keeps what it computed
    return out


def _recorded(root: Path, rev: str) -> dict[str, float] | None:
    """The test metrics a trial's own ``evaluate`` stage wrote (``execution.stages: [distill, evaluate]``),
    or None: a ``metrics/evaluate.json`` that evaluated another student (the baseline's) does not count."""
    lock = dvcexp.exp_lock(root, rev)
    student = [o.get("md5") for o in (lock.get("distill") or {}).get("outs") or [] if o.get("path") == STUDENT]
    evaluated = [d.get("md5") for d in (lock.get("evaluate") or {}).get("deps") or [] if d.get("path") == STUDENT]
    text = dvcexp.show(root, rev, "metrics/evaluate.json") if student and student == evaluated else None
    metrics = json.loads(text) if text else {}
    return {k: float(metrics[k]) for k in TEST_KEYS} if all(k in metrics for k in TEST_KEYS) else None


def _evaluate_trial(root: Path, rev: str) -> HeldOut:
    """Evaluate the student of experiment commit ``rev`` on the test split, from the DVC cache."""
    from kdsweep.config import validate
    from kdsweep.sweep.retention import cache_dir

    with tempfile.TemporaryDirectory(prefix="kdsweep-test-") as tmp:
        try:
            params_text = dvcexp.show(root, rev, "params.yaml")
            if params_text is None:
                raise Unavailable("its commit has no params.yaml")
            params = validate(yaml.safe_load(params_text), source=f"params.yaml of {rev[:7]}")
            _link_outputs(cache_dir(root), dvcexp.exp_lock(root, rev), NEEDED, Path(tmp))
            metrics = _evaluate_test(params, Path(tmp))
        except (Unavailable, UserError, OSError) as e:
            # Paths in the temporary directory read as the repository's own (data/teacher_logits/test.h5).
            return HeldOut(why=f"not evaluated: {str(e).replace(tmp + '/', '')}")
    if not all(math.isfinite(v) for v in metrics.values()):
        return HeldOut(why=f"not finite: {metrics}")
    return HeldOut(metrics)


def _link_outputs(cache: Path, lock: dict, paths: tuple[str, ...], dest: Path) -> None:
    """Symlink the files of the outputs ``paths`` that ``lock`` (dvc.lock stages) records, from the
    DVC cache at ``cache`` into ``dest`` (a ``.dir`` output: each file its manifest lists)."""
    outs = {o["path"]: o for stage in lock.values() for o in stage.get("outs") or []}
    for path in paths:
        md5 = (outs.get(path) or {}).get("md5")
        if not md5:
            raise Unavailable(f"its dvc.lock records no cached output {path}")
        obj = cache / md5[:2] / md5[2:]
        if not obj.is_file():
            raise Unavailable(f"{path} is not in the DVC cache (`dvc pull` brings it back)")
        files = [(e["relpath"], e["md5"]) for e in json.loads(obj.read_text())] if md5.endswith(".dir") else [("", md5)]
        for rel, file_md5 in files:
            src, dst = cache / file_md5[:2] / file_md5[2:], dest / path / rel if rel else dest / path
            if not src.is_file():
                raise Unavailable(f"{path}/{rel} is not in the DVC cache (`dvc pull` brings it back)")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)


def _evaluate_test(params, work: Path) -> dict[str, float]:
    """The student ``work/models/student`` on ``work/data/prepared``'s test split, as the evaluate stage
    measures it (its own ``evaluate`` settings; KL and top-1 against the teacher at T = 1)."""
    import numpy as np

    from kdsweep.compress import load_student
    from kdsweep.data import Prepared
    from kdsweep.models import default_device
    from kdsweep.stages.evaluate import split_metrics, teacher_fns

    prepared = work / "data" / "prepared"
    # train and validation memory-mapped, never read: only the test split is evaluated.
    data = Prepared(
        prepared,
        np.load(prepared / "train.npy", mmap_mode="r"),
        np.load(prepared / "validation.npy", mmap_mode="r"),
        json.loads((prepared / "meta.json").read_text()),
    )
    device = default_device()
    caches, fns, spec = teacher_fns(
        params, data, work / "models" / "teacher", work / "data" / "teacher_logits", device, splits=("test",)
    )
    try:
        model = load_student(work / "models" / "student").to(device)
        scores = split_metrics(model, data, "test", caches["test"], fns["test"], spec, params.evaluate, device)
    finally:
        if caches["test"] is not None:
            caches["test"].close()
    return {k: float(scores[k]) for k in TEST_KEYS}
