"""Every file the CLI reads, in every bad state, is one clear error: exit 2, no traceback, the file
named, and nothing written.

The matrix is (file x state x command), each case the real ``kdsweep`` console script in a copy
of one real git + DVC repository (the shipped params.yaml and dvc.yaml, a study spec, a real
Optuna journal with one finished trial, a real HDF5 cache). Then the checks of what the CLI
takes besides files: option values, study names (against a real ``dvc exp run -n``) and a
search space that samples nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import optuna
import pytest
from helpers import REPO
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from sweeprepo import committed_repo, kdsweep, sh, write_spec

from kdsweep.sweep import dvcexp

SPEC = "experiments/s.yaml"
JOURNAL = "studies/s.journal"
CACHE = "data/teacher_logits/validation.h5"

YAML_STATES = {
    "missing": None,
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "invalid YAML": b"a: [1, 2\nb: {\n",
    "duplicate keys": "duplicate",
    "wrong types": "types",
}
WRONG_TYPES = {
    SPEC: b"study: s\nworkers: many\n",
    "params.yaml": b"training:\n  max_steps: lots\n",
    "dvc.yaml": b"stages: [prepare, distill]\n",
}
JOURNAL_STATES = {
    "missing": None,
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "text": b"a: [1, 2\nb: {\n",
    "foreign records": b'{"op_code": "x"}\n{"op_code": 0, "worker_id": 1}\n',
}
CACHE_STATES = {
    "missing": None,
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "text": b"a: [1, 2\nb: {\n",
    "wrong types": "types",
}
RUN = [("run", SPEC, "--check"), ("run", SPEC)]
COMMANDS = {
    SPEC: [*RUN, ("status", SPEC), ("best", SPEC), ("report", SPEC)],
    "params.yaml": [*RUN, ("distill",)],
    "dvc.yaml": RUN,
    JOURNAL: [("status", "s"), ("best", "s"), ("report", "s")],
    CACHE: [("cache", "verify", CACHE), ("cache", "inspect", CACHE)],
}


def _cases() -> list:
    states = {SPEC: YAML_STATES, "params.yaml": YAML_STATES, "dvc.yaml": YAML_STATES}
    states |= {JOURNAL: JOURNAL_STATES, CACHE: CACHE_STATES}
    # Each (file, state) runs fast with the file's first command; its other commands, which read the
    # file through the same code, are in the slow suite.
    return [
        pytest.param(
            file,
            state,
            cmd,
            id=f"{Path(file).name}-{state.replace(' ', '_')}-{'_'.join(c for c in cmd if c not in (SPEC, CACHE))}",
            marks=[pytest.mark.slow] if i else [],
        )
        for file, by_state in states.items()
        for state in by_state
        for i, cmd in enumerate(COMMANDS[file])
    ]


def _write_cache(path: Path) -> None:
    """A small cache-shaped HDF5 file (the reader refuses it only for what a case breaks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"complete": True, "format_version": 2, "top_k": 4, "vocab_size": 32})
        f.attrs.update({"betas": np.array([0.25, 1.0]), "fingerprint": "{}", "log_normalizer_quantum": 2.0**-14})
        f.attrs["log_normalizer_max_error"] = 0.0


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A repository with a spec, a journal study ``s`` with one complete trial, and a cache file."""
    pipeline = {name: (REPO / name).read_text() for name in ("params.yaml", "dvc.yaml")}
    repo = committed_repo(tmp_path_factory.mktemp("bad-files") / "repo", pipeline)
    write_spec(repo, "s")
    (repo / "studies").mkdir()
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(repo / JOURNAL))))
    trial = study.ask()
    trial.suggest_float("loss.alpha", 0.1, 0.9)
    trial.set_user_attr("experiment", "s-0")
    study.tell(trial, 1.0)
    _write_cache(repo / CACHE)
    return repo


def _snapshot(repo: Path) -> dict[str, str]:
    """Every file the user could care about, by content (git's and DVC's own scratch space aside)."""
    skip = (repo / ".git", repo / ".dvc" / "tmp")
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in repo.rglob("*")
        if p.is_file() and not any(s in p.parents for s in skip)
    }


def _damage(repo: Path, file: str, state: str, content) -> None:
    path = repo / file
    if content is None:
        path.unlink()
    elif content == "duplicate":
        lines = path.read_text().splitlines()
        # The first nested key written twice: PyYAML alone would silently keep the second.
        i = next(i for i, line in enumerate(lines) if line.startswith("  ") and ":" in line and "#" not in line[:3])
        path.write_text("\n".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :]) + "\n")
    elif content == "types" and file == CACHE:
        with h5py.File(path, "r+") as f:
            f.attrs["top_k"] = "four"
    elif content == "types":
        path.write_bytes(WRONG_TYPES[file])
    else:
        path.write_bytes(content)


def one_clear_error(proc: subprocess.CompletedProcess, named: str) -> str:
    """Exit 2, no traceback, and an error whose first line names ``named``; further lines only list
    the problems of that file (indented), as every validation error does."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: ") and named in lines[0], proc.stderr
    assert all(line.startswith("  ") for line in lines[1:]), proc.stderr
    return lines[0]


