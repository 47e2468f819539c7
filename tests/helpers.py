"""Shared test data and helpers: the tiny config every pipeline test runs on."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "dataset": {"max_samples": 24, "max_length": 32},
    "tokenizer": {"vocab_size": 320},
    "teacher": {
        "arch": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
        },
        "train": {"max_steps": 8, "batch_size": 8, "learning_rate": 0.01, "warmup_steps": 2},
        "top_k": 16,
        "cache_batch_size": 8,
        "temperature_grid": 6,
    },
    "student": {"wrapper_rank": 2, "core_intermediate_size": None, "calibration_sequences": 8, "eval_sequences": 8},
    "training": {
        "max_steps": 6,
        "train_sequences": None,  # the whole tiny split
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "eval_steps": 3,
        "learning_rate": 0.003,
        "warmup_steps": 1,
    },
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


def tiny_qwen3_moe(vocab_size: int, **config):
    """A randomly initialised 2-layer, 32-wide Qwen3-MoE (seed 0): a hub-style teacher to save locally."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=vocab_size, **shape, **heads, **config))


@contextlib.contextmanager
def small_disk(where: Path, size: str = "1m"):
    """A real tmpfs of ``size`` mounted at ``where`` for the block (the tests run as root), then unmounted."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill_disk(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the file to delete to free it."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler
