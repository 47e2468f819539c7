"""Inside a trial: report each evaluation to the Optuna trial, and stop when the pruner says so.

The runner starts a trial's ``dvc exp run`` with ``KDSWEEP_TRIAL`` set (JSON: storage, study,
trial id and number, pruner, metric, the runner's pid, the params it sampled). ``kdsweep
distill`` passes :func:`eval_hook` (from its ``--trial`` option) to the training loop; after every evaluation
(every ``training.eval_steps``) the hook does::

    trial.report(metrics[metric], step)     # step = optimizer step: the pruner's resource
    if trial.should_prune(): return True    # distill stops, writes state "pruned", exits 0

so a pruned trial is still a recorded DVC experiment, and the runner marks it PRUNED. Under
torchrun only rank 0 has a hook (and opens the study); distill broadcasts its answer, so every
rank stops at the same step.

Every call to the study (loading it, the report, the pruner's answer) rides out a storage
outage: a lost database connection or a journal on a full disk is retried with backoff for up
to ``execution.grace_period`` seconds (:func:`kdsweep.optuna_io.with_retries`, the runner's own
helper), so a database restart shorter than that loses nothing. A longer outage ends the run
with one line naming the storage and the cause, which the runner records as an infrastructure
interruption: the trial is run again and spends no budget.

This module reaches the storage code (:mod:`kdsweep.optuna_io`), which does not change what
distill computes, so distill's ``dvc.yaml`` deps do not list either (``tests/test_code_shape.py``
keeps the hook out of the training closure and checks that editing the storage code leaves
distill up to date).

The hook also stops an orphaned run: if the runner that started it is gone (killed), or the
trial is no longer RUNNING in the study (a restarted runner took it over), it raises, and the
resumed study retries the trial under a new number.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable

from kdsweep.dotted import get as dotted_get
from kdsweep.errors import UserError

ENV = "KDSWEEP_TRIAL"


def eval_hook(context: str | None, params=None) -> Callable[[int, dict], bool] | None:
    """The eval hook of the sweep trial this process belongs to, or None outside a sweep.

    Args:
        context: the trial context as JSON (``kdsweep distill --trial``, which the runner sets
            through ``$KDSWEEP_TRIAL``), or None.
        params: the validated params the stage runs with; checked against what the sweep sampled.
    """
    if not context:
        return None
    from kdsweep.distributed import is_main

    if not is_main():
        return None  # under torchrun rank 0 alone reports; distill gives its answer to the other ranks
    return TrialReporter(json.loads(context), params)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def planned_steps(params) -> int | None:
    """The run's length in optimizer steps when the params fix it (max_steps everywhere), else None."""
    if params.stages.enabled:
        steps = [s.max_steps for s in params.stages.configs]
        return sum(steps) if steps and all(s is not None for s in steps) else None
    return params.training.max_steps


class TrialReporter:
    """``eval_hook(step, metrics) -> stop?`` bound to one Optuna trial."""

    def __init__(self, ctx: dict, params=None):
        import optuna

        from kdsweep.optuna_io import make_pruner, open_storage

        self.ctx = ctx
        self.number, self.metric = ctx["number"], ctx["metric"]
        self.patience = ctx.get("grace_period")  # how long a storage outage is ridden out
        storage = self._retried(lambda: open_storage(ctx["storage"]), "opening the study")
        pruner = make_pruner(ctx["pruner"])
        study = self._retried(
            lambda: optuna.load_study(study_name=ctx["study"], storage=storage, pruner=pruner), "loading the study"
        )
        self.trial = optuna.trial.Trial(study, ctx["trial_id"])
        self._check_running(storage)
        if params is not None and ctx.get("expected"):
            dumped = params.model_dump(mode="json")
            wrong = [
                f"{k}: sampled {v!r}, params.yaml has {dotted_get(dumped, k)!r}"
                for k, v in ctx["expected"].items()
                if not _same(v, dotted_get(dumped, k))
            ]
            if wrong:
                raise UserError(
                    f"trial {self.number}: params.yaml differs from what the sweep sampled:\n  " + "\n  ".join(wrong)
                )
        self._storage = storage
        self.total_steps = planned_steps(params) if params is not None else None
        print(
            f"kdsweep: trial {self.number} of study {ctx['study']!r} reports {self.metric} at every evaluation",
            flush=True,
        )

    def _retried(self, call: Callable, what: str):
        """``call()``, retried while the storage is unreachable, up to the grace period."""
        from kdsweep.optuna_io import with_retries

        return with_retries(call, self.ctx["storage"], f"{what} (trial {self.number})", patience=self.patience)

    def _check_running(self, storage) -> None:
        import optuna

        state = self._retried(lambda: storage.get_trial(self.ctx["trial_id"]), "reading the trial").state
        if state != optuna.trial.TrialState.RUNNING:
            raise UserError(
                f"trial {self.number} is {state.name} in study {self.ctx['study']!r}, not running: "
                f"the sweep runner restarted and retries it under a new number; this run stops"
            )

    def _check_runner(self) -> None:
        import psutil

        pid, started = self.ctx.get("runner_pid"), self.ctx.get("runner_started")
        if pid is None:
            return
        try:
            alive = abs(psutil.Process(pid).create_time() - started) < 1.0
        except psutil.Error:
            alive = False
        if not alive:
            raise UserError(
                f"the sweep runner (pid {pid}) is gone; trial {self.number} stops "
                f"(re-run `kdsweep run` to resume the study)"
            )

    def __call__(self, step: int, metrics: dict) -> bool:
        self._check_runner()
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False  # non-finite losses are distill's to handle
        try:
            self._retried(lambda: self.trial.report(float(value), step), "reporting")
        except RuntimeError:
            self._check_running(self._storage)
            raise
        if self.total_steps is not None and step >= self.total_steps:
            return False  # the run is over anyway: it completes with this value
        if self._retried(self.trial.should_prune, "asking the pruner"):
            print(
                f"kdsweep: the pruner stops trial {self.number} at step {step} ({self.metric} {value:.4f})",
                file=sys.stderr,
                flush=True,
            )
            return True
        return False
