"""Check a study spec against ``params.yaml``, ``dvc.yaml`` and the student, before any trial runs.

:func:`build_plan` either returns a :class:`StudyPlan` (the validated spec, its dimensions, the
upstream stages a trial must reuse, and example trials whose ``params.yaml`` validated) or
raises one :class:`UserError` listing every problem with its dotted path in the spec:

- a key of ``fixed``, ``space`` or ``baselines`` that ``params.yaml`` does not have
  (with a "did you mean"), or one that an upstream stage reads (every trial would rebuild it);
- a range the params schema refuses at either end (``space.loss.alpha`` up to 1.5), including
  a KD temperature outside ``teacher.temperature_range``, which the logit cache covers;
- an empty range, a ``when`` naming an unknown parameter or a value it never takes;
- a pattern that matches no parameter of the student.

Everything here is pure: the caller reads the files.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdsweep.config import Params, annotation_at, shape_of, validate
from kdsweep.errors import UserError
from kdsweep.sweep.devices import DeviceSets
from kdsweep.sweep.space import LAYOUT, Dim, Space, apply_overrides, dimensions, lr_name, resolve, sample
from kdsweep.sweep.spec import CategoricalDist, IntDist, StudySpec, parse_spec


@dataclass
class StudyPlan:
    """What ``kdsweep run`` will do, checked."""

    spec: StudySpec
    space: Space
    base: dict
    run_stages: list[str]
    upstream: list[str]
    baselines: list[dict[str, Any]]
    examples: list[dict[str, Any]] = field(default_factory=list)
    devices: DeviceSets | None = None  # set by the runner, which looks for the GPUs (devices.device_sets)

    @property
    def name(self) -> str:
        return self.spec.study or "study"

    @property
    def hparam_keys(self) -> list[str]:
        """Dotted params keys worth a column in TensorBoard's HParams tab."""
        keys = [k for k, v in self.spec.fixed.items() if not isinstance(v, (dict, list))]
        return list(dict.fromkeys(list(self.spec.space) + keys))

    def summary(self) -> str:
        s = self.spec
        lines = [
            f"study {self.name}: {s.objective.direction} {s.objective.metric}; "
            f"sampler {s.sampler.type}, pruner {s.pruner.type}; "
            f"{s.budget.n_trials or 'unlimited'} trials"
            + (f", timeout {s.budget.timeout:.0f} s" if s.budget.timeout else "")
            + f"; {s.workers} worker{'s' * (s.workers > 1)}",
            f"  trials run {' -> '.join(self.run_stages)} and reuse {', '.join(self.upstream) or 'nothing'}",
        ]
        if self.devices is not None:
            lines.append(f"  {self.devices.describe()}")
        for d in self.space.dims:
            cond = " when " + ", ".join(f"{p} in {list(v)}" for p, v in d.when) if d.when else ""
            lines.append(f"  {d.name}: {_describe(d)}{cond}")
        for key, value in s.fixed.items():
            lines.append(f"  {key} = {value!r} (fixed)")
        if self.baselines:
            lines.append(f"  {len(self.baselines)} baseline trial{'s' * (len(self.baselines) > 1)} enqueued first")
        return "\n".join(lines)


def _describe(d: Dim) -> str:
    x = d.dist
    if isinstance(x, CategoricalDist):
        return f"one of {x.choices}"
    extra = " log" if x.log else (f" step {x.step}" if x.step not in (None, 1) else "")
    return f"{x.type} [{x.low}, {x.high}]{extra}"


# --------------------------------------------------------------------------- dvc.yaml
def stage_params(dvc_yaml: dict) -> dict[str, list[str]]:
    """The ``params.yaml`` keys each stage of ``dvc.yaml`` declares."""
    out = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        keys = []
        for entry in (stage or {}).get("params") or []:
            if isinstance(entry, str):
                keys.append(entry)
            elif isinstance(entry, dict):
                for path, names in entry.items():
                    if path == "params.yaml":
                        keys += list(names or [])
        out[name] = keys
    return out


def _outs(stage: dict) -> list[str]:
    outs = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind) or []:
            outs.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return outs


