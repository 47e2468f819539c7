"""How a trial's end goes into the study: its metrics, its failure, or its retry.

    experiment recorded, metrics/distill.json state complete  -> tell(value)
                                            state pruned      -> tell(PRUNED)
                                            anything else     -> tell(FAIL), with the reason
    failed before or inside `dvc exp run`  -> FAIL with the reason; recorded as an experiment too
    interrupted (Ctrl-C, SIGTERM) or orphaned by a killed runner -> FAIL, marked interrupted,
        and the same params enqueued again (:meth:`Outcomes.requeue`, the one retry path)

On resume, :meth:`Outcomes.recover` handles trials a runner that is gone left RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kdsweep.sweep import dvcexp
from kdsweep.sweep.exprun import kill_group
from kdsweep.sweep.spec import StudySpec
from kdsweep.sweep.study import (
    EXPERIMENT,
    FAIL_REASON,
    INTERRUPTED,
    OUTPUTS,
    RETRY_OF,
    headline,
    owner_gone,
    process_alive,
)


class Outcomes:
    """Writes trials' results into one study (and failed trials into DVC's experiment list)."""

    def __init__(self, study, storage, spec: StudySpec, root: Path, params_text: str, copy_paths: list[str]):
        import optuna

        self.TS = optuna.trial.TrialState
        self.study = study
        self.storage = storage
        self.spec = spec
        self.name = spec.study
        self.root = root
        self.params_text = params_text
        self.copy_paths = copy_paths
        self.baseline_rev = dvcexp.git(root, "rev-parse", "HEAD").strip()

    def set(self, trial, **attrs: Any) -> None:
        """Set user attributes of a running trial (an Optuna Trial or FrozenTrial)."""
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(trial._trial_id, k, v)

    def tell_from_metrics(self, trial, metrics: dict, sha: str) -> None:
        """End a trial whose experiment DVC recorded at ``sha``, by the state in its metrics."""
        self.set(trial, **{k: metrics[k] for k in ("state", "val_loss", "best_val_loss", "steps") if k in metrics})
        self.set(trial, experiment_rev=sha, **{OUTPUTS: "kept"})
        state = metrics.get("state")
        value = metrics.get(self.spec.objective.metric)
        if state == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            self.study.tell(trial.number, float(value))
        elif state == "pruned":
            self.study.tell(trial.number, state=self.TS.PRUNED)
        else:
            reason = f"distill ended in state {state!r} ({self.spec.objective.metric} = {value!r})"
            self.set(trial, **{FAIL_REASON: reason})
            self.study.tell(trial.number, state=self.TS.FAIL)

    def fail(self, trial, reason: str, *, overrides: dict | None = None, wall: float | None = None) -> None:
        """Mark a trial failed with its reason; with ``overrides``, record it as a DVC experiment
        so that ``dvc exp show`` lists it."""
        self.set(trial, **{FAIL_REASON: reason[-2000:], "state": "failed"})
        if wall is not None:
            self.set(trial, wall_seconds=round(wall, 2))
        if overrides is not None:
            self._record_failed(trial, reason, overrides)
        with contextlib.suppress(RuntimeError, ValueError):  # the trial may already be finished
            self.study.tell(trial.number, state=self.TS.FAIL)
        tqdm.write(f"trial {trial.number} ({self.name}-{trial.number}): failed: {headline(reason)[:200]}")

    def _record_failed(self, trial, reason: str, overrides: dict) -> None:
        try:
            extra = {"dvc.lock": (self.root / "dvc.lock").read_text()} if self.copy_paths else {}
            metrics = {"state": "failed", "reason": headline(reason)[:300]}
            dvcexp.record_failed(
                self.root, f"{self.name}-{trial.number}", self.baseline_rev, self.params_text, overrides, metrics, extra
            )
        except Exception as e:  # recording is a convenience; the study has the reason either way
            tqdm.write(f"trial {trial.number}: could not record the failed experiment: {e}")

    def requeue(self, trial, name: str, reason: str) -> int:
        """Fail an interrupted trial and enqueue its params again; returns the bytes its leftovers freed."""
        freed = dvcexp.clean_tempdirs(self.root, name)
        self.set(trial, **{INTERRUPTED: True, FAIL_REASON: reason})
        self.study.tell(trial.number, state=self.TS.FAIL)
        self.study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        return freed

    def recover(self, me: dict) -> None:
        """Trials left RUNNING by a runner that is gone: adopt a recorded result, else fail and retry."""
        for t in self.study.get_trials(deepcopy=False, states=(self.TS.RUNNING,)):
            owner = t.user_attrs.get("runner") or {}
            if not self._orphaned(t, owner, me):
                continue
            child = t.user_attrs.get("child") or {}
            if owner.get("host") == me["host"] and process_alive(child.get("pid"), child.get("started")):
                kill_group(child["pid"])
            name = t.user_attrs.get(EXPERIMENT, f"{self.name}-{t.number}")
            if self._adopt(t, name):
                continue
            reason = (
                "interrupted: the runner stopped during this trial (Ctrl-C or killed); it is retried as a new trial"
            )
            freed = self.requeue(t, name, reason)
            tqdm.write(
                f"resume: trial {t.number} ({name}) was interrupted; marked failed and re-enqueued"
                + (f" (removed its temporary copy, {freed / 2**20:.1f} MB)" if freed else "")
            )

    @staticmethod
    def _orphaned(t, owner: dict, me: dict) -> bool:
        # A live runner (on this machine: its process; on another: a fresh heartbeat) keeps its trial.
        return (owner.get("host"), owner.get("pid")) == (me["host"], me["pid"]) or owner_gone(t.user_attrs, time.time())

    def _adopt(self, t, name: str) -> bool:
        """A killed runner's trial whose experiment DVC did record: keep its result."""
        refs = dvcexp.exp_refs(self.root)
        if name not in refs:
            return False
        text = dvcexp.show(self.root, refs[name][1], "metrics/distill.json")
        metrics = json.loads(text) if text else {}
        if metrics.get("state") not in ("complete", "pruned"):
            return False
        self.tell_from_metrics(t, metrics, refs[name][1])
        tqdm.write(f"resume: trial {t.number} ({name}) finished before the runner stopped; result kept")
        return True
