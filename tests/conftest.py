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

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "dataset": {"max_samples": 24, "max_length": 32},
    "tokenizer": {"vocab_size": 320},
    "teacher": {
        "arch": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        "train": {"max_steps": 8, "batch_size": 8, "learning_rate": 0.01, "warmup_steps": 2},
        "top_k": 16,
        "cache_batch_size": 8,
        "temperature_grid": 6,
    },
    "student": {"wrapper_rank": 2, "core_intermediate_size": None, "calibration_sequences": 8, "eval_sequences": 8},
    "training": {"max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 2, "eval_steps": 3,
                 "learning_rate": 0.003, "warmup_steps": 1},
    "evaluate": {"batch_size": 8},
}


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params_dict(**overrides) -> dict:
    """The shipped params.yaml with the TINY overrides (and any others) applied."""
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    return deep_merge(deep_merge(shipped, TINY), overrides)


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