def upstream_stages(dvc_yaml: dict, targets: list[str]) -> list[str]:
    """Stages whose outputs the targets depend on, directly or not, in dvc.yaml order."""
    stages = dvc_yaml.get("stages") or {}
    producer = {out: name for name, st in stages.items() for out in _outs(st or {})}

    def producers(dep: str) -> list[str]:
        return [
            n for out, n in producer.items() if dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
        ]

    found: set[str] = set()
    todo = list(targets)
    while todo:
        for dep in (stages.get(todo.pop()) or {}).get("deps") or []:
            for name in producers(str(dep)):
                if name not in found and name not in targets:
                    found.add(name)
                    todo.append(name)
    return [n for n in stages if n in found]


def _overlaps(key: str, declared: str) -> bool:
    return key == declared or key.startswith(declared + ".") or declared.startswith(key + ".")


# --------------------------------------------------------------------------- params keys
def key_problem(key: str, *, scalar: bool) -> str | None:
    """Why ``key`` is not a ``params.yaml`` key (or, with ``scalar``, not one a distribution can set)."""
    if not isinstance(key, str) or not key:
        return "a key is a dotted params.yaml path like loss.alpha"
    parts = key.split(".")
    for i, part in enumerate(parts):
        kind, inner = shape_of(annotation_at(Params, parts[:i])[0])
        here = ".".join(parts[:i])
        if kind == "model" and part not in inner.model_fields:
            fields = list(inner.model_fields)
            close = difflib.get_close_matches(part, fields, n=1, cutoff=0.6)
            hint = (
                f"did you mean `{'.'.join(parts[:i] + [close[0]])}`?"
                if close
                else f"{here or 'params.yaml'} has: {', '.join(fields)}"
            )
            return f"unknown params.yaml key; {hint}"
        if kind == "list" and not part.isdigit():
            return f"`{here}` is a list: index it with a number (`{here}.0...`)"
        if kind not in ("model", "list"):
            return f"`{here}` is a value, not a section; `{key}` goes too deep"
    if scalar and shape_of(annotation_at(Params, parts)[0])[0] in ("model", "list"):
        hint = (
            " (sweep its multipliers with `lr_multipliers`)"
            if key == "parameter_lr_multipliers"
            else (" (sweep phase layouts with `stage_layouts`)" if key.startswith("stages") else "")
        )
        return f"`{key}` is a section or list, not a value a distribution can take; name a key inside it{hint}"
    return None


# --------------------------------------------------------------------------- random examples
def random_suggest(rng: random.Random) -> Callable[[Dim], Any]:
    def suggest(d: Dim) -> Any:
        x = d.dist
        if isinstance(x, CategoricalDist):
            return rng.choice(x.choices)
        if isinstance(x, IntDist):
            return rng.randrange(x.low, x.high + 1, x.step)
        if x.log:
            return math.exp(rng.uniform(math.log(x.low), math.log(x.high)))
        if x.step:
            return x.low + rng.randrange(int((x.high - x.low) / x.step + 1e-9) + 1) * x.step
        return rng.uniform(x.low, x.high)

    return suggest


def _with(space: Space, fixed: dict[str, Any]) -> Callable[[Dim], Any]:
    """Suggest ``fixed`` values where given, else each dimension's first edge."""
    return lambda d: fixed[d.name] if d.name in fixed else d.edges()[0]


def _probe(space: Space, name: str, value: Any) -> dict[str, Any] | None:
    """Values with ``name`` set, its ``when`` parents set so that it is sampled, and the other knobs
    of a chosen phase layout at their first edge (a layout's phases need all of theirs).
    None if no value of a parent makes ``name`` sampled (reported as a ``when`` problem)."""
    out = {name: value}
    todo = [name]
    while todo:
        d = space.get(todo.pop())
        for parent, allowed in d.when if d else ():
            if parent not in out:
                pd = space.get(parent)
                ok = [v for v in allowed if pd is not None and pd.contains(v)]
                if not ok:
                    return None
                out[parent] = ok[0]
                todo.append(parent)
    for d in space.dims:
        if d.name not in out and d.name.startswith("stages[") and all(out.get(p) in a for p, a in d.when):
            out[d.name] = d.edges()[0]
    return out


