"""The typed study spec: ``experiments/<study>.yaml``, validated like ``params.yaml``.

A study spec says what to optimise (``objective``), over which ``params.yaml`` keys
(``space``, ``lr_multipliers``, ``stage_layouts``), with what held fixed (``fixed``), which
trials to run first (``baselines``), how to search (``sampler``) and stop early (``pruner``),
for how long (``budget``), where the study lives (``storage``), how many trials run at once
(``workers``) and how many trials keep their checkpoints (``retention``). Every field is
documented in ``docs/study-spec.md``.

This module checks the spec's *shape* only; :mod:`kdsweep.sweep.plan` checks it against
``params.yaml``, ``dvc.yaml`` and the student (unknown keys, ranges the params schema refuses,
temperatures outside the cache, patterns matching no parameter).
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from kdsweep.config import RegexPattern, problem_lines, read_yaml
from kdsweep.errors import UserError

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- distributions
def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


class _Conditional(_Strict):
    when: dict[str, Any] | None = Field(
        None,
        description="Sample this only when every named parameter (an Optuna param name of this spec) has the "
        "given value, or one of the given values if a list.",
    )

    @field_validator("when")
    @classmethod
    def _when_values(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key, allowed in (v or {}).items():
            values = allowed if isinstance(allowed, list) else [allowed]
            if not values or not all(_is_scalar(x) for x in values):
                raise ValueError(
                    f"`when.{key}` must be a value or a non-empty list of values (numbers, strings, booleans, null)"
                )
        return v


def _check_range(low, high, log: bool, step, *, stepped: bool, low_hint: str) -> None:
    """The checks a numeric range shares, float or int (``stepped``: a step other than the default)."""
    if not low < high:
        raise ValueError(
            f"empty range: low must be < high, got low={low}, high={high} (for a single value use `fixed`)"
        )
    if log and low <= 0:
        raise ValueError(f"log: true needs low {low_hint}, got low={low}")
    if log and stepped:
        raise ValueError("log and step cannot be combined (Optuna samples a stepped range linearly)")
    if stepped and step > high - low:
        raise ValueError(f"step {step} is larger than the range high - low = {high - low}")


class FloatDist(_Conditional):
    """A float in [low, high]; ``log`` samples uniformly in log space; ``step`` discretises."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatDist:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite numbers, got low={self.low}, high={self.high}")
        _check_range(self.low, self.high, self.log, self.step, stepped=self.step is not None, low_hint="> 0")
        return self


class IntDist(_Conditional):
    """An integer in [low, high] (both included), every ``step``; ``log`` samples in log space."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> IntDist:
        _check_range(self.low, self.high, self.log, self.step, stepped=self.step != 1, low_hint=">= 1")
        return self


class CategoricalDist(_Conditional):
    """One of ``choices`` (numbers, strings, booleans or null)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[Any]) -> list[Any]:
        bad = [x for x in v if not _is_scalar(x)]
        if bad:
            raise ValueError(
                f"choices must be numbers, strings, booleans or null, got {bad[0]!r}; "
                f"for list-valued keys use `lr_multipliers` or `stage_layouts`"
            )
        if len({(type(x), x) for x in v}) != len(v):
            raise ValueError(f"choices must be distinct, got {v}")
        return v


Dist = Annotated[FloatDist | IntDist | CategoricalDist, Field(discriminator="type")]


def _value_or_dist(v: Any) -> str:
    return "dist" if isinstance(v, dict) else "value"


# A number held fixed, or a distribution to sample it from.
NumberOrDist = Annotated[Annotated[float, Tag("value")] | Annotated[Dist, Tag("dist")], Discriminator(_value_or_dist)]


