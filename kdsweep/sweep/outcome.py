"""How a trial's end goes into the study: its metrics, its failure, or its retry.

    experiment recorded, metrics/distill.json state complete  -> tell(value)
                                            state pruned      -> tell(PRUNED)
                                            anything else     -> tell(FAIL), with the reason
    failed before or inside `dvc exp run`  -> FAIL with the reason; recorded as an experiment too
    interrupted (Ctrl-C, SIGTERM) or orphaned by a killed runner -> FAIL, marked interrupted,
        and the same params enqueued again (:meth:`Outcomes.requeue`, the one retry path)
    its runner's machine died (database storage: no Optuna heartbeat for the grace period)
        -> Optuna's fail_stale_trials fails it, and :func:`retry_stale` enqueues it again once

:meth:`Outcomes.reap` finds trials whose runner is gone, before every claim of a trial
(:mod:`kdsweep.sweep.budget`): Optuna's heartbeats on a database server, else
:meth:`Outcomes.recover` (this machine: the runner's process; another: its ``heartbeat``
attribute). A trial whose experiment DVC recorded keeps its result instead. With
``execution.push``, each recorded experiment is pushed to the git remote and its outputs to
the DVC remote, so every clone can pull it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kdsweep.optuna_io import with_retries
from kdsweep.sweep import dvcexp
from kdsweep.sweep.exprun import kill_group
from kdsweep.sweep.spec import StudySpec
from kdsweep.sweep.study import (
    EXPERIMENT,
    FAIL_REASON,
    HEARTBEAT,
    INTERRUPTED,
    OUTPUTS,
    RETRY_OF,
    RUNNER,
    headline,
    owner_gone,
    process_alive,
)


def enqueue_retry(study, trial) -> None:
    """Enqueue a stopped trial's params once more, as a new trial that names it in ``retry_of``."""
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


def retry_stale(study, trial) -> None:
    """Optuna's ``heartbeat_stale_trial_callback``: called once for each trial ``fail_stale_trials``
    failed, by the one process that failed it."""
    enqueue_retry(study, trial)
    host = (trial.user_attrs.get(RUNNER) or {}).get("host", "?")
    tqdm.write(
        f"trial {trial.number} ({trial.user_attrs.get(EXPERIMENT)}): no heartbeat from its runner on {host} for the "
        f"grace period; marked failed and enqueued again"
    )


class Outcomes:
    """Writes trials' results into one study (and failed trials into DVC's experiment list)."""

    def __init__(self, study, storage, url: str, spec: StudySpec, root: Path, params_text: str, copy_paths: list[str]):
        import optuna

        self.TS = optuna.trial.TrialState
        self.study = study
        self.storage = storage
        self.url = url
        self.optuna_heartbeats = getattr(storage, "heartbeat_interval", None) is not None
        self.spec = spec
        self.name = spec.study
        self.root = root
        self.params_text = params_text
        self.copy_paths = copy_paths
        self.baseline_rev = dvcexp.git(root, "rev-parse", "HEAD").strip()

    def set(self, trial, **attrs: Any) -> None:
        """Set user attributes of a running trial (an Optuna Trial or FrozenTrial)."""
        set_attr = self.storage.set_trial_user_attr
        for k, v in attrs.items():
            with_retries(functools.partial(set_attr, trial._trial_id, k, v), self.url, f"setting {k}")

    def own(self, trial, me: dict) -> None:
        """Make a trial just asked for this runner's: its owner, and a first heartbeat."""
        self.set(trial, **{RUNNER: me})
        self.beat(trial)

    def beat(self, trial) -> None:
        """Say that this runner still runs ``trial``: Optuna's heartbeat on a database server, and the
        ``heartbeat`` attribute (which ``kdsweep status`` and journal storage read)."""
        if self.optuna_heartbeats:
            with_retries(lambda: self.storage.record_heartbeat(trial._trial_id), self.url, "recording a heartbeat")
        self.set(trial, **{HEARTBEAT: time.time()})

    def reap(self, me: dict) -> None:
        """Fail, and retry once, the running trials whose runner is gone (see the module docstring)."""
        if self.optuna_heartbeats:
            import optuna

            optuna.storages.fail_stale_trials(self.study)
        else:
            self.recover(me)

    def push(self, name: str) -> None:
        """With ``execution.push``: push experiment ``name`` (refs to that git remote, outputs to the DVC remote)."""
        remote = self.spec.execution.push
        if remote:
            problem = dvcexp.push_experiment(self.root, remote, name)
            if problem:
                tqdm.write(f"warning: could not push {name} to {remote}: {problem}")

    def tell_from_metrics(self, trial, metrics: dict, sha: str) -> None:
        """End a trial whose experiment DVC recorded at ``sha``, by the state in its metrics."""
        self.set(trial, **{k: metrics[k] for k in ("state", "val_loss", "best_val_loss", "steps") if k in metrics})
        self.set(trial, experiment_rev=sha, **{OUTPUTS: "kept"})
        state = metrics.get("state")
        value = metrics.get(self.spec.objective.metric)
        if state == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            self._tell(trial, float(value))
        elif state == "pruned":
            self._tell(trial, state=self.TS.PRUNED)
        else:
            reason = f"distill ended in state {state!r} ({self.spec.objective.metric} = {value!r})"
            self.set(trial, **{FAIL_REASON: reason})
            self._tell(trial, state=self.TS.FAIL)
        self.push(f"{self.name}-{trial.number}")

    def _tell(self, trial, value: float | None = None, state=None) -> None:
        # Setting the trial's attributes just before raised if another runner had finished it, so
        # a finished trial here means this tell reached the database and its reply was lost.
        with_retries(
            lambda: self.study.tell(trial.number, value, state=state, skip_if_finished=True), self.url, "telling"
        )

    def fail(self, trial, reason: str, *, overrides: dict | None = None, wall: float | None = None) -> None:
        """Mark a trial failed with its reason; with ``overrides``, record it as a DVC experiment
        so that ``dvc exp show`` lists it."""
        self.set(trial, **{FAIL_REASON: reason[-2000:], "state": "failed"})
        if wall is not None:
            self.set(trial, wall_seconds=round(wall, 2))
        if overrides is not None:
            self._record_failed(trial, reason, overrides)
        self._tell(trial, state=self.TS.FAIL)
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
            return
        self.push(f"{self.name}-{trial.number}")

    def requeue(self, trial, name: str, reason: str) -> int:
        """Fail an interrupted trial and enqueue its params again; returns the bytes its leftovers freed.

        Whoever finishes the trial enqueues its retry: if another runner failed it first (its
        heartbeat went stale), that runner did, and this one enqueues nothing.
        """
        import optuna

        freed = dvcexp.clean_tempdirs(self.root, name)
        try:
            self.set(trial, **{INTERRUPTED: True, FAIL_REASON: reason})
            self.study.tell(trial.number, state=self.TS.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            return freed
        enqueue_retry(self.study, trial)
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
        # A live runner (this one; on this machine: its process; on another: a fresh heartbeat) keeps its trial.
        return owner != me and owner_gone(t.user_attrs, time.time())

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
