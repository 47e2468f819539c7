"""The params.yaml schema (kdsweep.config): errors that name the key, the shipped file, the CLI exit."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdsweep.config import Params, load_params, validate
from kdsweep.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "params.yaml"


def problems(data) -> str:
    with pytest.raises(UserError) as info:
        validate(data)
    return str(info.value)


def flatten(d, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are compared whole."""
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        out.update(flatten(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def test_misspelled_key_names_the_dotted_path_and_suggests_the_field():
    msg = problems({"loss": {"alpah": 0.5}})
    assert "loss.alpah" in msg and "did you mean `alpha`" in msg
    assert "1 problem" in msg


def test_several_problems_are_all_listed_with_dotted_paths():
    msg = problems(
        {
            "loss": {"alpha": 1.5, "temperature": -1},
            "parameter_lr_multipliers": [
                {"pattern": ".*norm.*", "lr_multiplier": 0.5},
                {"pattern": "(unclosed", "lr_multiplier": -0.1},
            ],
            "trainig": {"learning_rate": 1e-3},
        }
    )
    assert "5 problems" in msg
    lines = msg.splitlines()[1:]
    for path, words in [
        ("loss.alpha", ["less than or equal to 1", "1.5"]),
        ("loss.temperature", ["greater than 0", "-1"]),
        ("parameter_lr_multipliers.1.pattern", ["invalid regular expression", "(unclosed"]),
        ("parameter_lr_multipliers.1.lr_multiplier", ["greater than or equal to 0", "-0.1"]),
        ("trainig", ["unknown key", "did you mean `training`"]),
    ]:
        (line,) = [line for line in lines if line.strip().startswith(path + ":")]
        assert all(w in line for w in words), line


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    msg = problems({"evaluate": {"zzz": 1}})
    assert "evaluate.zzz: unknown key; known keys: batch_size, max_batches" in msg


def test_wrong_types_are_reported_per_key():
    msg = problems({"training": {"learning_rate": "fast", "max_steps": 2.5, "bf16": "maybe"}, "loss": [0.5]})
    assert "4 problems" in msg
    for path in ("training.learning_rate", "training.max_steps", "training.bf16", "loss:"):
        assert path in msg, path
    with pytest.raises(UserError, match="top level must be a mapping"):
        validate(["loss", "training"])


def test_missing_required_key():
    assert "parameter_lr_multipliers.0.lr_multiplier: required key is missing" in problems(
        {"parameter_lr_multipliers": [{"pattern": ".*"}]}
    )


@pytest.mark.parametrize(
    "key,section",
    [
        ("loss.temperature", {"loss": {"temperature": 4.5}}),
        ("loss.temperature", {"loss": {"temperature": 0.5}}),
        (
            "stages.configs.0.temperature",
            {"stages": {"enabled": True, "configs": [{"stage_name": "a", "max_steps": 5, "temperature": 8.0}]}},
        ),
    ],
)
def test_temperature_outside_the_cached_range_is_rejected(key, section):
    msg = problems(section)
    assert f"{key}:" in msg and "teacher.temperature_range [1.0, 4.0]" in msg


def test_temperature_range_is_free_with_a_live_teacher():
    p = validate({"loss": {"temperature": 8.0}, "teacher": {"use_cached_logits": False}})
    assert p.loss.temperature == 8.0
    assert validate({"loss": {"temperature": 0.5}, "teacher": {"temperature_range": [0.5, 2.0]}})


def test_dense_mode_needs_a_live_teacher():
    msg = problems({"loss": {"mode": "dense"}})
    assert "loss.mode" in msg and "use_cached_logits" in msg
    assert validate({"loss": {"mode": "dense"}, "teacher": {"use_cached_logits": False}}).loss.mode == "dense"


@pytest.mark.parametrize("phase", [{"stage_name": "both", "num_epochs": 1, "max_steps": 10}, {"stage_name": "neither"}])
def test_phase_needs_exactly_one_of_epochs_or_steps(phase):
    msg = problems({"stages": {"enabled": True, "configs": [phase]}})
    assert "stages.configs.0:" in msg and phase["stage_name"] in msg and "exactly one of num_epochs or max_steps" in msg


def test_phase_names_are_unique():
    twice = [{"stage_name": "a", "max_steps": 1}, {"stage_name": "a", "max_steps": 2}]
    msg = problems({"stages": {"enabled": True, "configs": twice}})
    assert "stages:" in msg and "stage_name" in msg and "unique" in msg


def test_valid_phases():
    p = validate(
        {
            "stages": {
                "enabled": True,
                "configs": [
                    {
                        "stage_name": "heads",
                        "max_steps": 5,
                        "parameter_lr_multipliers": [{"pattern": ".*", "lr_multiplier": 1}],
                    },
                    {"stage_name": "all", "num_epochs": 0.5, "temperature": 3.0},
                ],
            }
        }
    )
    assert [s.stage_name for s in p.stages.configs] == ["heads", "all"]


def test_cross_field_problems_are_all_listed():
    msg = problems({"loss": {"mode": "dense", "temperature": 5.0}})
    assert "loss.temperature" in msg and "loss.mode" in msg


def test_cross_field_problem_is_listed_beside_field_errors():
    msg = problems({"loss": {"temperature": 9.0}, "training": {"max_steps": 0}})
    assert "training.max_steps" in msg and "loss.temperature" in msg


def test_shipped_params_yaml_validates():
    p = load_params(SHIPPED)
    assert isinstance(p, Params)
    assert [r.pattern for r in p.parameter_lr_multipliers]  # the reference's rules are shipped


def test_code_defaults_equal_the_shipped_params_yaml():
    defaults, shipped = flatten(Params().model_dump()), flatten(load_params(SHIPPED).model_dump())
    differing = sorted(k for k in defaults.keys() | shipped.keys() if defaults.get(k) != shipped.get(k))
    assert not differing, f"Params() defaults differ from params.yaml at: {differing}"


def test_shipped_params_yaml_sets_every_field():
    """The shipped file is the documentation: every field appears in it (no hidden defaults)."""
    written = flatten(yaml.safe_load(SHIPPED.read_text()))
    assert sorted(flatten(Params().model_dump()).keys() - written.keys()) == []


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {alpha: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("loss:\n  alpah: 0.5\n")
    with pytest.raises(UserError, match=rf"{typo.name}: 1 problem:\n  loss\.alpah: unknown key"):
        load_params(typo)


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("loss: {alpah: 0.5}\n")
    cli = Path(sys.executable).parent / "kdsweep"
    proc = subprocess.run(
        [str(cli), "distill", "--params", str(params)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "loss.alpah" in proc.stderr and "alpha" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing ran
