"""Helpers for tests that run studies in real git + DVC repositories (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

BIN = Path(sys.executable).parent
UPSTREAM = ["prepare", "teacher", "teacher_logits", "student"]
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}

SPEC = {
    "fixed": {"training.max_steps": 6, "training.eval_steps": 3, "training.logging_steps": 3, "training.threads": 1},
    "space": {
        "loss.alpha": {"type": "float", "low": 0.1, "high": 0.9},
        "loss.temperature": {"type": "float", "low": 1.0, "high": 4.0},
    },
    "baselines": [{"loss.alpha": 0.5, "loss.temperature": 2.0}],
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
    "pruner": {"type": "none"},
    "budget": {"n_trials": 2},
    "workers": 1,
    "retention": {"keep_best": 1},
}
TS = optuna.trial.TrialState


def sh(repo: Path, *cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def committed_repo(repo: Path, files: dict[str, str]) -> Path:
    """A new git + DVC repository at ``repo`` holding ``files`` (name -> text), committed."""
    repo.mkdir(parents=True)
    for name, text in files.items():
        (repo / name).write_text(text)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "base")
    return repo


def kdsweep(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return sh(repo, str(BIN / "kdsweep"), *args, **kw)


def write_spec(repo: Path, name: str, **changes) -> str:
    spec = {**json.loads(json.dumps(SPEC)), **changes, "study": name}
    path = repo / "experiments" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f"experiments/{name}.yaml"


def study(repo: Path, name: str) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(repo / "studies" / f"{name}.journal")))
    )


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> {"params": params.yaml, "metrics": metrics/distill.json}."""
    out = {}
    for baseline in json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            data = rev.get("data") or {}
            out[exp.get("name") or rev.get("name")] = {
                "params": data["params"]["params.yaml"]["data"],
                "metrics": data["metrics"]["metrics/distill.json"]["data"],
                "rev": rev["rev"],
            }
    return out


def lock(repo: Path, rev: str | None = None) -> dict:
    text = (repo / "dvc.lock").read_text() if rev is None else sh(repo, "git", "show", f"{rev}:dvc.lock").stdout
    return yaml.safe_load(text)["stages"]


def start_long_study(repo: Path, name: str, n_trials: int, **popen) -> tuple[str, subprocess.Popen]:
    """Start `kdsweep run` on a study of long (150-step) trials, no baselines, every output kept:
    something to kill or interrupt mid-trial. Returns the spec path and the runner process."""
    spec = write_spec(
        repo,
        name,
        baselines=[],
        budget={"n_trials": n_trials},
        retention={"keep_best": None},
        fixed={**SPEC["fixed"], "training.max_steps": 150},
    )
    return spec, subprocess.Popen([str(BIN / "kdsweep"), "run", spec], cwd=repo, env=ENV, **popen)
