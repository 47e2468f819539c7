"""Optuna objects that both the sweep runner and a trial's ``kdsweep distill`` build from plain data.

The storage is named by one string that the runner and a trial's process (which runs in a
temporary copy of the repository) resolve the same way: ``journal:<absolute path>`` for
Optuna's JournalFileBackend, or an RDB URL. The pruner is built from its spec as a dict.
This module lives outside :mod:`kdsweep.sweep` so that the distill stage's code, and so its
``dvc.yaml`` deps, do not include the sweep package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


def open_storage(url: str):
    """An Optuna storage object for a storage string."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(logging.WARNING)
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return optuna.storages.RDBStorage(url)


def display(url: str, root: Path) -> str:
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        return str(path.relative_to(root)) if root in path.parents else str(path)
    return url.split("@")[-1] if "@" in url else url  # no password in the console


def make_pruner(spec: dict[str, Any]):
    """The pruner. Its resource is the optimizer step at which distill evaluated."""
    import optuna

    kind = spec["type"]
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec["n_startup_trials"],
            n_warmup_steps=spec["n_warmup_steps"],
            interval_steps=spec["interval_steps"],
        )
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec["min_resource"],
            reduction_factor=spec["reduction_factor"],
            min_early_stopping_rate=spec["min_early_stopping_rate"],
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec["min_resource"],
            max_resource=spec["max_resource"],
            reduction_factor=spec["reduction_factor"],
        )
    return optuna.pruners.NopPruner()
