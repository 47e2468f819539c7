"""Which trials are best, and which is the baseline: one ranking for the runner, ``status``,
``best``, ``report``, retention and test evaluation.

    ranked   = complete trials by objective (ties: the lower number first),
               then pruned trials by their last reported value
    best     = ranked's first complete trial (None while none completed)
    baseline = the spec's first baseline trial, followed along its retries to the one that
               finished (an interrupted baseline is run again), else trial 0

Only validation values enter: the test split never selects (see :mod:`kdsweep.sweep.testeval`).
"""

from __future__ import annotations

from kdsweep.sweep.record import TrialRecord


def ranked(trials: list[TrialRecord], direction: str) -> list[TrialRecord]:
    """Complete trials by objective, then pruned ones by their last reported value."""
    sign = 1 if direction == "minimize" else -1

    def key(t: TrialRecord):
        v = t.last_value
        return (0 if t.state.name == "COMPLETE" else 1, sign * v if v is not None else float("inf"), t.number)

    return sorted([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")], key=key)


def best(trials: list[TrialRecord], direction: str) -> TrialRecord | None:
    """The best complete trial, or None."""
    return next((t for t in ranked(trials, direction) if t.state.name == "COMPLETE"), None)


def baseline(trials: list[TrialRecord]) -> tuple[TrialRecord | None, str]:
    """The trial the best is compared with (see the module docstring), and how to name it."""
    by_number = {t.number: t for t in trials}
    base = next((t for t in trials if t.baseline == 0), None)
    if base is None:
        return by_number.get(0), "the first trial: the study has no baseline"
    retries = {t.retry_of: t for t in trials if t.retry_of is not None}
    while base.number in retries and base.value is None:
        base = retries[base.number]
    return base, "the baseline"


def baselines(trials: list[TrialRecord]) -> set[int]:
    """The baseline trials and their retries (retention keeps them, so the best can be compared on test)."""
    keep = {t.number for t in trials if t.baseline is not None}
    for t in sorted(trials, key=lambda t: t.number):
        if t.retry_of in keep:
            keep.add(t.number)
    return keep
