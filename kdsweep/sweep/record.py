"""A trial's bookkeeping, typed: the only code that reads or writes Optuna's user attributes.

Optuna keeps a free-form dict of "user attributes" per trial and per study. The sweep keeps its
bookkeeping there (which DVC experiment a trial is, who runs it, why it ended), so that every
runner on every machine and ``kdsweep status``/``best``/``report`` see the same record. This
module is the one place that knows the attribute names: the rest of the sweep reads
:class:`TrialRecord` and :class:`StudyRecord` and writes through :func:`write`, :func:`enqueue`
and the ``StudyRecord.set_*`` functions (``tests/test_code_shape.py`` keeps it so).

Why each finished trial ended (``ended``), and whether it spends the budget::

    complete      its metrics say complete, with a finite objective        -> spends one trial
    pruned        the pruner stopped it                                    -> spends one trial
    failed        its configuration failed it (non-finite loss, an error)  -> spends one trial
    interrupted   the infrastructure stopped it (``cause_kind``, below)    -> spends nothing; the same
                  params run again as a new trial (``retry_of``, ``attempt`` + 1), up to
                  ``execution.infra_retries`` attempts

Infrastructure causes (``cause_kind``), each found by :func:`classify` from the trial's output:
``disk_full`` (ENOSPC), ``storage`` (the study's database unreachable), ``memory`` (killed by the
OS for memory: SIGKILL, exit 137, an out-of-memory error), ``signal`` (killed by another signal),
and, set where they happen, ``heartbeat`` (its runner's machine stopped beating) and ``runner``
(its runner stopped: Ctrl-C, SIGTERM, SIGKILL). ``cause`` is the one line that says why (the
log's decisive line, e.g. ``OSError: [Errno 28] No space left on device``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any

from kdsweep.optuna_io import with_retries

COMPLETE, PRUNED, FAILED, INTERRUPTED = "complete", "pruned", "failed", "interrupted"
CONFIG = "config"  # cause_kind of a trial its own configuration failed

# Infrastructure causes found in a trial's output, checked in this order: (kind, pattern of the decisive line).
INFRA_PATTERNS = (
    ("disk_full", r"No space left on device|\bENOSPC\b|\[Errno 28\]|Disk quota exceeded"),
    (
        "storage",
        r"could not connect to server|Connection refused|server closed the connection|"
        r"terminating connection due to administrator command|the database system is (shutting down|starting up)|"
        r"connection lost while",
    ),
    ("memory", r"exited with (-9|137)\b|\bOut of memory\b|\bMemoryError\b|CUDA out of memory|^Killed$"),
    ("signal", r"exited with -\d+\b|killed by signal"),
)
INFRA_KINDS = (*(k for k, _ in INFRA_PATTERNS), "heartbeat", "runner")

# The trial attributes that writers may set; their names are the storage's (kept from older studies).
TRIAL_FIELDS = {
    "experiment",  # the DVC experiment's name, <study>-<number>
    "overrides",  # the dotted params.yaml keys the trial set
    "experiment_rev",  # the commit DVC recorded the experiment at
    "outputs",  # "kept": the trial's experiment holds outputs in the DVC cache
    "state",  # the state distill wrote into metrics/distill.json
    "val_loss",
    "best_val_loss",
    "steps",
    "wall_seconds",
    "train_seconds",
    "overhead_seconds",
    "dvc_setup_seconds",
    "distill_import_seconds",
    "distill_save_seconds",
    "runner",  # the runner that owns a RUNNING trial: {host, pid, started}
    "heartbeat",  # when that runner last said it is alive (time.time())
    "child",  # the trial's `dvc exp run` process: {host, pid, started}
    "ended",  # complete | pruned | failed | interrupted
    "cause_kind",  # config, or one of INFRA_KINDS
    "cause",  # the one line that says why it failed or was interrupted
    "fail_reason",  # the tail of its error output
}


@dataclass(frozen=True)
class Cause:
    """Why a trial did not complete: ``ended`` is failed or interrupted, ``kind`` config or an infra kind."""

    ended: str
    kind: str
    line: str

    @property
    def infra(self) -> bool:
        return self.ended == INTERRUPTED


def headline(reason: str) -> str:
    """The line of a failure that says why: kdsweep's own ``error:``, else an exception, else the last."""
    lines = [s.strip() for s in reason.splitlines() if s.strip()]
    for pattern in (r"^error: ", r"^\w*(Error|Exception)\b.*: ", r"^ERROR: "):
        found = [s for s in lines if re.match(pattern, s)]
        if found:
            return found[0]
    return lines[-1] if lines else "(no output)"