def _in_layout(line: str, layout: str | None) -> str:
    """``stages.configs.1.x: ...`` -> ``stage_layouts.<layout>.1.x: ...`` (where the user wrote it)."""
    if layout is None:
        return line
    return re.sub(r"^stages\.configs\.(\d+)", lambda m: f"stage_layouts.{layout}.{m.group(1)}", line)


# --------------------------------------------------------------------------- the checks
EncodingCheck = Callable[[dict[str, Any], Params], "str | None"]
TrialCheck = tuple[dict[str, Any], "Params | None", list[str]]  # overrides, validated params or None, problems


def _placement_problem(
    key: str, scalar: bool, readers: dict[str, list[str]], run_stages: list[str], upstream: list[str]
) -> str | None:
    """Why a trial cannot set ``key``: not a params key, read upstream, or read by no stage a trial runs."""
    why = key_problem(key, scalar=scalar)
    if why is not None:
        return why
    by = [s for s, declared in readers.items() if any(_overlaps(key, d) for d in declared)]
    if any(s in upstream for s in by):
        stage = next(s for s in by if s in upstream)
        return (
            f"read by upstream stage '{stage}': every trial would rebuild it. Set it in params.yaml "
            f"and run `dvc repro` before the study"
        )
    if not any(s in run_stages for s in by):
        return f"no stage a trial runs ({', '.join(run_stages)}) reads it" + (
            f"; '{by[0]}' does (add it to execution.stages)" if by else ""
        )
    return None


def _key_problems(spec: StudySpec, dvc_yaml: dict, run_stages: list[str], upstream: list[str]) -> list[tuple]:
    """``(section, key, problem)`` for each key of ``fixed`` and ``space`` that a trial cannot set."""
    readers = stage_params(dvc_yaml)
    out = []
    for where, keys, scalar in (("fixed", spec.fixed, False), ("space", spec.space, True)):
        for key in keys:
            why = _placement_problem(key, scalar, readers, run_stages, upstream)
            if why:
                out.append((where, key, why))
    return out


def _conflict_problems(spec: StudySpec) -> list[str]:
    """Keys the spec sets twice: in ``fixed`` and ``space``, or besides ``stage_layouts``/``lr_multipliers``."""
    problems = []
    for key in spec.space:
        if key in spec.fixed or any(_overlaps(key, f) for f in spec.fixed):
            problems.append(
                f"  space.{key}: also set by fixed.{next(f for f in spec.fixed if _overlaps(key, f))}; "
                f"a key is either fixed or searched"
            )
    if spec.stage_layouts:
        for key in list(spec.fixed) + list(spec.space):
            if _overlaps(key, "stages"):
                problems.append(f"  {key}: `stages` comes from stage_layouts in this spec; set it inside a layout")
    if spec.lr_multipliers and "parameter_lr_multipliers" in spec.space:
        problems.append("  space.parameter_lr_multipliers: use lr_multipliers")
    return problems


def _sampler_problems(spec: StudySpec) -> list[str]:
    """A sampler whose package is not installed."""
    if spec.sampler.type == "cmaes" and importlib.util.find_spec("cmaes") is None:
        return ["  sampler.type: cmaes needs the `cmaes` package (pip install cmaes), or use tpe, gp or random"]
    if spec.sampler.type == "gp" and importlib.util.find_spec("scipy") is None:
        return ["  sampler.type: gp needs scipy (pip install scipy)"]
    return []


def _trial_params(spec: StudySpec, base: dict, values: dict[str, Any]) -> TrialCheck:
    """A trial's overrides for sampled ``values``, and its params.yaml validated (or the problems)."""
    overrides = resolve(spec, base, values)
    try:
        data = apply_overrides(base, overrides)
    except KeyError as e:
        return overrides, None, [f"{e.args[0]}"]
    try:
        return overrides, validate(data, Params, "trial params"), []
    except UserError as e:
        return overrides, None, [line.strip() for line in str(e).splitlines()[1:]]


