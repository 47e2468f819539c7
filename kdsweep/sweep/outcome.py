"""How a trial's end goes into the study: its metrics, its failure, or its retry.

Each end is recorded with why it happened (the cause taxonomy of :mod:`kdsweep.sweep.record`)::

    experiment recorded, metrics/distill.json state complete  -> tell(value)          ended complete
                                            state pruned      -> tell(PRUNED)         ended pruned
                                            anything else     -> tell(FAIL)           ended failed
    failed before or inside `dvc exp run`, classify(output):
        its configuration (non-finite loss, an error) -> FAIL, ended failed; recorded as an experiment too
        the infrastructure (disk full, storage unreachable, killed for memory, a signal)
            -> :meth:`Outcomes.interrupt`
    Ctrl-C, SIGTERM, or orphaned by a killed runner (its log's cause, else "runner")
            -> :meth:`Outcomes.interrupt`
    its runner's machine died (database storage: no Optuna heartbeat for the grace period)
        -> Optuna's fail_stale_trials fails it, and :func:`retry_stale` enqueues it again

:meth:`Outcomes.interrupt` is the one retry path: FAIL with ``ended: interrupted`` and the
cause (it spends no budget), and the same params enqueued as run ``attempt + 1`` (a stopped
runner does not use up an attempt), at most ``execution.infra_retries`` times in a row; the
worker then backs off (:data:`BACKOFF_S`). Past the bound the runner stops with exit 2 and the
cause; the next ``kdsweep run`` enqueues the trial once more (:meth:`Outcomes.retry_abandoned`).

:meth:`Outcomes.reap` finds trials whose runner is gone, before every claim of a trial
(:mod:`kdsweep.sweep.budget`): Optuna's heartbeats on a database server, else
:meth:`Outcomes.recover` (this machine: the runner's process; another: its ``heartbeat``
attribute). A trial whose experiment DVC recorded keeps its result instead. With
``execution.push``, each recorded experiment is pushed to the git remote and its outputs to
the DVC remote, so every clone can pull it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kdsweep.optuna_io import with_retries
from kdsweep.sweep import dvcexp
from kdsweep.sweep.exprun import kill_group, tail
from kdsweep.sweep.record import (
    COMPLETE,
    FAILED,
    PRUNED,
    Cause,
    TrialRecord,
    classify,
    enqueue,
    interruption,
    records,
    write,
    write_cause,
)
from kdsweep.sweep.spec import StudySpec
from kdsweep.sweep.study import owner_gone, process_alive

BACKOFF_S = (5, 15, 45)  # wait before the next claim after the k-th infrastructure interruption in a row


def _tid(trial) -> int:
    """The storage id of an Optuna trial or of a :class:`TrialRecord`."""
    return trial.trial_id if isinstance(trial, TrialRecord) else trial._trial_id


def backoff(attempt: int) -> float:
    """Seconds to wait after a trial's ``attempt``-th run was interrupted by the infrastructure."""
    return float(BACKOFF_S[min(max(attempt, 1), len(BACKOFF_S)) - 1])


def pause(seconds: float, stopping: Callable[[], bool]) -> None:
    """Wait ``seconds`` (the backoff before the next claim), or less if ``stopping()`` turns true."""
    deadline = time.monotonic() + seconds
    while not stopping() and time.monotonic() < deadline:
        time.sleep(0.2)


def out_of_retries(number: int, name: str, retries: int, cause: Cause) -> str:
    """Why the runner stops: a trial past ``execution.infra_retries``, with its cause and the fix."""
    return (
        f"trial {number} ({name}) was interrupted by the infrastructure again after {retries} "
        f"retr{'y' if retries == 1 else 'ies'} (execution.infra_retries): {cause.line}. Fix the cause and "
        f"run again: the trial is retried without spending the budget"
    )