class LRMultiplierKnob(_Conditional):
    """One ``parameter_lr_multipliers`` rule whose multiplier the study sets or samples."""

    pattern: RegexPattern = Field(description="The rule's regex (re.fullmatch on parameter names).")
    lr_multiplier: NumberOrDist = Field(description="A number, or a float/categorical distribution.")

    @model_validator(mode="after")
    def _nonnegative(self) -> LRMultiplierKnob:
        lm = self.lr_multiplier
        low = lm if isinstance(lm, float) else getattr(lm, "low", 0)
        if isinstance(lm, CategoricalDist):
            low = min((x for x in lm.choices if isinstance(x, (int, float))), default=0)
        if low < 0:
            raise ValueError(f"lr_multiplier must be >= 0 (0 freezes), got {low}")
        return self


# --------------------------------------------------------------------------- objective
EVAL_METRICS = ("val_loss", "val_kl", "val_top1_agreement", "val_perplexity")
FINAL_METRICS = EVAL_METRICS + ("best_val_loss",)


class Objective(_Strict):
    metric: str = Field("val_loss", description="Key of metrics/distill.json the study optimises.")
    direction: Literal["minimize", "maximize"] = "minimize"
    report: str | None = Field(
        None,
        description="Metric reported to the pruner at every evaluation; null = `metric` (val_loss for best_val_loss).",
    )

    @field_validator("metric", "report")
    @classmethod
    def _known(cls, value: str | None, info) -> str | None:
        known = FINAL_METRICS if info.field_name == "metric" else EVAL_METRICS
        if value is not None and value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known: {', '.join(known)}"
            raise ValueError(f"unknown metric {value!r}; {hint}")
        return value

    @property
    def report_metric(self) -> str:
        if self.report:
            return self.report
        return "val_loss" if self.metric == "best_val_loss" else self.metric


# --------------------------------------------------------------------------- sampler, pruner
class TPESamplerSpec(_Strict):
    type: Literal["tpe"]
    seed: int | None = Field(0, description="Seed; a resumed run uses seed + trials already in the study.")
    n_startup_trials: int = Field(5, ge=0, description="Random trials before TPE starts modelling.")
    multivariate: bool = True
    constant_liar: bool = Field(True, description="Avoid sampling the same point for trials running at once.")


class RandomSamplerSpec(_Strict):
    type: Literal["random"]
    seed: int | None = 0


class GPSamplerSpec(_Strict):
    type: Literal["gp"]
    seed: int | None = 0
    n_startup_trials: int = Field(5, ge=0)


class CmaEsSamplerSpec(_Strict):
    type: Literal["cmaes"]
    seed: int | None = 0
    n_startup_trials: int = Field(1, ge=0)


def _default_type(default: str):
    def fill(v: Any) -> Any:
        if isinstance(v, dict) and "type" not in v:
            return {"type": default, **v}
        return v

    return fill


SamplerSpec = Annotated[
    TPESamplerSpec | RandomSamplerSpec | GPSamplerSpec | CmaEsSamplerSpec, Field(discriminator="type")
]


class MedianPrunerSpec(_Strict):
    type: Literal["median"]
    n_startup_trials: int = Field(2, ge=0, description="Finished trials before any pruning.")
    n_warmup_steps: int = Field(0, ge=0, description="Optimizer steps of each trial before it can be pruned.")
    interval_steps: int = Field(1, ge=1)


class SuccessiveHalvingPrunerSpec(_Strict):
    type: Literal["successive_halving"]
    min_resource: int | Literal["auto"] = Field("auto", description="Optimizer steps before the first rung.")
    reduction_factor: int = Field(3, ge=2)
    min_early_stopping_rate: int = Field(0, ge=0)


class HyperbandPrunerSpec(_Strict):
    type: Literal["hyperband"]
    min_resource: int = Field(1, ge=1, description="Optimizer steps before the first rung.")
    max_resource: int | Literal["auto"] = Field("auto", description="A trial's full length in optimizer steps.")
    reduction_factor: int = Field(3, ge=2)


class NoPrunerSpec(_Strict):
    type: Literal["none"]