def _edge_problems(spec: StudySpec, space: Space, base: dict, seen: set[str]) -> list[str]:
    """Each end of each range, with only what makes it sampled besides, must give valid params.

    Adds every problem line found to ``seen``, so later checks do not repeat them.
    """
    problems = []
    # Knobs inside phase layouts first: their problems name the layout's own path.
    for d in sorted(space.dims, key=lambda d: not d.name.startswith("stages[")):
        for edge in d.edges():
            values = _probe(space, d.name, edge)
            if values is None:
                continue
            for line in _trial_params(spec, base, values)[2]:
                if line not in seen:
                    seen.add(line)
                    named = _in_layout(line, values.get(LAYOUT))
                    problems.append(f"  {named}" if named != line else f"  {d.path} = {edge!r}: {line}")
    return problems


def _baseline_problems(k: int, baseline: dict[str, Any], spec: StudySpec, space: Space) -> list[str]:
    """Baseline ``k`` as written: names of the space, values inside it, ``when`` conditions it meets."""
    problems = []
    names = space.names()
    for name, value in baseline.items():
        d = space.get(name)
        if d is None:
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
            hint = (
                f"did you mean `{close[0]}`?"
                if close
                else f"the parameters are: {', '.join(names)}"
                if names
                else "the space is empty"
            )
            extra = (
                " (a value held in every trial goes under `fixed`)"
                if name in spec.fixed or key_problem(str(name), scalar=False) is None
                else ""
            )
            problems.append(f"  baselines.{k}.{name}: not a parameter of this study{extra}; {hint}")
        elif not d.contains(value):
            problems.append(f"  baselines.{k}.{name}: {value!r} is outside {_describe(d)}")
        else:
            problems += [
                f"  baselines.{k}.{name}: never used: {parent} is {baseline[parent]!r}, "
                f"and {name} is sampled only when {parent} is one of {list(allowed)}"
                for parent, allowed in d.when
                if parent in baseline and baseline[parent] not in allowed
            ]
    return problems


def _sampled_trials(
    spec: StudySpec, space: Space, base: dict, samples: int, seed: int, seen: set[str]
) -> tuple[list[str], list[tuple[dict[str, Any], Params]]]:
    """``samples`` random trials: their new problems, and the ``(overrides, params)`` of those that validated."""
    rng = random.Random(seed)
    problems, examples = [], []
    for _ in range(samples if space.dims else 0):
        values = sample(random_suggest(rng), space.dims)
        overrides, params, lines = _trial_params(spec, base, values)
        problems += [f"  a sampled trial {values}: {line}" for line in lines if line not in seen]
        if params is not None:
            examples.append((overrides, params))
    return problems, examples


def _encoding_problems(examples: list[tuple[dict[str, Any], Params]], check_encoding: EncodingCheck) -> list[str]:
    """The first example whose overrides ``dvc exp run -S`` would not reproduce exactly."""
    for overrides, params in examples:
        why = check_encoding(overrides, params)
        if why:
            return [f"  {why}"]
    return []


