"""The study spec: shape, validation against params.yaml / dvc.yaml / the student, sampling, -S encoding.

Fast: no trial runs here (see test_sweep.py for studies on real DVC repositories).
"""

from __future__ import annotations

import copy
import io
import math
import random
import subprocess
import sys
from contextlib import chdir, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_params_dict

from kdsweep.config import validate
from kdsweep.errors import UserError
from kdsweep.sweep import dvcexp, exprun
from kdsweep.sweep.plan import build_plan, key_problem, upstream_stages
from kdsweep.sweep.space import LAYOUT, apply_overrides, dimensions, knob_name, lr_name, resolve, sample
from kdsweep.sweep.spec import parse_spec

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
SHIPPED_SPECS = sorted((REPO / "experiments").glob("*.yaml"))

VALID = {
    "study": "t",
    "fixed": {"training.max_steps": 9, "training.eval_steps": 3},
    "space": {
        "loss.alpha": {"type": "float", "low": 0.1, "high": 0.9},
        "loss.temperature": {"type": "float", "low": 1.0, "high": 4.0},
        "loss.mode": {"type": "categorical", "choices": ["topk_tail", "topk_renorm"]},
        "loss.direction": {
            "type": "categorical",
            "choices": ["forward", "reverse"],
            "when": {"loss.mode": "topk_tail"},
        },
        "training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "training.warmup_steps": {"type": "int", "low": 0, "high": 4, "step": 2},
    },
    "lr_multipliers": [
        {"pattern": ".*shared_core.*", "lr_multiplier": {"type": "float", "low": 0.25, "high": 4.0, "log": True}},
        {"pattern": ".*wrapper.*", "lr_multiplier": {"type": "categorical", "choices": [0.5, 1.0, 2.0]}},
        {"pattern": ".*layers\\.0\\..*", "lr_multiplier": 0.5},
    ],
    "stage_layouts": {
        "single": None,
        "two_stage": [
            {
                "stage_name": "experts",
                "max_steps": {"type": "int", "low": 3, "high": 6, "step": 3},
                "parameter_lr_multipliers": [
                    {
                        "pattern": ".*shared_core.*|.*wrapper.*",
                        "lr_multiplier": {"type": "float", "low": 0.5, "high": 2.0},
                    },
                    {"pattern": ".*", "lr_multiplier": 0.0},
                ],
            },
            {"stage_name": "full", "max_steps": 6, "temperature": {"type": "float", "low": 1.0, "high": 3.0}},
        ],
    },
    "baselines": [
        {
            "loss.alpha": 0.5,
            "loss.temperature": 2.0,
            "lr_multiplier[.*shared_core.*]": 1.0,
            "lr_multiplier[.*wrapper.*]": 1.0,
            "stages.layout": "single",
        }
    ],
    "budget": {"n_trials": 4},
}


@pytest.fixture(scope="module")
def names(tiny_pipeline) -> list[str]:
    """The tiny student's parameter names, as the training loop sees them."""
    from kdsweep.compress import load_student

    return [n for n, _ in load_student(tiny_pipeline / "models/student_init").named_parameters()]


def plan(spec=None, params=None, names=None, **kw):
    return build_plan(
        copy.deepcopy(VALID if spec is None else spec),
        params or tiny_params_dict(),
        DVC_YAML,
        names,
        source="t.yaml",
        **kw,
    )


def problems(spec=None, params=None, names=None) -> list[str]:
    with pytest.raises(UserError) as info:
        plan(spec, params, names)
    return str(info.value).splitlines()


def with_(**changes) -> dict:
    spec = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("/")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return spec


DELETE = object()