PrunerSpec = Annotated[
    MedianPrunerSpec | SuccessiveHalvingPrunerSpec | HyperbandPrunerSpec | NoPrunerSpec,
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------- budget and the rest
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(v: Any) -> float:
    """Seconds from a number or a string like ``90``, ``90s``, ``15m``, ``2h``."""
    if isinstance(v, bool):
        raise ValueError(f"a duration is seconds or a string like '15m', got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"a duration is seconds or a string like '90s', '15m', '2h', got {v!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


class Budget(_Strict):
    n_trials: int | None = Field(None, ge=1, description="Trials that run to an end (complete, pruned or failed).")
    timeout: float | None = Field(None, gt=0, description="Start no trial after this long (seconds, or '15m').")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("needs n_trials, timeout or both")
        return self


class Retention(_Strict):
    keep_best: int | None = Field(
        3, ge=1, description="Trials whose outputs (models/student, checkpoints) stay in the DVC cache; null = all."
    )


_SLURM_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)$")
# sbatch options `kdsweep run --slurm` writes itself, and the spec key (or flag) that sets each.
SLURM_OWN_OPTIONS = {
    "--array": "kdsweep run --slurm N",
    "--chdir": "the repository root, always",
    "--output": "studies/<study>/slurm/, always",
    "--open-mode": "append, always",
    "--export": "ALL, always",
    "--job-name": "kdsweep-<study>, always",
    "--ntasks": "one runner per array task, always",
    "--gres": "execution.slurm.gres",
    "--partition": "execution.slurm.partition",
    "--time": "execution.slurm.time",
    "--account": "execution.slurm.account",
}
_SHORT = {"-a": "--array", "-D": "--chdir", "-o": "--output", "-J": "--job-name", "-n": "--ntasks"}
_SHORT |= {"-p": "--partition", "-t": "--time", "-A": "--account", "-c": "--cpus-per-task"}


def sbatch_option_name(line: str) -> str:
    """The long name of the option an sbatch line sets: ``--mem=4G`` -> ``--mem``, ``-c4`` -> ``--cpus-per-task``."""
    head = line.split("=", 1)[0].split()[0] if line.split() else ""
    if not head.startswith("--"):
        head = head[:2]
    return _SHORT.get(head, head)


def _sbatch_line(v: str) -> str:
    v = v.strip()
    if not v.startswith("-") or "\n" in v or "\r" in v:
        raise ValueError(f"{v!r}: one sbatch option per line, as after `#SBATCH` (e.g. --mem=16G)")
    name = sbatch_option_name(v)
    if name in SLURM_OWN_OPTIONS:
        raise ValueError(f"{name} is written by kdsweep ({SLURM_OWN_OPTIONS[name]}); leave it out of extra")
    return v


class SlurmSpec(_Strict):
    """``kdsweep run --slurm N``: the sbatch options of the job array whose tasks are the study's runners."""

    partition: str | None = Field(None, description="sbatch --partition (or a comma list); null = the default.")
    time: str | None = Field(
        None,
        description="sbatch --time of each task (a runner): minutes, HH:MM:SS or D-HH:MM:SS; null = the "
        "partition's limit.",
    )
    account: str | None = Field(None, description="sbatch --account; null = your default.")
    gres: str | None = Field(
        "gpu",
        description="Each task asks for --gres=<gres>:<devices_per_trial x workers> (e.g. gpu, gpu:a100); "
        "null = CPU only, no --gres.",
    )
    extra: list[Annotated[str, AfterValidator(_sbatch_line)]] = Field(
        default_factory=list,
        description="More sbatch options, one per line as after `#SBATCH` (--mem=32G, --qos=high, "
        "--cpus-per-task=8, --constraint=a100).",
    )

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_TIME.match(v):
            raise ValueError(f"{v!r}: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (sbatch --time)")
        return v

    @field_validator("partition", "account")
    @classmethod
    def _name(cls, v: str | None, info) -> str | None:
        allowed = r"[\w.,-]+" if info.field_name == "partition" else r"[\w.-]+"
        if v is not None and not re.fullmatch(allowed, v):
            raise ValueError(f"{v!r} is not a Slurm {info.field_name} name (letters, digits, '_', '.', '-')")
        return v

    @field_validator("gres")
    @classmethod
    def _gres(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_]\w*(:[A-Za-z_][\w.-]*)?", v):
            raise ValueError(
                f"{v!r}: a gres name, optionally with a type (gpu, gpu:a100); the count comes from "
                f"devices_per_trial x workers"
            )
        return v


class Execution(_Strict):
    stages: list[Literal["distill", "evaluate"]] = Field(
        default_factory=lambda: ["distill"],
        description="dvc.yaml stages each trial runs (upstream stages are reused, never run by a trial).",
    )
    retries: int = Field(
        3, ge=0, description="Retries of a trial's `dvc exp run` after a transient git/DVC lock error."
    )
    threads_per_trial: int | None = Field(
        None, ge=1, description="OMP_NUM_THREADS of each trial's process; null = inherit the environment."
    )
    warm_start: bool = Field(
        True,
        description="Fork each trial's `dvc exp run` and its distill process from a warm process that imported "
        "DVC, torch and transformers once (kdsweep/warm.py) instead of starting them cold; the trial computes the "
        "same either way.",
    )
    devices: Literal["auto"] | list[int | str] = Field(
        "auto",
        description="GPUs the trials share out: auto = every GPU the runner sees (none on a CPU machine: trials "
        "run as before); or a list of ids as CUDA_VISIBLE_DEVICES takes them (allowed on a CPU machine too).",
    )
    devices_per_trial: int = Field(
        1,
        ge=1,
        description="Devices each running trial holds alone, through CUDA_VISIBLE_DEVICES; > 1 runs its distill "
        "under torchrun with one process per device (on a CPU machine: that many Gloo processes).",
    )
    push: str | None = Field(
        None,
        description="A git remote (e.g. origin): push each finished trial's experiment there (`dvc exp push`), "
        "its outputs to the default DVC remote; null = keep experiments in this clone.",
    )
    heartbeat_interval: int = Field(
        30, ge=1, description="Seconds between a runner's heartbeats for each trial it runs."
    )
    grace_period: int = Field(
        120,
        ge=2,
        description="Database storage: a running trial with no heartbeat for this many seconds is failed by "
        "another runner and run again (its runner's machine died).",
    )
    slurm: SlurmSpec = Field(
        default_factory=SlurmSpec, description="sbatch options of `kdsweep run --slurm N` (docs/scale-out.md)."
    )

    infra_retries: int = Field(
        3,
        ge=0,
        description="Times a trial the infrastructure interrupted (storage unreachable, disk full, killed, "
        "heartbeat lost) is run again with the same params, without spending the budget; past it the runner "
        "stops with the cause.",
    )

    @field_validator("stages")
    @classmethod
    def _order(cls, v: list[str]) -> list[str]:
        if not v or v[0] != "distill" or len(set(v)) != len(v):
            raise ValueError(f"must be [distill] or [distill, evaluate], got {v}")
        return v

    @field_validator("devices")
    @classmethod
    def _device_ids(cls, v: str | list[int | str]) -> str | list[int | str]:
        if v == "auto":
            return v
        if not v:
            raise ValueError("an empty list leaves the trials no device; use auto or list device ids")
        bad = [
            x for x in v if (isinstance(x, int) and x < 0) or (isinstance(x, str) and not re.fullmatch(r"[\w.:-]+", x))
        ]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a device id (a number >= 0, or a GPU UUID)")
        if len({str(x) for x in v}) != len(v):
            raise ValueError(f"a device is listed twice in {v}")
        return v

    @model_validator(mode="after")
    def _enough_devices(self) -> Execution:
        if isinstance(self.devices, list) and self.devices_per_trial > len(self.devices):
            raise ValueError(
                f"devices_per_trial: {self.devices_per_trial} exceeds the {len(self.devices)} device(s) "
                f"of devices {self.devices}"
            )
        return self

    @model_validator(mode="after")
    def _grace(self) -> Execution:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period} s) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval} s), or live trials are failed between two heartbeats"
            )
        return self