def classify(output: str) -> Cause:
    """Why a trial whose output (log tail or error text) is ``output`` ended: an infrastructure
    cause when one of :data:`INFRA_PATTERNS` matches a line, else its configuration."""
    lines = [s.strip() for s in output.splitlines() if s.strip()]
    for kind, pattern in INFRA_PATTERNS:
        found = [s for s in lines if re.search(pattern, s, flags=re.IGNORECASE if kind != "memory" else 0)]
        if found:
            return Cause(INTERRUPTED, kind, found[-1][:300])
    return Cause(FAILED, CONFIG, headline(output)[:300])


def interruption(kind: str, line: str) -> Cause:
    """An infrastructure interruption found where it happened (``heartbeat``, ``runner``)."""
    return Cause(INTERRUPTED, kind, line)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the sweep sees it: Optuna's state, value and params, and the sweep's attributes."""

    number: int
    trial_id: int
    state: Any  # optuna.trial.TrialState
    value: float | None
    params: dict[str, Any]
    intermediate_values: dict[int, float]
    datetime_start: Any
    datetime_complete: Any
    attrs: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, trial) -> TrialRecord:
        """The record of an Optuna ``FrozenTrial``."""
        frozen = trial
        return cls(
            number=frozen.number,
            trial_id=frozen._trial_id,
            state=frozen.state,
            value=frozen.value if frozen.state.name == "COMPLETE" else None,
            params=dict(frozen.params),
            intermediate_values=dict(frozen.intermediate_values),
            datetime_start=frozen.datetime_start,
            datetime_complete=frozen.datetime_complete,
            attrs=dict(frozen.user_attrs),
        )

    def get(self, name: str, default: Any = None) -> Any:
        """A bookkeeping field by its name in :data:`TRIAL_FIELDS` (timings, metrics, owner)."""
        if name not in TRIAL_FIELDS:
            raise KeyError(f"not a trial record field: {name}")
        return self.attrs.get(name, default)

    @property
    def experiment(self) -> str | None:
        return self.attrs.get("experiment")

    @property
    def overrides(self) -> dict[str, Any]:
        return self.attrs.get("overrides") or {}

    @property
    def outputs_kept(self) -> bool:
        return self.attrs.get("outputs") == "kept"

    @property
    def retry_of(self) -> int | None:
        return self.attrs.get("retry_of")

    @property
    def attempt(self) -> int:
        """1 for a first run; a retry after an interruption is its original's attempt + 1."""
        return int(self.attrs.get("attempt", 1))

    @property
    def baseline(self) -> int | None:
        """The index of the spec's baseline this trial runs, or None."""
        return self.attrs.get("baseline")

    @property
    def owner(self) -> dict[str, Any]:
        return self.attrs.get("runner") or {}

    @property
    def child(self) -> dict[str, Any]:
        return self.attrs.get("child") or {}

    @property
    def heartbeat(self) -> float:
        return float(self.attrs.get("heartbeat", 0))

    @property
    def interrupted(self) -> bool:
        """Ended by the infrastructure (older studies marked it ``interrupted: true``)."""
        marked = self.attrs.get("ended") == INTERRUPTED or bool(self.attrs.get("interrupted"))
        return self.state.name == "FAIL" and marked

    @property
    def ended(self) -> str | None:
        """complete, pruned, failed or interrupted; None while it runs or waits."""
        by_state = {"COMPLETE": COMPLETE, "PRUNED": PRUNED}
        if self.state.name in by_state:
            return by_state[self.state.name]
        if self.state.name == "FAIL":
            return INTERRUPTED if self.interrupted else FAILED
        return None

    @property
    def cause(self) -> str:
        """The one line that says why it failed or was interrupted ("" for other trials)."""
        if self.state.name != "FAIL":
            return ""
        return self.attrs.get("cause") or headline(self.attrs.get("fail_reason") or "")

    @property
    def cause_kind(self) -> str | None:
        return self.attrs.get("cause_kind") or ("runner" if self.interrupted else None)

    @property
    def last_value(self) -> float | None:
        """The objective, else the last value reported to the pruner."""
        if self.value is not None:
            return self.value
        if self.intermediate_values:
            return self.intermediate_values[max(self.intermediate_values)]
        return None