# --------------------------------------------------------------------------- the plan
def build_plan(
    spec_data: Any,
    params_data: Any,
    dvc_yaml: dict,
    student_names: list[str] | None = None,
    *,
    source: str = "study spec",
    samples: int = 3,
    seed: int = 0,
    check_encoding: EncodingCheck | None = None,
) -> StudyPlan:
    """Validate a spec and params.yaml together; raise one :class:`UserError` listing every problem.

    Args:
        spec_data: the parsed spec (a mapping) or an already shape-checked :class:`StudySpec`.
        params_data: the parsed params.yaml.
        dvc_yaml: the parsed dvc.yaml (which stage reads which key, which stages are upstream).
        student_names: the student's parameter names, to check patterns; None skips that check.
        samples: random trials to resolve and validate besides the baselines.
        check_encoding: ``(overrides, params) -> problem or None``: how the runner proves that
            ``dvc exp run -S`` reproduces the overrides exactly.
    """
    base_params = validate(params_data, Params, "params.yaml")  # its own errors, as the stages print them
    spec = spec_data if isinstance(spec_data, StudySpec) else parse_spec(spec_data, source)
    space = dimensions(spec)
    run_stages = list(spec.execution.stages)
    missing = [s for s in run_stages if s not in stage_params(dvc_yaml)]
    if missing:
        raise UserError(f"{source}: execution.stages: dvc.yaml has no stage {missing[0]!r}")
    upstream = upstream_stages(dvc_yaml, run_stages)
    bad_keys = _key_problems(spec, dvc_yaml, run_stages, upstream)
    problems = list(space.problems) + [f"  {where}.{key}: {why}" for where, key, why in bad_keys]
    problems += _conflict_problems(spec) + _sampler_problems(spec)

    # Keep checking the rest with the bad keys left out, so one run reports everything.
    bad = {(where, key) for where, key, _ in bad_keys}
    good = spec.model_copy(
        update={
            "fixed": {k: v for k, v in spec.fixed.items() if ("fixed", k) not in bad},
            "space": {k: v for k, v in spec.space.items() if ("space", k) not in bad},
        }
    )
    space_ok = dimensions(good) if len(good.space) != len(spec.space) else space
    base = params_data if isinstance(params_data, dict) else {}
    default_lines = _trial_params(good, base, {})[2]  # `fixed` alone
    problems += [f"  fixed: {line}" for line in default_lines]
    seen = set(default_lines)
    problems += _edge_problems(good, space_ok, base, seen)
    if student_names is not None:
        problems += _pattern_problems(spec, base_params, student_names)

    examples, baselines = [], []
    for k, b in enumerate(spec.baselines):
        found = _baseline_problems(k, b, spec, space)
        problems += found
        if not found:
            overrides, params, lines = _trial_params(good, base, sample(_with(space_ok, b), space_ok.dims))
            problems += [f"  baselines.{k}: {line}" for line in lines if line not in seen]
            baselines.append(dict(b))
            if params is not None:
                examples.append((overrides, params))
    # A few random trials too; their problems matter only if nothing above explains them.
    sampled_problems, sampled = _sampled_trials(good, space_ok, base, samples, seed, seen)
    examples += sampled
    if not problems:
        problems += sampled_problems[:3]
    if check_encoding is not None and not problems:
        problems += _encoding_problems(examples[: 1 + samples], check_encoding)

    problems = list(dict.fromkeys(problems))
    if problems:
        n = len(problems)
        raise UserError(f"{source}: {n} problem{'s' if n > 1 else ''}:\n" + "\n".join(problems))
    return StudyPlan(spec, space, base, run_stages, upstream, baselines, [o for o, _ in examples])


def _pattern_problems(spec: StudySpec, base_params: Params, names: list[str]) -> list[str]:
    from kdsweep.param_groups import closest_names

    patterns: list[tuple[str, str]] = [
        (f"lr_multipliers.{i}.pattern", r.pattern) for i, r in enumerate(spec.lr_multipliers)
    ]
    fixed_rules = spec.fixed.get("parameter_lr_multipliers")
    if isinstance(fixed_rules, list):
        patterns += [
            (f"fixed.parameter_lr_multipliers.{i}.pattern", r.get("pattern"))
            for i, r in enumerate(fixed_rules)
            if isinstance(r, dict)
        ]
    else:
        patterns += [
            (f"params.yaml parameter_lr_multipliers.{i}.pattern", r.pattern)
            for i, r in enumerate(base_params.parameter_lr_multipliers)
        ]
    for layout, stages in (spec.stage_layouts or {}).items():
        for i, stage in enumerate(stages or []):
            rules = stage.get("parameter_lr_multipliers") if isinstance(stage, dict) else None
            for j, r in enumerate(rules if isinstance(rules, list) else []):
                if isinstance(r, dict):
                    where = f"stage_layouts.{layout}.{i}.parameter_lr_multipliers.{j}.pattern"
                    patterns.append((where, r.get("pattern")))
    out = []
    for where, pattern in patterns:
        if not isinstance(pattern, str):
            continue
        try:
            rx = re.compile(pattern)
        except re.error:
            continue  # reported as an invalid regular expression already
        if not any(rx.fullmatch(n) for n in names):
            extra = " (Hugging Face names layers `model.layers.N.`)" if "layer\\." in pattern else ""
            out.append(
                f"  {where}: {pattern!r} matches no parameter of the student{extra}; closest names: "
                f"{', '.join(closest_names(pattern, names))}"
            )
    return out


__all__ = ["StudyPlan", "build_plan", "stage_params", "upstream_stages", "key_problem", "LAYOUT", "lr_name"]
