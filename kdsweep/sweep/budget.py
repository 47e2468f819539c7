"""The study's budget, held by every runner on every machine (``budget.n_trials``, ``budget.timeout``).

Each worker thread of each runner gets its next trial from :meth:`StudyBudget.claim`::

    under the study's lock (optuna_io.storage_lock: flock beside a journal, pg_advisory_lock on PostgreSQL)
        reap(): fail the trials whose runner is gone, enqueue each once more      (outcome.py)
        counted = complete + pruned + failed trials; interrupted ones (record.py) spend nothing
        running = RUNNING trials, whichever runner runs them
        past the study's deadline (its start + timeout)                -> None
        counted + running < n_trials                                   -> ask(), own(trial): the trial
        counted >= n_trials, or every running trial is this runner's   -> None
        otherwise another runner's trial may still die and need its retry: wait, then look again

"Is there budget left" and "start a trial" are one critical section, so two runners never both
take the last trial, and a trial a dead runner left behind is retried within the budget. The
timeout runs from the study's start, written into the study once (:func:`study_start`).

:class:`Heartbeats` keeps the trials a runner runs alive: Optuna's heartbeat on a database
server (its grace period decides when another runner fails the trial), the ``heartbeat``
attribute everywhere (``kdsweep status`` reads it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tqdm import tqdm

from kdsweep.optuna_io import storage_lock, with_retries
from kdsweep.sweep.record import StudyRecord, TrialRecord, retried, spends_budget
from kdsweep.sweep.spec import Budget

_WAIT = object()  # claim's verdict: no trial now, but perhaps after another runner's trial ends


def study_start(study) -> float:
    """When the study started (unix time): set by its first runner, read by every later one.
    Call it under :func:`kdsweep.optuna_io.storage_lock`."""
    started = StudyRecord.of(study).started
    if started is None:
        started = time.time()
        StudyRecord.set_started(study, started)
    return float(started)


def spent(trials: list[TrialRecord]) -> int:
    """How many trials spent the budget: complete, pruned and failed ones, not interrupted ones."""
    again = retried(trials)
    return sum(spends_budget(t, again) for t in trials)


class StudyBudget:
    """Hands out the study's trials to one runner's workers (see the module docstring)."""

    def __init__(
        self,
        study,
        url: str,
        budget: Budget,
        started: float,
        *,
        reap: Callable[[], None],
        own: Callable[[object], None],
        poll_s: float,
    ):
        self.study, self.url, self.name = study, url, study.study_name
        self.n_trials = budget.n_trials
        self.deadline = started + budget.timeout if budget.timeout else None
        self.reap, self.own, self.poll_s = reap, own, poll_s
        self.counted = 0  # trials that used the budget, at the last look

    def claim(self, mine: Callable[[], set[int]], stopping: Callable[[], bool]):
        """The next trial for a worker, owned by this runner, or None when the budget is spent."""
        waiting = False
        while not stopping():
            verdict = with_retries(lambda: self._try_claim(mine()), self.url, "claiming a trial")
            if verdict is not _WAIT:
                return verdict
            if not waiting:
                tqdm.write(
                    f"{self.name}: {self.counted} of {self.n_trials} trials finished, the rest running on other "
                    f"runners; waiting in case one of them stops and its trial is retried"
                )
                waiting = True
            time.sleep(self.poll_s)
        return None

    def _try_claim(self, mine: set[int]):
        import optuna

        with storage_lock(self.url, self.name):
            self.reap()
            trials = [TrialRecord.of(t) for t in self.study.get_trials(deepcopy=False)]
            self.counted = spent(trials)
            running = {t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING}
            if self.deadline is not None and time.time() > self.deadline:
                return None
            if self.n_trials is None or self.counted + len(running) < self.n_trials:
                trial = self.study.ask()
                self.own(trial)  # before the lock is released: others see its owner and heartbeat
                return trial
            if self.counted >= self.n_trials or running <= mine:
                return None
            return _WAIT


class Heartbeats:
    """A thread that calls ``beat(trial)`` every ``interval`` seconds for each trial added."""

    def __init__(self, beat: Callable[[object], None], interval: float):
        self.beat, self.interval = beat, interval
        self.trials: dict[int, object] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)
        self.thread.start()

    def add(self, trial) -> None:
        """Beat for ``trial`` from now on."""
        self.trials[trial.number] = trial

    def discard(self, trial) -> None:
        """Stop beating for ``trial``."""
        self.trials.pop(trial.number, None)

    def close(self) -> None:
        """Stop the thread."""
        self.stopped.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        import optuna

        while not self.stopped.wait(self.interval):
            for number, trial in list(self.trials.items()):
                try:
                    self.beat(trial)
                except optuna.exceptions.UpdateFinishedTrialError:
                    self.trials.pop(number, None)  # it ended between the look and the beat
                except Exception as e:  # a heartbeat that fails must not end the runner; the next one may work
                    tqdm.write(f"warning: heartbeat of trial {number} failed: {type(e).__name__}: {e}")