def records(study) -> list[TrialRecord]:
    """Every trial of ``study``, as records, by number.

    A trial Optuna failed for a stale heartbeat was finished before anyone could write its cause,
    so its retry carries it (``retry_cause``); its record reads it from there.
    """
    trials = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    carried = {
        t.retry_of: t.attrs["retry_cause"] for t in trials if t.retry_of is not None and "retry_cause" in t.attrs
    }
    return [
        dataclasses.replace(t, attrs={**t.attrs, "ended": INTERRUPTED, **carried[t.number]})
        if t.number in carried and t.state.name == "FAIL" and not t.interrupted
        else t
        for t in trials
    ]


def write(storage, trial_id: int, url: str, **fields: Any) -> None:
    """Set fields of a running trial's record (names from :data:`TRIAL_FIELDS`), each retried while
    the database connection is lost."""
    unknown = set(fields) - TRIAL_FIELDS
    if unknown:
        raise ValueError(f"not trial record fields: {sorted(unknown)}")
    for k, v in fields.items():
        call = functools.partial(storage.set_trial_user_attr, trial_id, k, v)
        with_retries(call, url, f"setting {k}")


def write_cause(storage, trial_id: int, url: str, cause: Cause, reason: str) -> None:
    """Record why a trial failed or was interrupted: its cause and the tail of its output."""
    fields = {"ended": cause.ended, "cause_kind": cause.kind, "cause": cause.line, "fail_reason": reason[-2000:]}
    write(storage, trial_id, url, **fields)


def enqueue(
    study,
    params: dict[str, Any],
    *,
    retry_of: TrialRecord | None = None,
    attempt: int = 1,
    baseline: int | None = None,
    cause: Cause | None = None,
) -> None:
    """Enqueue ``params`` as a new trial: a baseline, or run ``attempt`` of an interrupted trial
    (with ``cause`` when the interrupted trial could not take it itself: it was already finished)."""
    attrs: dict[str, Any] = {}
    if retry_of is not None:
        attrs = {"retry_of": retry_of.number, "attempt": attempt}
    if cause is not None:
        attrs["retry_cause"] = {"cause_kind": cause.kind, "cause": cause.line}
    if baseline is not None:
        attrs["baseline"] = baseline
    study.enqueue_trial(params, user_attrs=attrs)


def retried(trials: list[TrialRecord]) -> set[int]:
    """Numbers of the trials that were interrupted and run again (named by a retry's ``retry_of``;
    a trial Optuna failed for a stale heartbeat is finished before anyone can mark it)."""
    marked = {t.number for t in trials if t.interrupted}
    return marked | {t.retry_of for t in trials if t.retry_of is not None}


def spends_budget(t: TrialRecord, retried_numbers: set[int]) -> bool:
    """Complete, pruned and failed trials spend the budget; interrupted ones do not, their retry does."""
    if t.state.name in ("COMPLETE", "PRUNED"):
        return True
    return t.state.name == "FAIL" and t.number not in retried_numbers


@dataclass(frozen=True)
class StudyRecord:
    """The study's own attributes: its objective, spec, start, and the outputs retention removed."""

    attrs: dict[str, Any]

    @classmethod
    def of(cls, study) -> StudyRecord:
        return cls(dict(study.user_attrs))

    @property
    def objective(self) -> dict[str, str] | None:
        """``{"metric", "direction"}`` the study was created with (older studies: their last spec's)."""
        stored = self.attrs.get("objective")
        if stored:
            return stored
        spec = self.attrs.get("spec") or {}
        return {k: spec["objective"][k] for k in ("metric", "direction")} if spec.get("objective") else None

    @property
    def spec(self) -> dict[str, Any] | None:
        return self.attrs.get("spec")

    @property
    def started(self) -> float | None:
        return self.attrs.get("started_at")

    @property
    def removed(self) -> set[int]:
        """Trial numbers whose outputs retention removed (a finished trial's own attrs are frozen)."""
        return set(self.attrs.get("outputs_removed", []))

    @property
    def baselines_enqueued(self) -> bool:
        return bool(self.attrs.get("baselines_enqueued"))

    @staticmethod
    def set_objective(study, metric: str, direction: str) -> None:
        study.set_user_attr("objective", {"metric": metric, "direction": direction})

    @staticmethod
    def set_spec(study, spec: dict[str, Any], root: str) -> None:
        study.set_user_attr("spec", spec)
        study.set_user_attr("root", root)

    @staticmethod
    def set_started(study, when: float) -> None:
        study.set_user_attr("started_at", when)

    @staticmethod
    def set_removed(study, numbers: set[int]) -> None:
        study.set_user_attr("outputs_removed", sorted(numbers))

    @staticmethod
    def set_baselines_enqueued(study) -> None:
        study.set_user_attr("baselines_enqueued", True)
