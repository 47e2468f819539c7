"""The search space as a list of dimensions, and the two pure steps that configure a trial.

    dims = dimensions(spec)                      # one per Optuna parameter, parents before children
    values = sample(suggest, dims)               # {optuna param name: value}, conditions honoured
    overrides = resolve(spec, base, values)      # {dotted params.yaml key: value} for `dvc exp run -S`
    params = apply_overrides(base, overrides)    # the trial's params.yaml, as a dict

Optuna parameter names (what ``baselines`` and ``when`` refer to, and what Optuna's plots show):

====================================  ==================================================
``loss.alpha``                        a ``space`` key (any dotted ``params.yaml`` key)
``lr_multiplier[.*wrapper.*]``        an ``lr_multipliers`` rule's multiplier
``stages.layout``                     the chosen ``stage_layouts`` entry
``stages[two_stage].0.max_steps``     a knob inside a layout (sampled only with that layout)
``stages[two_stage].1.lr_multiplier[.*]``  a multiplier knob inside a layout's stage
====================================  ==================================================
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from kdsweep import dotted
from kdsweep.config import problem_lines
from kdsweep.sweep.spec import CategoricalDist, Dist, FloatDist, IntDist, StudySpec

LAYOUT = "stages.layout"
_DIST = TypeAdapter(Dist)


@dataclass(frozen=True)
class Dim:
    """One Optuna parameter: its distribution, when it is sampled, and where the spec declared it."""

    name: str
    dist: FloatDist | IntDist | CategoricalDist
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    path: str = ""

    def edges(self) -> list[Any]:
        """The values to check against the params schema: both ends of a range, every choice."""
        d = self.dist
        if isinstance(d, CategoricalDist):
            return list(d.choices)
        if isinstance(d, IntDist):
            return [d.low, d.low + (d.high - d.low) // d.step * d.step]
        if d.step is not None:
            return [d.low, d.low + int((d.high - d.low) / d.step + 1e-9) * d.step]
        return [d.low, d.high]

    def contains(self, value: Any) -> bool:
        d = self.dist
        if isinstance(d, CategoricalDist):
            return any(type(value) is type(c) and value == c for c in d.choices) or (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and any(isinstance(c, (int, float)) and not isinstance(c, bool) and value == c for c in d.choices)
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(d, IntDist) and value != int(value):
            return False
        return d.low <= value <= d.high


@dataclass
class Space:
    dims: list[Dim]
    problems: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def get(self, name: str) -> Dim | None:
        return next((d for d in self.dims if d.name == name), None)


def lr_name(pattern: str) -> str:
    return f"lr_multiplier[{pattern}]"


def knob_name(layout: str, index: int, key: str) -> str:
    return f"stages[{layout}].{index}.{key}"


def _when(raw: dict[str, Any] | None) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    return tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in (raw or {}).items())


def _layout_dims(spec: StudySpec, problems: list[str]) -> list[Dim]:
    """The layout choice and every distribution written inside a layout's stages."""
    if not spec.stage_layouts:
        return []
    dims = [Dim(LAYOUT, CategoricalDist(type="categorical", choices=list(spec.stage_layouts)), (), "stage_layouts")]
    for layout, stages in spec.stage_layouts.items():
        cond = ((LAYOUT, (layout,)),)
        for i, stage in enumerate(stages or []):
            where = f"stage_layouts.{layout}.{i}"
            if not isinstance(stage, dict):
                problems.append(f"  {where}: a stage is a mapping (stage_name, max_steps, ...), got {stage!r}")
                continue
            knobs = [
                (key, value, f"{where}.{key}", knob_name(layout, i, key))
                for key, value in stage.items()
                if isinstance(value, dict)
            ]
            rules = stage.get("parameter_lr_multipliers")
            for j, rule in enumerate(rules if isinstance(rules, list) else []):
                if isinstance(rule, dict) and isinstance(rule.get("lr_multiplier"), dict):
                    knobs.append(
                        (
                            "lr_multiplier",
                            rule["lr_multiplier"],
                            f"{where}.parameter_lr_multipliers.{j}.lr_multiplier",
                            knob_name(layout, i, lr_name(str(rule.get("pattern")))),
                        )
                    )
            for _key, value, path, name in knobs:
                try:
                    dist = _DIST.validate_python(value)
                except ValidationError as err:
                    problems += problem_lines(err, Dist, prefix=path)
                    continue
                if dist.when:
                    problems.append(
                        f"  {path}.when: knobs inside a layout are sampled whenever the layout is; "
                        f"`when` is not supported here"
                    )
                dims.append(Dim(name, dist, cond, path))
    return dims


