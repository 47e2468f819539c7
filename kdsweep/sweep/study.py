"""Optuna glue shared by the runner and the trials: storage, sampler and pruner from the spec.

The storage is named by one string that both the runner and a trial's process (which runs
in a temporary copy of the repository) resolve the same way: ``journal:<absolute path>`` for
Optuna's JournalFileBackend (the default, ``studies/<study>.journal``; safe for several
processes on one machine), or an RDB URL (``sqlite:///...``, ``postgresql://...``) for several
machines. Relative paths are made absolute against the repository root.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from kdsweep.sweep.spec import StudySpec

# Optuna's trial attributes the sweep writes (user_attrs), by name.
EXPERIMENT = "experiment"  # the DVC experiment's name, <study>-<number>
OVERRIDES = "overrides"  # the dotted params.yaml keys the trial set
FAIL_REASON = "fail_reason"  # why a trial failed (the tail of its error output)
INTERRUPTED = "interrupted"  # the runner stopped during the trial; it was retried
RETRY_OF = "retry_of"  # the trial number this one retries
OUTPUTS = "outputs"  # "kept": the trial's experiment holds outputs in the DVC cache
REMOVED = "outputs_removed"  # study attribute: trial numbers whose outputs retention removed
STARTED = "started_at"  # study attribute: when its first runner started (unix time); budget.timeout runs from it
RUNNER = "runner"  # the runner that owns a RUNNING trial: {host, pid, started}
HEARTBEAT = "heartbeat"  # when that runner last said it is alive (time.time())

STALE_AFTER_S = 300.0  # journal storage: a trial owned by another machine is stale after this long without a heartbeat


def storage_url(spec: StudySpec, root: Path) -> str:
    """The storage string of a study (see the module docstring)."""
    s = spec.storage or f"studies/{spec.study}.journal"
    if s.endswith(".journal") and "://" not in s:
        path = Path(s)
        return f"journal:{path if path.is_absolute() else (root / path)}"
    if s.startswith("sqlite:///") and not s.startswith("sqlite:////"):
        return "sqlite:///" + str(root / s[len("sqlite:///") :])
    return s


def process_alive(pid: int | None, started: float | None) -> bool:
    """Whether process ``pid`` on this machine runs and is the one that started at ``started``
    (a reused pid belongs to another process)."""
    import psutil

    if pid is None:
        return False
    try:
        return started is None or abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def owner_gone(attrs: dict[str, Any], now: float) -> bool:
    """Whether the runner that owns a RUNNING trial (its ``runner`` and ``heartbeat`` attributes) is gone.

    On this machine its process is checked; on another, its heartbeat must be younger than
    :data:`STALE_AFTER_S`. A trial with no owner recorded yet is not called gone.
    """
    owner = attrs.get(RUNNER)
    if not owner:
        return False
    if owner.get("host") == socket.gethostname():
        return not process_alive(owner.get("pid"), owner.get("started"))
    return now - attrs.get(HEARTBEAT, 0) >= STALE_AFTER_S


def make_sampler(spec: dict[str, Any], offset: int = 0):
    """The sampler; ``offset`` shifts the seed so a resumed run does not replay the first run's draws."""
    import optuna

    kind = spec["type"]
    seed = None if spec.get("seed") is None else spec["seed"] + offset
    if kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=spec["n_startup_trials"],
            multivariate=spec["multivariate"],
            constant_liar=spec["constant_liar"],
        )
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=spec["n_startup_trials"])
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=spec["n_startup_trials"], warn_independent_sampling=False
        )
    raise ValueError(f"unknown sampler {kind!r}")


def retried(trials) -> set[int]:
    """Numbers of the trials that were retried: marked interrupted by their runner, or named by a
    retry's ``retry_of`` (a trial Optuna failed for a stale heartbeat is finished before anyone can
    mark it, so only its retry says so)."""
    marked = {t.number for t in trials if t.user_attrs.get(INTERRUPTED)}
    return marked | {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}


def counts_toward_budget(trial, retried_numbers: set[int]) -> bool:
    """Complete, pruned and failed trials use the budget; trials that were retried (the runner
    stopped or died during them, see :func:`retried`) do not, their retry does."""
    import optuna

    s = trial.state
    return s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) or (
        s == optuna.trial.TrialState.FAIL and trial.number not in retried_numbers
    )


def last_value(trial) -> float | None:
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def ranked(trials: list, direction: str) -> list:
    """Complete trials by objective, then pruned ones by their last reported value."""
    import optuna

    sign = 1 if direction == "minimize" else -1
    TS = optuna.trial.TrialState

    def key(t):
        v = last_value(t)
        return (0 if t.state == TS.COMPLETE else 1, sign * v if v is not None else float("inf"), t.number)

    return sorted([t for t in trials if t.state in (TS.COMPLETE, TS.PRUNED)], key=key)


def headline(reason: str) -> str:
    """The line of a failure that says why: kdsweep's own ``error:``, else an exception, else the last."""
    lines = [s.strip() for s in reason.splitlines() if s.strip()]
    for pattern in (r"^error: ", r"^\w*(Error|Exception)\b.*: ", r"^ERROR: "):
        found = [s for s in lines if re.match(pattern, s)]
        if found:
            return found[0]
    return lines[-1] if lines else "(no output)"