@pytest.mark.parametrize("file, state, command", _cases())
def test_a_bad_file_is_one_clear_error_and_nothing_is_written(base, tmp_path, file, state, command):
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    states = {JOURNAL: JOURNAL_STATES, CACHE: CACHE_STATES}.get(file, YAML_STATES)
    _damage(repo, file, state, states[state])
    before = _snapshot(repo)
    proc = kdsweep(repo, *command, check=False, timeout=300)
    one_clear_error(proc, Path(file).name)
    assert _snapshot(repo) == before


# --------------------------------------------------------------------------- what else the CLI takes
@pytest.mark.parametrize(
    "args, named",
    [
        (("run", SPEC, "--n-trials", "-5"), "--n-trials: must be >= 1, got -5"),
        (("run", SPEC, "--workers", "0"), "--workers: must be >= 1, got 0"),
        (("best", "s", "--top", "0"), "--top: must be >= 1, got 0"),
    ],
)
def test_option_values_are_checked_like_the_specs(base, tmp_path, args, named):
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    before = _snapshot(repo)
    line = one_clear_error(kdsweep(repo, *args, check=False), named)
    assert named in line
    assert _snapshot(repo) == before


NAMES = ["kd.sweep_1", "a..b", "x.lock", "v1.0-rc"]


def test_study_names_are_checked_as_dvc_checks_experiment_names(tmp_path):
    """``dvcexp.experiment_name_problem`` says what a real `dvc exp run -n` does, name by name."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text('stages:\n  noop:\n    cmd: "true"\n')
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "noop")
    verdicts = {}
    for name in NAMES:
        run = sh(repo, "dvc", "exp", "run", "-n", f"{name}-0", check=False)
        ours = dvcexp.experiment_name_problem(repo, f"{name}-0")
        verdicts[name] = (run.returncode == 0, ours is None)
        if ours is not None:
            assert "Invalid exp name" in run.stderr + run.stdout
    assert verdicts == {name: (ok, ok) for name, (ok, _) in verdicts.items()}
    assert not verdicts["a..b"][0] and verdicts["kd.sweep_1"][0]


def test_run_check_refuses_a_study_name_dvc_would_refuse(base, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    spec = write_spec(repo, "a..b")
    line = one_clear_error(kdsweep(repo, "run", spec, "--check", check=False), "a..b.yaml")
    assert "study 'a..b' cannot name its trials' DVC experiments" in line and "rename it" in line


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"space": {}, "baselines": []}, "space: nothing to sample"),
        (
            {"space": {"loss.alpha": {"type": "categorical", "choices": [0.5]}}, "baselines": []},
            "space.loss.alpha: one choice (0.5) samples nothing",
        ),
    ],
)
def test_a_space_that_samples_nothing_points_to_fixed(base, tmp_path, changes, named):
    repo = tmp_path / "repo"
    shutil.copytree(base, repo, symlinks=True)
    spec = write_spec(repo, "nothing", **changes)
    proc = kdsweep(repo, "run", spec, "--check", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert named in proc.stderr and "`fixed:`" in proc.stderr