# --------------------------------------------------------------------------- valid specs
def test_valid_spec_gives_a_plan_whose_examples_validate(names):
    p = plan(
        names=names, check_encoding=lambda o, prm: dvcexp.roundtrip_problem(yaml.safe_dump(tiny_params_dict()), o, prm)
    )
    assert p.upstream == ["prepare", "teacher", "teacher_logits", "student"]
    assert p.run_stages == ["distill"]
    assert len(p.examples) == 1 + 3  # the baseline and three random trials
    baseline = p.examples[0]
    assert baseline["loss.alpha"] == 0.5 and baseline["stages.enabled"] is False
    assert baseline["parameter_lr_multipliers"][:3] == [
        {"pattern": ".*layers\\.0\\..*", "lr_multiplier": 0.5},  # new pattern: put in front
        {"pattern": ".*shared_core.*", "lr_multiplier": 1.0},  # existing ones keep their place
        {"pattern": ".*wrapper.*", "lr_multiplier": 1.0},
    ]
    assert "loss.alpha" in p.hparam_keys and "training.max_steps" in p.hparam_keys


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path, names):
    from kdsweep.sweep.spec import load_spec

    spec, _ = load_spec(path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    p = build_plan(spec, params, DVC_YAML, names, source=str(path))
    assert p.spec.study == path.stem


def test_demo_study_starts_from_the_reference_defaults():
    from kdsweep.config import REFERENCE_MULTIPLIERS
    from kdsweep.sweep.spec import load_spec

    spec, _ = load_spec(REPO / "experiments/demo.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    p = build_plan(spec, params, DVC_YAML, None)
    trial0 = validate(apply_overrides(params, p.examples[0]))
    assert (trial0.loss.alpha, trial0.loss.temperature) == (0.5, 2.0)
    assert [(r.pattern, r.lr_multiplier) for r in trial0.parameter_lr_multipliers] == REFERENCE_MULTIPLIERS
    assert not trial0.stages.enabled
    assert {d.name for d in p.space.dims} >= {
        "loss.alpha",
        "loss.temperature",
        lr_name(".*shared_core.*"),
        lr_name(".*wrapper.*"),
        LAYOUT,
    }
    assert set(spec.stage_layouts) == {"single", "freeze_then_unfreeze"}


# --------------------------------------------------------------------------- errors that name the key
def test_unknown_params_key_suggests_the_close_one():
    lines = problems(with_(**{"space/loss.alpah": {"type": "float", "low": 0, "high": 1}}))
    assert any(
        line.strip().startswith("space.loss.alpah: unknown params.yaml key; did you mean `loss.alpha`?")
        for line in lines
    ), lines


def test_unknown_spec_key_suggests_the_close_one():
    lines = problems(with_(**{"budget/n_trails": 3, "space/loss.alpha/hihg": 2}))
    text = "\n".join(lines)
    assert "budget.n_trails: unknown key; did you mean `n_trials`?" in text
    assert "space.loss.alpha.hihg: unknown key; did you mean `high`?" in text


@pytest.mark.parametrize(
    "dist",
    [
        {"type": "float", "low": 0.9, "high": 0.1},
        {"type": "int", "low": 3, "high": 3},
        {"type": "categorical", "choices": []},
    ],
)
def test_empty_range(dist):
    text = "\n".join(problems(with_(**{"space/loss.alpha": dist})))
    assert "space.loss.alpha" in text and ("empty range" in text or "at least 1 item" in text), text


def test_temperature_outside_the_cache_range_names_the_bound():
    text = "\n".join(problems(with_(**{"space/loss.temperature/high": 6.0})))
    assert "space.loss.temperature = 6.0: loss.temperature: 6.0 is outside teacher.temperature_range [1.0, 4.0]" in text


def test_temperature_knob_inside_a_layout_outside_the_cache_range():
    text = "\n".join(problems(with_(**{"stage_layouts/two_stage/1/temperature/high": 9.0})))
    assert "stage_layouts.two_stage.1.temperature: 9.0 is outside teacher.temperature_range" in text, text


def test_pattern_matching_no_student_parameter(names):
    text = "\n".join(problems(with_(**{"lr_multipliers/2/pattern": ".*layer\\.0\\..*"}), names=names))
    assert "lr_multipliers.2.pattern: '.*layer\\\\.0\\\\..*' matches no parameter of the student" in text
    assert "model.layers.0." in text  # the closest real names


def test_upstream_key_would_rebuild_the_cache():
    text = "\n".join(problems(with_(**{"space/teacher.top_k": {"type": "int", "low": 8, "high": 16}})))
    assert "space.teacher.top_k: read by upstream stage 'teacher_logits'" in text


def test_key_of_a_stage_the_trials_do_not_run():
    text = "\n".join(problems(with_(**{"fixed/evaluate.max_batches": 4})))
    assert "fixed.evaluate.max_batches: no stage a trial runs (distill) reads it; 'evaluate' does" in text


def test_every_problem_is_listed_at_once(names):
    spec = with_(
        **{
            "space/loss.alpha/high": 1.5,
            "space/loss.temperature/high": 5.0,
            "space/teacher.top_k": {"type": "int", "low": 8, "high": 16},
            "lr_multipliers/2/pattern": "nothing_matches_this",
            "baselines/0/loss.alpha": 1.95,
            "space/loss.direction/when": {"loss.mode": "dense"},
        }
    )
    lines = problems(spec, names=names)
    assert lines[0] == f"t.yaml: {len(lines) - 1} problems:"
    for start in (
        "space.loss.alpha = 1.5: loss.alpha:",
        "space.loss.temperature = 5.0: loss.temperature:",
        "space.teacher.top_k: read by upstream",
        "lr_multipliers.2.pattern: 'nothing_matches_this'",
        "baselines.0.loss.alpha: 1.95 is outside",
        "space.loss.direction.when.loss.mode: 'dense' is never",
    ):
        assert any(line.strip().startswith(start) for line in lines), (start, lines)


def test_conditions_must_name_a_parameter_of_the_spec():
    text = "\n".join(problems(with_(**{"space/loss.direction/when": {"loss.mod": "topk_tail"}})))
    assert "space.loss.direction.when.loss.mod: no such parameter in this spec; did you mean `loss.mode`?" in text


def test_baselines_name_parameters_and_stay_inside_the_space():
    text = "\n".join(
        problems(
            with_(**{"baselines": [{"loss.alpah": 0.5}, {"stages.layout": "three_stage"}, {"training.max_steps": 5}]})
        )
    )
    assert "baselines.0.loss.alpah: not a parameter of this study" in text and "`loss.alpha`" in text
    assert "baselines.1.stages.layout: 'three_stage' is outside one of ['single', 'two_stage']" in text
    assert (
        "baselines.2.training.max_steps: not a parameter of this study (a value held in every trial goes under "
        "`fixed`)" in text
    )


def test_key_problem_walks_the_params_schema():
    assert key_problem("loss.alpha", scalar=True) is None
    assert key_problem("stages.configs.0.alpha", scalar=True) is None
    assert "list" in key_problem("stages.configs.alpha", scalar=True)
    assert "section" in key_problem("loss", scalar=True)
    assert "lr_multipliers" in key_problem("parameter_lr_multipliers", scalar=True)
    assert key_problem("parameter_lr_multipliers", scalar=False) is None
    assert "goes too deep" in key_problem("loss.alpha.x", scalar=False)


def test_upstream_stages_follow_dvc_yaml_deps():
    assert upstream_stages(DVC_YAML, ["distill"]) == ["prepare", "teacher", "teacher_logits", "student"]
    assert upstream_stages(DVC_YAML, ["distill", "evaluate"]) == ["prepare", "teacher", "teacher_logits", "student"]


def test_sampler_and_pruner_types_are_checked():
    text = "\n".join(problems(with_(**{"sampler": {"type": "tpe", "sed": 1}, "pruner": {"type": "hyperbnd"}})))
    assert "sampler.sed: unknown key; did you mean `seed`?" in text
    assert "pruner.type: unknown type 'hyperbnd'; did you mean `hyperband`?" in text


# --------------------------------------------------------------------------- sampling and resolving
def test_conditional_parameters_are_sampled_only_when_their_condition_holds():
    space = dimensions(parse_spec(VALID))
    rng = random.Random(0)
    from kdsweep.sweep.plan import random_suggest

    seen_direction = seen_knob = 0
    for _ in range(200):
        values = sample(random_suggest(rng), space.dims)
        assert ("loss.direction" in values) == (values["loss.mode"] == "topk_tail")
        knob = knob_name("two_stage", 0, "max_steps")
        assert (knob in values) == (values[LAYOUT] == "two_stage")
        seen_direction += "loss.direction" in values
        seen_knob += knob in values
    assert 0 < seen_direction < 200 and 0 < seen_knob < 200


def test_a_layout_becomes_the_whole_stages_list():
    spec = parse_spec(VALID)
    values = {
        LAYOUT: "two_stage",
        knob_name("two_stage", 0, "max_steps"): 6,
        knob_name("two_stage", 0, lr_name(".*shared_core.*|.*wrapper.*")): 1.5,
        knob_name("two_stage", 1, "temperature"): 2.5,
    }
    out = resolve(spec, tiny_params_dict(), values)
    assert out["stages.enabled"] is True
    assert out["stages.configs"] == [
        {
            "stage_name": "experts",
            "max_steps": 6,
            "parameter_lr_multipliers": [
                {"pattern": ".*shared_core.*|.*wrapper.*", "lr_multiplier": 1.5},
                {"pattern": ".*", "lr_multiplier": 0.0},
            ],
        },
        {"stage_name": "full", "max_steps": 6, "temperature": 2.5},
    ]
    params = validate(apply_overrides(tiny_params_dict(), out))
    assert [s.stage_name for s in params.stages.configs] == ["experts", "full"]


# --------------------------------------------------------------------------- `dvc exp run -S` encoding
@pytest.mark.parametrize(
    "value",
    [
        0.5,
        1e-05,
        3e-7,
        2.5e10,
        1e300,
        0.1 + 0.2,
        -0.0,
        7,
        True,
        None,
        "cosine",
        ".*layers\\.0\\..*",
        "a'b\\c$",
        "x\\",
        "x\\'",
        "a${x}b",
        '"q"',
        "a,b]}{[ :=",
        "ünï",
        [1, 2.5, "x"],
        [{"pattern": ".*", "lr_multiplier": 1e-4}],
    ],
)
def test_set_param_values_survive_dvcs_hydra_parser(tmp_path, value):
    """What `dvc exp run -S` writes into params.yaml (DVC's own code) reads back as the same value."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"training": {"x": 0}}))
    dvcexp.apply_set_params(path, {"training.x": value})
    got = yaml.safe_load(path.read_text())["training"]["x"]
    if isinstance(value, float) and isinstance(got, str):
        got = float(got)  # DVC writes 1e-05 (YAML 1.2); PyYAML reads it as a string, pydantic as the float
    if isinstance(value, list) and value and isinstance(value[0], dict):
        got = [{**d, "lr_multiplier": float(d["lr_multiplier"])} for d in got]
    assert got == value and (not isinstance(value, float) or math.copysign(1, got) == math.copysign(1, value))


def test_roundtrip_check_accepts_a_resolved_trial():
    spec = parse_spec(VALID)
    base = tiny_params_dict()
    out = resolve(
        spec,
        base,
        {
            LAYOUT: "two_stage",
            knob_name("two_stage", 0, "max_steps"): 3,
            knob_name("two_stage", 0, lr_name(".*shared_core.*|.*wrapper.*")): 1e-5,
            knob_name("two_stage", 1, "temperature"): 1.5,
            "loss.alpha": 0.25,
        },
    )
    assert dvcexp.roundtrip_problem(yaml.safe_dump(base), out, validate(apply_overrides(base, out))) is None


# --------------------------------------------------------------------------- fuzz
JUNK = [
    None,
    -1,
    0,
    1e9,
    -1e-9,
    "abc",
    "",
    [],
    {},
    True,
    2.5,
    [1, 2],
    {"type": "float"},
    {"type": "int", "low": 1},
    "loss.alpha",
    float("inf"),
    ".*",
    "(unclosed",
    {"a": {"b": 1}},
]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(rng: random.Random, doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    path = rng.choice([p for p in _paths(doc) if p])
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    op = rng.choice(["delete", "typo", "junk", "junk", "number", "add", "swap"])
    if op == "delete":
        del parent[key]
    elif op == "typo" and isinstance(key, str) and len(key) > 1:
        i = rng.randrange(len(key) - 1)
        parent[key[:i] + key[i + 1] + key[i] + key[i + 2 :]] = parent.pop(key)
    elif op == "number" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([-parent[key], parent[key] * 10, parent[key] / 10, 0, parent[key] + 0.5])
    elif op == "add" and isinstance(parent[key], dict):
        parent[key][rng.choice(["extra", "lowe", "choice", "loss.alpah", "when"])] = rng.choice(JUNK)
    elif op == "swap" and isinstance(parent[key], dict) and {"low", "high"} <= parent[key].keys():
        parent[key]["low"], parent[key]["high"] = parent[key]["high"], parent[key]["low"]
    else:
        parent[key] = copy.deepcopy(rng.choice(JUNK))
    return doc


def _mutations(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        spec, params = copy.deepcopy(VALID), tiny_params_dict()
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.75:
                spec = _mutate(rng, spec)
            else:
                params = _mutate(rng, params)
        yield spec, params


def test_fuzz_200_mutations_give_a_plan_or_a_user_error(names):
    """Random mutations of a valid spec and params.yaml: a valid run plan or a UserError, nothing else."""
    base_text = yaml.safe_dump(tiny_params_dict())
    outcomes = {"plan": 0, "error": 0}
    for spec, params in _mutations(200):
        try:
            p = build_plan(
                spec,
                params,
                DVC_YAML,
                names,
                samples=2,
                check_encoding=lambda o, prm, params=params: dvcexp.roundtrip_problem(yaml.safe_dump(params), o, prm),
            )
        except UserError as e:
            assert str(e).strip(), "an error must say what is wrong"
            outcomes["error"] += 1
            continue
        outcomes["plan"] += 1
        for overrides in p.examples:  # every example of a plan is a valid params.yaml
            validate(apply_overrides(params, overrides))
    assert outcomes["plan"] >= 5 and outcomes["error"] >= 100, outcomes  # both paths exercised
    assert base_text == yaml.safe_dump(tiny_params_dict())  # nothing mutated the shared defaults


@pytest.fixture
def spec_repo(tmp_path) -> Path:
    """A git repository with the pipeline's dvc.yaml and the tiny params (no outputs)."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"],
    ):
        subprocess.run(cmd, cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "t"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "t@t"], cwd=root, check=True)
    return root