def next_attempt(t: TrialRecord, cause: Cause) -> int:
    """The attempt number of a retry: a stopped runner (Ctrl-C, killed) is not the trial's fault
    and does not use up its infrastructure retries; any other interruption does."""
    return t.attempt if cause.kind == "runner" else t.attempt + 1


def retry_stale(infra_retries: int, study, trial) -> None:
    """Optuna's ``heartbeat_stale_trial_callback`` (bound to ``execution.infra_retries``): called once
    for each trial ``fail_stale_trials`` failed, by the one process that failed it."""
    t = TrialRecord.of(trial)
    host = t.owner.get("host", "?")
    if t.attempt > infra_retries:
        tqdm.write(f"trial {t.number} ({t.experiment}): no heartbeat from its runner on {host}; not retried again")
        return
    cause = interruption("heartbeat", f"no heartbeat from its runner on {host} for the grace period")
    enqueue(study, t.params, retry_of=t, attempt=t.attempt + 1, cause=cause)
    tqdm.write(
        f"trial {t.number} ({t.experiment}): no heartbeat from its runner on {host} for the grace period; "
        f"marked interrupted and enqueued again"
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

    def set(self, trial, **fields: Any) -> None:
        """Set fields of a running trial's record (an Optuna Trial or FrozenTrial)."""
        write(self.storage, _tid(trial), self.url, **fields)

    def own(self, trial, me: dict) -> None:
        """Make a trial just asked for this runner's: its owner, and a first heartbeat."""
        self.set(trial, runner=me)
        self.beat(trial)

    def beat(self, trial) -> None:
        """Say that this runner still runs ``trial``: Optuna's heartbeat on a database server, and the
        ``heartbeat`` field (which ``kdsweep status`` and journal storage read)."""
        if self.optuna_heartbeats:
            with_retries(lambda: self.storage.record_heartbeat(_tid(trial)), self.url, "recording a heartbeat")
        self.set(trial, heartbeat=time.time())

    def reap(self, me: dict) -> None:
        """Fail, and retry, the running trials whose runner is gone (see the module docstring)."""
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
        self.set(trial, experiment_rev=sha, outputs="kept")
        state = metrics.get("state")
        value = metrics.get(self.spec.objective.metric)
        if state == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            self.set(trial, ended=COMPLETE)
            self._tell(trial, float(value))
        elif state == "pruned":
            self.set(trial, ended=PRUNED)
            self._tell(trial, state=self.TS.PRUNED)
        else:
            reason = f"distill ended in state {state!r} ({self.spec.objective.metric} = {value!r})"
            write_cause(self.storage, _tid(trial), self.url, Cause(FAILED, "config", reason), reason)
            self._tell(trial, state=self.TS.FAIL)
        self.push(f"{self.name}-{trial.number}")

    def _tell(self, trial, value: float | None = None, state=None) -> None:
        # Setting the trial's attributes just before raised if another runner had finished it, so
        # a finished trial here means this tell reached the database and its reply was lost.
        with_retries(
            lambda: self.study.tell(trial.number, value, state=state, skip_if_finished=True), self.url, "telling"
        )

    def fail(self, trial, reason: str, *, overrides: dict | None = None, wall: float | None = None) -> None:
        """Mark a trial failed by its configuration, with its reason; with ``overrides``, record it as a
        DVC experiment so that ``dvc exp show`` lists it."""
        cause = Cause(FAILED, "config", classify(reason).line)
        write_cause(self.storage, _tid(trial), self.url, cause, reason)
        self.set(trial, state="failed")
        if wall is not None:
            self.set(trial, wall_seconds=round(wall, 2))
        if overrides is not None:
            self._record_failed(trial, cause, overrides)
        self._tell(trial, state=self.TS.FAIL)
        tqdm.write(f"trial {trial.number} ({self.name}-{trial.number}): failed: {cause.line[:200]}")

    def _record_failed(self, trial, cause: Cause, overrides: dict) -> None:
        try:
            extra = {"dvc.lock": (self.root / "dvc.lock").read_text()} if self.copy_paths else {}
            metrics = {"state": "failed", "reason": cause.line}
            dvcexp.record_failed(
                self.root, f"{self.name}-{trial.number}", self.baseline_rev, self.params_text, overrides, metrics, extra
            )
        except Exception as e:  # recording is a convenience; the study has the reason either way
            tqdm.write(f"trial {trial.number}: could not record the failed experiment: {e}")
            return
        self.push(f"{self.name}-{trial.number}")

    def interrupt(self, trial, name: str, cause: Cause, reason: str) -> int | None:
        """End a trial the infrastructure interrupted: record the cause, fail it without spending the
        budget, and enqueue its params again. Returns the retry's attempt number; 0 when the trial is
        past ``execution.infra_retries`` (the runner then stops); None when another runner finished it
        first (its heartbeat went stale; that runner enqueued the retry).
        """
        import optuna

        freed = dvcexp.clean_tempdirs(self.root, name)
        try:
            write_cause(self.storage, _tid(trial), self.url, cause, reason)
            self.study.tell(trial.number, state=self.TS.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            return None
        t = TrialRecord.of(self.storage.get_trial(_tid(trial)))
        attempt = next_attempt(t, cause)
        more = f" (removed its temporary copy, {freed / 2**20:.1f} MB)" if freed else ""
        if attempt > self.spec.execution.infra_retries + 1:
            tqdm.write(f"trial {t.number} ({name}): interrupted: {cause.line}; no retries left{more}")
            return 0
        enqueue(self.study, t.params, retry_of=t, attempt=attempt)
        tqdm.write(f"trial {t.number} ({name}): interrupted: {cause.line}; enqueued again (run {attempt}){more}")
        return attempt

    def retry_abandoned(self) -> list[int]:
        """Enqueue once more the interrupted trials nobody retried (a runner that stopped past
        ``execution.infra_retries``, or one killed before it enqueued): their cause may be fixed now."""
        trials = records(self.study)
        named = {t.retry_of for t in trials if t.retry_of is not None}
        again = [t for t in trials if t.interrupted and t.number not in named]
        for t in again:
            enqueue(self.study, t.params, retry_of=t, attempt=1)
            tqdm.write(f"resume: trial {t.number} ({t.experiment}) was interrupted ({t.cause}); enqueued again")
        return [t.number for t in again]

    def recover(self, me: dict) -> None:
        """Trials left RUNNING by a runner that is gone: adopt a recorded result, else interrupt and retry."""
        for t in records(self.study):
            if t.state != self.TS.RUNNING or not self._orphaned(t, me):
                continue
            cause = self._cause_from_log(t)  # before this runner stops the trial's processes itself
            if t.owner.get("host") == me["host"] and process_alive(t.child.get("pid"), t.child.get("started")):
                kill_group(t.child["pid"])
            name = t.experiment or f"{self.name}-{t.number}"
            if self._adopt(t, name):
                continue
            tqdm.write(f"resume: trial {t.number} ({name}) was interrupted ({cause.line})")
            self.interrupt(t, name, cause, cause.line)

    def _cause_from_log(self, t: TrialRecord) -> Cause:
        """Why a trial whose runner is gone stopped: an infrastructure cause its log names, else the runner."""
        log = self.root / "studies" / self.name / "logs" / f"{t.number}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        found = classify(tail(text, lines=40, chars=6000))
        if found.infra:
            return found
        return interruption("runner", "the runner stopped during this trial (Ctrl-C or killed)")

    @staticmethod
    def _orphaned(t: TrialRecord, me: dict) -> bool:
        # A live runner (this one; on this machine: its process; on another: a fresh heartbeat) keeps its trial.
        return t.owner != me and owner_gone(t, time.time())

    def _adopt(self, t: TrialRecord, name: str) -> bool:
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
