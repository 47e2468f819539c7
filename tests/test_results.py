"""What `kdsweep status`, `best` and `run --check` tell the user, on real studies.

The quick tests build a bare git + DVC repository (the shipped params.yaml and dvc.yaml,
nothing reproduced) and real Optuna journal studies in it. The rest reuse the 2-trial study
of tests/test_sweep.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from helpers import REPO
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from sweeprepo import ENV, kdsweep, sh, study, write_spec

from kdsweep.sweep.dvcexp import exp_refs
from kdsweep.sweep.results import exp_show_command


@pytest.fixture(scope="module")
def study_repo(request) -> Path:
    """The repository of test_sweep's ``small_study`` (2 complete trials); do not write to it."""
    return request.getfixturevalue("small_study")[0]


@pytest.fixture
def bare_repo(tmp_path) -> Path:
    """A git repository with the shipped params.yaml and dvc.yaml, committed; nothing run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, repo / name)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "bare")
    return repo


def _one_clear_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- clear errors
def test_status_of_a_missing_spec_file_is_one_clear_error(bare_repo):
    line = _one_clear_error(kdsweep(bare_repo, "status", "experiments/missing.yaml", check=False))
    assert "experiments/missing.yaml" in line


def test_run_of_a_missing_spec_names_no_option_that_run_lacks(bare_repo):
    write_spec(bare_repo, "present")
    line = _one_clear_error(kdsweep(bare_repo, "run", "experiments/missing.yaml", check=False))
    assert "experiments/missing.yaml" in line and "--params" not in line
    assert "experiments/present.yaml" in line  # the specs that do exist


def test_a_storage_driver_that_is_not_installed_is_one_clear_error(bare_repo):
    url = "mysql+pymysql://kd:s3cret@db.example:3306/sweeps"
    spec = write_spec(bare_repo, "remote", storage=url)
    for args in (("run", spec, "--check"), ("status", "remote"), ("best", "remote")):
        line = _one_clear_error(kdsweep(bare_repo, *args, check=False))
        assert "db.example:3306/sweeps" in line and "s3cret" not in line, args
        assert "`pymysql`" in line and "pip install pymysql" in line, args


# --------------------------------------------------------------------------- status: dead owners
def _running_trial(study: optuna.Study, owner: dict, heartbeat: float) -> None:
    t = study.ask()
    t.suggest_float("loss.alpha", 0.1, 0.9)
    t.set_user_attr("experiment", f"owners-{t.number}")
    t.set_user_attr("runner", owner)
    t.set_user_attr("heartbeat", heartbeat)


def test_status_says_when_a_running_trials_owner_is_gone(bare_repo):
    dead = subprocess.Popen(["sleep", "60"])
    dead_started = psutil.Process(dead.pid).create_time()
    dead.kill()
    dead.wait()
    host, now = socket.gethostname(), time.time()
    me = {"host": host, "pid": os.getpid(), "started": psutil.Process().create_time()}
    (bare_repo / "studies").mkdir()
    storage = JournalStorage(JournalFileBackend(str(bare_repo / "studies" / "owners.journal")))
    study = optuna.create_study(study_name="owners", storage=storage)
    _running_trial(study, {"host": host, "pid": dead.pid, "started": dead_started}, now)  # killed
    _running_trial(study, me, now)  # this test's own process: alive
    _running_trial(study, {"host": "elsewhere", "pid": 1, "started": 0.0}, now - 3600)  # stale heartbeat
    _running_trial(study, {"host": "elsewhere", "pid": 1, "started": 0.0}, now - 5)  # recent heartbeat

    out = kdsweep(bare_repo, "status", "owners").stdout
    lines = {int(m.group(1)): line for line in out.splitlines() if (m := re.match(r"running: trial (\d+)", line))}
    assert "owner gone; resumes on the next run" in lines[0]
    assert "owner gone" not in lines[1] and "starting" in lines[1]
    assert "owner gone; resumes on the next run" in lines[2]
    assert "owner gone" not in lines[3]


# --------------------------------------------------------------------------- best --apply, dvc exp show
def _leaves(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data:
        return {k: v for i, value in enumerate(data) for k, v in _leaves(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def test_best_apply_changes_only_the_lines_of_changed_values(study_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(study_repo, repo, symlinks=True)
    params = repo / "params.yaml"
    lines = params.read_text().splitlines()
    lines = ["# the tiny pipeline's params", ""] + [
        f"{line}  # KD weight" if line.strip().startswith("alpha:") else line for line in lines
    ]
    params.write_text("\n".join(lines) + "\n")
    sh(repo, "git", "commit", "-q", "-am", "params with comments")
    before = yaml.safe_load(params.read_text())

    out = kdsweep(repo, "best", "small", "--apply").stdout
    winner = optuna.load_study(
        study_name="small", storage=JournalStorage(JournalFileBackend(str(repo / "studies" / "small.journal")))
    ).best_trial
    rev = exp_refs(repo)[f"small-{winner.number}"][1]  # not under HEAD any more: `dvc exp show` omits it
    exp_params = yaml.safe_load(sh(repo, "git", "show", f"{rev}:params.yaml").stdout)
    changed = [k for k, v in _leaves(exp_params).items() if _leaves(before).get(k, object()) != v]
    assert changed, "the best trial sets something params.yaml does not already have"

    assert yaml.safe_load(params.read_text()) == exp_params
    numstat = sh(repo, "git", "diff", "--numstat", "params.yaml").stdout.split()
    assert numstat == [str(len(changed)), str(len(changed)), "params.yaml"], (changed, out)
    text = params.read_text()
    assert text.startswith("# the tiny pipeline's params\n") and "  # KD weight" in text
    assert "dvc exp show" in out


def test_the_exp_show_command_fits_120_columns_and_shows_val_loss(study_repo):
    repo = study_repo
    with contextlib.chdir(repo):
        command = exp_show_command("small")
    assert command.startswith("dvc exp show ")
    shown = subprocess.run(
        ["bash", "-c", command + " --no-pager"], cwd=repo, env={**ENV, "COLUMNS": "120"}, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 120, shown.stdout
    header = next(line for line in lines if "Experiment" in line)
    assert "val_loss" in header and "state" in header and "loss.alpha" in header and "loss.temperature" in header
    rows = [line for line in lines if "[small-" in line]
    assert len(rows) == 2 and all("complete" in row and "!" not in row for row in rows), shown.stdout
    values = [float(row.split()[row.split().index("complete") + 1]) for row in rows]
    assert values == sorted(values)  # sorted by val_loss, best first
    assert command in kdsweep(repo, "best", "small").stdout
    assert command in kdsweep(repo, "status", "small").stdout


# --------------------------------------------------------------------------- test metrics, report
@pytest.fixture
def study_copy(study_repo, tmp_path) -> Path:
    """A private copy of ``small_study`` with no test metrics stored yet (another test's `best` may have)."""
    repo = tmp_path / "repo"
    shutil.copytree(study_repo, repo, symlinks=True)
    (repo / "studies" / "small" / "test_metrics.json").unlink(missing_ok=True)
    return repo


def _test_table(out: str) -> dict[int, list[str]]:
    """`best`'s test-metrics table: trial number -> its cells after the trial (experiment, val_loss, test_*...)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "trial"] and "test_ce" in line)
    assert lines[start - 1] == "selection used validation (val_loss); the test metrics are shown for information only"
    rows = {}
    for line in lines[start + 2 :]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[int(cells[1])] = cells[2:]
    return rows


def test_best_shows_test_metrics_evaluated_once_and_as_the_evaluate_stage_measures_them(study_copy):
    repo = study_copy
    s = study(repo, "small")
    winner = s.best_trial
    (removed,) = s.user_attrs["outputs_removed"]  # keep_best 1: the other trial's student is gone

    first = kdsweep(repo, "best", "small").stdout
    assert f"test split: evaluating trial {winner.number} (small-{winner.number})" in first
    rows = _test_table(first)
    test_ce = float(rows[winner.number][2])
    assert math.isfinite(test_ce) and 0 < test_ce < 20
    assert rows[removed][2:6] == ["\u2014"] * 4 and "outputs removed by retention (keep_best 1)" in first
    stored = json.loads((repo / "studies" / "small" / "test_metrics.json").read_text())
    assert f"{stored[f'small-{winner.number}']['test_ce']:.4f}" == rows[winner.number][2]

    second = kdsweep(repo, "best", "small").stdout
    assert "test split: evaluating" not in second  # read back, not evaluated again
    assert _test_table(second) == rows

    # The evaluate stage on the applied best trial measures the same test CE.
    kdsweep(repo, "best", "small", "--apply")
    kdsweep(repo, "evaluate")
    evaluated = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert evaluated["test_ce"] == pytest.approx(stored[f"small-{winner.number}"]["test_ce"], rel=1e-6)


def test_report_has_all_trials_curves_test_metrics_and_the_best_against_baseline(study_copy):
    repo = study_copy
    s = study(repo, "small")
    winner = s.best_trial
    out = repo / "report"
    kdsweep(repo, "report", "small", "--out", str(out))
    text = (out / "report.md").read_text()
    assert "![Learning curves of all trials](learning_curves.png)" in text
    assert (out / "learning_curves.png").stat().st_size > 1000
    stored = json.loads((repo / "studies" / "small" / "test_metrics.json").read_text())
    test_ce = f"{stored[f'small-{winner.number}']['test_ce']:.4f}"
    assert "## Test metrics of the best trials" in text and f"| small-{winner.number} |" in text
    line = next(line for line in text.splitlines() if line.startswith("**Best against baseline** (test CE"))
    base = next(t for t in s.trials if t.user_attrs.get("baseline") == 0)
    if winner.number == base.number:
        assert f"the best trial is trial {base.number} (the baseline) itself, test CE {test_ce}" in line
    else:
        assert f"trial {winner.number} (`small-{winner.number}`) {test_ce} against trial {base.number}" in line
    assert "Selection used validation (val_loss); the test metrics are shown for information only." in text


def test_the_best_against_baseline_line_gives_the_relative_difference(study_copy):
    """A hand-made study whose best trial (1) and baseline (0) name the kept experiment twice: the
    line compares their test CE (equal here, so +0.00%) rather than naming the baseline as the best."""
    repo = study_copy
    kept = study(repo, "small").best_trial.user_attrs["experiment"]
    storage = JournalStorage(JournalFileBackend(str(repo / "studies" / "pair.journal")))
    pair = optuna.create_study(study_name="pair", storage=storage)
    for value, attrs in ((5.0, {"baseline": 0}), (4.0, {})):
        t = pair.ask()
        t.suggest_float("loss.alpha", 0.1, 0.9)
        for k, v in {"experiment": kept, "outputs": "kept", **attrs}.items():
            t.set_user_attr(k, v)
        pair.tell(t, value)
    kdsweep(repo, "report", "pair", "--out", str(repo / "report"))
    text = (repo / "report" / "report.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("**Best against baseline**"))
    assert re.search(
        rf"trial 1 \(`{kept}`\) (\d+\.\d{{4}}) against trial 0 \(`{kept}`, the baseline\) \1: \+0\.00%$", line
    )