class StudySpec(_Strict):
    """The whole of ``experiments/<study>.yaml``."""

    study: str | None = Field(
        None, description="Study name; experiments are <study>-<trial number>. Default: the file's stem."
    )
    description: str | None = None
    objective: Objective = Field(default_factory=Objective)
    fixed: dict[str, Any] = Field(default_factory=dict, description="Dotted params.yaml keys set in every trial.")
    space: dict[str, Dist] = Field(default_factory=dict, description="Dotted params.yaml key -> distribution.")
    lr_multipliers: list[LRMultiplierKnob] = Field(
        default_factory=list, description="parameter_lr_multipliers rules whose multiplier is set or sampled."
    )
    stage_layouts: dict[str, list[dict[str, Any]] | None] | None = Field(
        None,
        description="Named alternatives for `stages` (null or [] = one stage); a stage field may be a distribution.",
    )
    baselines: list[dict[str, Any]] = Field(
        default_factory=list, description="Trials enqueued first: Optuna param name -> value (unset ones are sampled)."
    )
    sampler: SamplerSpec = Field(default_factory=lambda: TPESamplerSpec(type="tpe"))
    pruner: PrunerSpec = Field(default_factory=lambda: MedianPrunerSpec(type="median"))
    budget: Budget = Field(default_factory=lambda: Budget(n_trials=10))
    storage: str | None = Field(
        None,
        description="null = studies/<study>.journal; a path ending .journal; or an RDB URL (sqlite:///, postgresql://).",
    )
    workers: int = Field(1, ge=1, description="Trials run in parallel (each a `dvc exp run --temp`).")
    retention: Retention = Field(default_factory=Retention)
    execution: Execution = Field(default_factory=Execution)

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_type(cls, v: Any) -> Any:
        return _default_type("tpe")(v)

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_type(cls, v: Any) -> Any:
        return _default_type("median")(v)

    @field_validator("study")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not STUDY_NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '.', '-' (it names git refs), at most 64 characters")
        return v

    @field_validator("stage_layouts")
    @classmethod
    def _layout_names(cls, v: dict | None) -> dict | None:
        if v is not None and not v:
            raise ValueError("needs at least one layout (or leave stage_layouts out)")
        for name in v or {}:
            if not re.match(r"^[A-Za-z0-9_.-]+$", str(name)):
                raise ValueError(f"layout name {name!r}: use letters, digits, '_', '.', '-'")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is None or v.endswith(".journal"):
            return v
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
            raise ValueError(
                f"{v!r}: a journal file path ending .journal, or an RDB URL "
                f"(sqlite:///..., postgresql://..., mysql://...)"
            )
        return v


def parse_spec(data: Any, source: str = "study spec") -> StudySpec:
    """Validate a parsed YAML mapping; raise :class:`UserError` listing every problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as err:
        lines = problem_lines(err, StudySpec)
        n = len(lines)
        raise UserError(f"{source}: {n} problem{'s' if n > 1 else ''}:\n" + "\n".join(lines)) from None


def load_spec(path: str | Path) -> tuple[StudySpec, dict]:
    """Read and shape-check a study spec; returns the spec (with its name filled in) and the raw mapping."""
    path = Path(path)
    data = read_yaml(path, _specs_beside(path))
    spec = parse_spec(data, str(path))
    if spec.study is None:
        stem = path.stem
        if not STUDY_NAME.match(stem):
            raise UserError(f"{path}: the file name {stem!r} cannot name a study; set `study:` in the spec")
        spec = spec.model_copy(update={"study": stem})
    return spec, data


def _specs_beside(path: Path) -> str:
    """The hint for a spec that does not exist: the specs in its directory."""
    specs = sorted(str(p) for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
    listed = f"the specs in {path.parent}: {', '.join(specs)}" if specs else f"{path.parent} holds no spec"
    return f"{listed}; docs/study-spec.md describes the format"
