"""Shared fixtures: a tiny config and a tiny pipeline run once per test session.

Everything is real: the builtin corpus, a BPE tokenizer trained on it, a 2-layer
Qwen3-MoE teacher trained for a few steps, an HDF5 cache and a compressed student.
"""

from __future__ import annotations

import shutil
import subprocess
from contextlib import chdir
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, tiny_params_dict
from sweeprepo import kdsweep, sh, write_spec


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # two cores shared with other work; keep runs predictable


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """prepare -> teacher -> teacher_logits -> student, run once in a temporary directory."""
    from kdsweep.config import validate
    from kdsweep.stages import prepare, student, teacher, teacher_logits

    root = tmp_path_factory.mktemp("pipeline")
    params_dict = tiny_params_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(params_dict))
    params = validate(params_dict)
    torch.set_num_threads(1)
    with chdir(root):
        prepare.main(params)
        teacher.main(params)
        teacher_logits.main(params)
        student.main(params)
    return root


@pytest.fixture
def pipeline_copy(tiny_pipeline, tmp_path) -> Path:
    """A private copy of the tiny pipeline's outputs, for tests that write."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_pipeline, dst)
    return dst


@pytest.fixture(scope="session")
def sweep_template(tmp_path_factory) -> Path:
    """A git + DVC repository with the tiny config whose upstream stages `dvc repro` ran once.

    dvc.lock is left uncommitted, as after `make demo`'s `dvc repro` in a fresh clone.
    """
    repo = tmp_path_factory.mktemp("sweep") / "repo"
    shutil.copytree(REPO / "kdsweep", repo / "kdsweep", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, "git", "config", "user.email", "t@t")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "tiny pipeline")
    sh(repo, "dvc", "repro", "student", "teacher_logits")
    kdsweep(repo, "run", write_spec(repo, "warmup"), "--check")  # caches the student's parameter names
    return repo


@pytest.fixture
def sweep_repo(sweep_template, tmp_path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(sweep_template, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def small_study(sweep_template, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-trial study (the baseline, then one TPE trial) run once per session; tests that write copy it."""
    repo = tmp_path_factory.mktemp("small") / "repo"
    shutil.copytree(sweep_template, repo, symlinks=True)
    proc = kdsweep(repo, "run", write_spec(repo, "small"))
    return repo, proc
