"""`kdsweep best --apply` never loses what the user wrote in params.yaml.

Each test builds a real git + DVC repository (the shipped params.yaml, a one-stage dvc.yaml
with no outputs, so `dvc exp apply` has nothing to fetch from a cache), a real Optuna journal
study with one complete trial, and that trial's DVC experiment (a real ref under
``refs/exps``, written by the runner's own :func:`kdsweep.sweep.dvcexp.record_failed`).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from helpers import REPO
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from sweeprepo import committed_repo, kdsweep, sh, write_spec

from kdsweep.sweep import dvcexp

OVERRIDES = {"loss.alpha": 0.25, "training.max_steps": 6}


@pytest.fixture
def applied_repo(tmp_path) -> Path:
    """A repository whose study ``tiny`` has one complete trial, ``tiny-0``, that set :data:`OVERRIDES`."""
    dvc_yaml = 'stages:\n  distill:\n    cmd: "true"\n    params: [loss, training]\n'
    repo = committed_repo(tmp_path / "repo", {"params.yaml": (REPO / "params.yaml").read_text(), "dvc.yaml": dvc_yaml})
    write_spec(repo, "tiny")
    (repo / "studies").mkdir()
    storage = JournalStorage(JournalFileBackend(str(repo / "studies" / "tiny.journal")))
    study = optuna.create_study(study_name="tiny", storage=storage)
    trial = study.ask()
    trial.suggest_float("loss.alpha", 0.1, 0.9)
    trial.set_user_attr("experiment", "tiny-0")
    trial.set_user_attr("overrides", OVERRIDES)
    baseline = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    params_text = (repo / "params.yaml").read_text()
    dvcexp.record_failed(repo, "tiny-0", baseline, params_text, OVERRIDES, {"state": "complete", "val_loss": 1.0}, {})
    study.tell(trial, 1.0)
    return repo


def _edit(repo: Path, old: str, new: str) -> str:
    path = repo / "params.yaml"
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return path.read_text()


def test_changed_keys_names_every_dotted_key_that_differs():
    from kdsweep.sweep import apply

    before = {"a": {"b": 1, "c": [1, 2]}, "d": True, "e": {}}
    after = {"a": {"b": 1.0, "c": [1, 3]}, "d": 1, "f": None, "e": {}}
    assert apply.changed_keys(before, after) == ["a.b", "a.c.1", "d", "f"]
    assert apply.changed_keys(before, before) == []


def test_apply_refuses_uncommitted_edits_and_names_the_keys(applied_repo):
    repo = applied_repo
    _edit(repo, "  num_train_epochs: 2\n", "  num_train_epochs: 3\n")
    text = _edit(repo, "  alpha: 0.5 ", "  alpha: 0.7 ")
    lock = (repo / "dvc.lock").exists()

    proc = kdsweep(repo, "best", "tiny", "--apply", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ") and "params.yaml" in line and "--force" in line
    assert "loss.alpha" in line and "training.num_train_epochs" in line
    assert (repo / "params.yaml").read_text() == text  # nothing the user wrote is lost
    assert (repo / "dvc.lock").exists() == lock  # and nothing was applied
    from kdsweep.sweep import apply

    assert apply.hand_edits(repo) == ["loss.alpha", "training.num_train_epochs"]


def test_apply_force_sets_only_the_trials_keys_and_keeps_other_edits_and_comments(applied_repo):
    repo = applied_repo
    _edit(repo, "  num_train_epochs: 2\n", "  num_train_epochs: 3  # my own edit\n")
    _edit(repo, "  alpha: 0.5 ", "  alpha: 0.7 ")

    out = kdsweep(repo, "best", "tiny", "--apply", "--force").stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["loss"]["alpha"] == 0.25 and params["training"]["max_steps"] == 6  # the trial's values
    assert params["training"]["num_train_epochs"] == 3  # the edit the trial does not set stays
    text = (repo / "params.yaml").read_text()
    assert "  num_train_epochs: 3  # my own edit\n" in text and "# KD temperature" in text
    assert "replaced your uncommitted loss.alpha" in out


def test_apply_keeps_keys_committed_after_the_trial_ran(applied_repo):
    """The experiment's params.yaml is the trial's baseline; a key committed since then stays as HEAD has it."""
    repo = applied_repo
    _edit(repo, "  num_train_epochs: 2\n", "  num_train_epochs: 4\n")
    sh(repo, "git", "commit", "-q", "-am", "more epochs")
    head = yaml.safe_load((repo / "params.yaml").read_text())

    kdsweep(repo, "best", "tiny", "--apply")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["training"]["num_train_epochs"] == 4
    from kdsweep.sweep import apply

    assert apply.changed_keys(head, params) == list(OVERRIDES)
    numstat = sh(repo, "git", "diff", "--numstat", "params.yaml").stdout.split()
    assert numstat == ["2", "2", "params.yaml"]  # one line per override, nothing else rewritten
