"""Optuna glue of the runner: the storage string, the sampler, and whether a trial's runner is gone.

What the sweep records per trial is in :mod:`kdsweep.sweep.record`, how trials are ranked in
:mod:`kdsweep.sweep.selection`.

The storage is named by one string that both the runner and a trial's process (which runs
in a temporary copy of the repository) resolve the same way: ``journal:<absolute path>`` for
Optuna's JournalFileBackend (the default, ``studies/<study>.journal``; safe for several
processes on one machine), or an RDB URL (``sqlite:///...``, ``postgresql://...``) for several
machines. Relative paths are made absolute against the repository root.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from kdsweep.sweep.record import TrialRecord
from kdsweep.sweep.spec import StudySpec

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


def owner_gone(t: TrialRecord, now: float) -> bool:
    """Whether the runner that owns a RUNNING trial (its record's ``runner`` and ``heartbeat``) is gone.

    On this machine its process is checked; on another, its heartbeat must be younger than
    :data:`STALE_AFTER_S`. A trial with no owner recorded yet is not called gone.
    """
    owner = t.owner
    if not owner:
        return False
    if owner.get("host") == socket.gethostname():
        return not process_alive(owner.get("pid"), owner.get("started"))
    return now - t.heartbeat >= STALE_AFTER_S


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