def test_fuzz_sample_through_the_cli_exits_0_or_2_without_traceback(spec_repo):
    """`kdsweep run --check` on a sample of the mutations: exit 0 or 2, never a traceback."""
    from kdsweep import cli

    codes = []
    for spec, params in list(_mutations(200))[::20]:
        (spec_repo / "s.yaml").write_text(yaml.safe_dump(spec))
        (spec_repo / "params.yaml").write_text(yaml.safe_dump(params))
        out, err = io.StringIO(), io.StringIO()
        old_argv = sys.argv
        sys.argv = ["kdsweep", "run", "s.yaml", "--check"]
        try:
            with chdir(spec_repo), redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as info:
                cli.main()
                sys.exit(0)
        finally:
            sys.argv = old_argv
        codes.append(info.value.code or 0)
        assert info.value.code in (0, None, 2), err.getvalue()
        assert "Traceback" not in err.getvalue() + out.getvalue()
        if info.value.code == 2:
            assert err.getvalue().startswith("error: s.yaml: ") or err.getvalue().startswith("error: params.yaml"), (
                err.getvalue()
            )
    assert 2 in codes


def test_cli_spec_error_exits_2_without_traceback(spec_repo):
    (spec_repo / "bad.yaml").write_text(
        yaml.safe_dump(with_(**{"space/loss.alpah": {"type": "float", "low": 0, "high": 1}}))
    )
    cli = Path(sys.executable).parent / "kdsweep"
    proc = subprocess.run([str(cli), "run", "bad.yaml"], cwd=spec_repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "space.loss.alpah: unknown params.yaml key; did you mean `loss.alpha`?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (spec_repo / "studies").exists()  # nothing ran


@pytest.mark.parametrize(
    "output,transient",
    [
        ("ERROR: Unable to acquire lock. Most likely another DVC process is running", True),
        ("fatal: Unable to create '/r/.git/index.lock': File exists.", True),
        ("error: cannot lock ref 'refs/exps/ab/cd/demo-3': is at 123 but expected 456", True),
        ("error: distill: stopped after 1 non-finite losses in a row (step 1)", False),
        ("ERROR: failed to reproduce 'distill': failed to run: kdsweep distill, exited with 2", False),
    ],
)
def test_lock_errors_are_retried_and_trial_errors_are_not(output, transient):
    assert bool(exprun.TRANSIENT.search(output)) is transient


def test_a_rebuilt_upstream_stage_is_detected_from_the_output_or_the_lock():
    before = {
        "prepare": {"outs": [{"path": "data/prepared", "md5": "a.dir"}]},
        "student": {"outs": [{"path": "models/student_init", "md5": "b.dir"}]},
    }
    same = {**before, "distill": {"outs": [{"path": "models/student", "md5": "c.dir"}]}}
    assert dvcexp.upstream_problems(same, before, ["prepare", "student"], "Running stage 'distill':") == []
    changed = {**same, "student": {"outs": [{"path": "models/student_init", "md5": "d.dir"}]}}
    assert dvcexp.upstream_problems(changed, before, ["prepare", "student"], "") == [
        "student (its dvc.lock entry changed)"
    ]
    assert dvcexp.upstream_problems(same, before, ["prepare", "student"], "Running stage 'prepare':\n") == [
        "prepare (DVC ran it)"
    ]
