"""Shared fixtures: a tiny config and a tiny pipeline run once per test session.

Everything is real: the builtin corpus, a BPE tokenizer trained on it, a 2-layer
Qwen3-MoE teacher trained for a few steps, an HDF5 cache and a compressed student.
"""

from __future__ import annotations

import shutil
from contextlib import chdir
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_params_dict


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