def dimensions(spec: StudySpec) -> Space:
    """Every Optuna parameter of the spec, parents (``when``) before the parameters they gate."""
    problems: list[str] = []
    dims = [Dim(key, dist, _when(dist.when), f"space.{key}") for key, dist in spec.space.items()]
    for i, rule in enumerate(spec.lr_multipliers):
        if not isinstance(rule.lr_multiplier, float):
            dims.append(Dim(lr_name(rule.pattern), rule.lr_multiplier, _when(rule.when), f"lr_multipliers.{i}"))
    dims += _layout_dims(spec, problems)
    for d in dims:
        if d.name != LAYOUT and isinstance(d.dist, CategoricalDist) and len(d.dist.choices) == 1:
            problems.append(
                f"  {d.path}: one choice ({d.dist.choices[0]!r}) samples nothing; make it a fixed value "
                f"(a space key goes under `fixed:`)"
            )
    if not dims:
        problems.append(
            "  space: nothing to sample, so every trial would run the same params; declare at least one "
            "distribution (values every trial shares go under `fixed:`)"
        )

    names = [d.name for d in dims]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"  {name}: declared twice (parameter names must be unique)")
    by_name = {d.name: d for d in dims}
    for d in dims:
        for parent, allowed in d.when:
            if parent not in by_name:
                close = difflib.get_close_matches(parent, names, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else f"; parameters: {', '.join(names)}"
                problems.append(f"  {d.path}.when.{parent}: no such parameter in this spec{hint}")
            elif parent == d.name:
                problems.append(f"  {d.path}.when: a parameter cannot depend on itself")
            else:
                never = [v for v in allowed if not by_name[parent].contains(v)]
                if never:
                    problems.append(
                        f"  {d.path}.when.{parent}: {never[0]!r} is never sampled for `{parent}` "
                        f"({_describe(by_name[parent].dist)}), so `{d.name}` would never be sampled"
                    )
    ordered, done = [], set()
    pending = list(dims)
    while pending:
        ready = [d for d in pending if all(p in done or p not in by_name or p == d.name for p, _ in d.when)]
        if not ready:
            problems.append(f"  when: circular conditions between {', '.join(d.name for d in pending)}")
            ordered += pending
            break
        for d in ready:
            ordered.append(d)
            done.add(d.name)
            pending.remove(d)
    return Space(ordered, problems)


def _describe(d: FloatDist | IntDist | CategoricalDist) -> str:
    if isinstance(d, CategoricalDist):
        return f"choices {d.choices}"
    return f"range [{d.low}, {d.high}]"


Suggest = Callable[[Dim], Any]


def optuna_suggest(trial) -> Suggest:
    """``suggest`` backed by an Optuna trial (enqueued values come back as they were fixed)."""

    def suggest(d: Dim) -> Any:
        x = d.dist
        if isinstance(x, FloatDist):
            return trial.suggest_float(d.name, x.low, x.high, log=x.log, step=x.step)
        if isinstance(x, IntDist):
            return trial.suggest_int(d.name, x.low, x.high, log=x.log, step=x.step)
        return trial.suggest_categorical(d.name, x.choices)

    return suggest


def sample(suggest: Suggest, dims: list[Dim]) -> dict[str, Any]:
    """Sample every dimension whose conditions hold (dims must be in :func:`dimensions` order)."""
    values: dict[str, Any] = {}
    for d in dims:
        if all(parent in values and values[parent] in allowed for parent, allowed in d.when):
            values[d.name] = suggest(d)
    return values


def resolve(spec: StudySpec, base: dict, values: dict[str, Any]) -> dict[str, Any]:
    """The trial's ``params.yaml`` overrides: ``fixed``, then sampled keys, multipliers and stages.

    ``lr_multipliers`` edit the rule with the same pattern in place (its position, hence what
    it takes precedence over, is kept); patterns not in the list are put in front, in spec order.
    """
    out: dict[str, Any] = dict(spec.fixed)
    for key in spec.space:
        if key in values:
            out[key] = values[key]
    if spec.lr_multipliers:
        rules = copy.deepcopy(spec.fixed.get("parameter_lr_multipliers", base.get("parameter_lr_multipliers")) or [])
        rules = [dict(r) if isinstance(r, dict) else r for r in rules]
        front = []
        for knob in spec.lr_multipliers:
            if isinstance(knob.lr_multiplier, float):
                value = knob.lr_multiplier
            elif lr_name(knob.pattern) in values:
                value = values[lr_name(knob.pattern)]
            else:
                continue  # its condition did not hold: the rule stays as params.yaml has it
            same = [r for r in rules if isinstance(r, dict) and r.get("pattern") == knob.pattern]
            if same:
                same[0]["lr_multiplier"] = value
            else:
                front.append({"pattern": knob.pattern, "lr_multiplier": value})
        out["parameter_lr_multipliers"] = front + rules
    if spec.stage_layouts and LAYOUT in values:
        layout = values[LAYOUT]
        stages = spec.stage_layouts.get(layout) or []
        out["stages.enabled"] = bool(stages)
        out["stages.configs"] = [_resolve_stage(layout, i, s, values) for i, s in enumerate(stages)]
    return out


def _resolve_stage(layout: str, i: int, stage: Any, values: dict[str, Any]) -> Any:
    if not isinstance(stage, dict):
        return stage
    out = {}
    for key, value in stage.items():
        out[key] = values.get(knob_name(layout, i, key), value) if isinstance(value, dict) else value
    rules = stage.get("parameter_lr_multipliers")
    if isinstance(rules, list):
        out["parameter_lr_multipliers"] = [
            {**r, "lr_multiplier": values.get(knob_name(layout, i, lr_name(str(r.get("pattern")))), r["lr_multiplier"])}
            if isinstance(r, dict) and isinstance(r.get("lr_multiplier"), dict)
            else r
            for r in rules
        ]
    return out


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``base`` with each dotted key set (numeric parts index lists).

    Raises:
        KeyError: a key walks through something that is neither a mapping nor a list index.
    """
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        dotted.set_(out, key, copy.deepcopy(value))
    return out
