"""Loading, describing and measuring models: the teacher (hub, local or embedded) and the student.

The teacher stage writes ``models/teacher/``. For a hub or local teacher that
directory holds only ``teacher.json`` pointing at it (nothing is copied or trained);
for the embedded default it holds a ``save_pretrained`` checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from kdsweep.config import TeacherArchConfig, TeacherConfig
from kdsweep.errors import UserError

POINTER = "teacher.json"


def embedded_teacher_config(arch: TeacherArchConfig, vocab_size: int, max_length: int, eos_token_id: int):
    """The Qwen3-MoE config of the small teacher the pipeline trains itself."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.moe_intermediate_size * 2,
        moe_intermediate_size=arch.moe_intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        num_experts=arch.num_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        max_position_embeddings=max(max_length, 512),
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        bos_token_id=None,
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``teacher.dtype`` names on ``device``, the same on every path (the cache writer,
    the live teacher of ``distill`` and ``evaluate``, ``cache verify``): ``auto`` is bfloat16 on a
    CUDA device that supports it and float32 elsewhere, CPUs included; any other name is kept."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def default_device() -> torch.device:
    """This process's device: its GPU where CUDA is available (``cuda:LOCAL_RANK`` under torchrun,
    which sets LOCAL_RANK for each process it starts; ``cuda:0`` otherwise), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_causal_lm(
    path_or_id: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    device_map: str | None = None,
):
    """``AutoModelForCausalLM.from_pretrained``; a missing or unreadable model is a :class:`UserError`.

    ``device_map="auto"`` spreads the model over the visible devices (Accelerate's big-model loading).

    A saved compressed student needs its model class registered first: load it with
    :func:`kdsweep.compress.load_student`.
    """
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path_or_id), revision=revision, trust_remote_code=trust_remote_code, dtype=dtype, device_map=device_map
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {str(path_or_id)!r}: {e}") from None


def teacher_source(teacher_dir: str | Path) -> dict:
    """Where the teacher's weights are: ``{"model": id_or_path, "revision": ...}``."""
    teacher_dir = Path(teacher_dir)
    pointer = teacher_dir / POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())
    if (teacher_dir / "config.json").is_file():
        return {"model": str(teacher_dir), "revision": None}
    raise UserError(f"{teacher_dir}: no teacher found; run `dvc repro teacher` first")


def load_teacher(teacher_dir: str | Path, cfg: TeacherConfig, device: torch.device):
    """The teacher in eval mode, frozen, in ``cfg.dtype`` on ``device``, or, with
    ``cfg.device_map: auto``, spread over every visible device (its inputs may be on any of
    them: Accelerate's hooks move them to each layer's device)."""
    src = teacher_source(teacher_dir)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_causal_lm(
        src["model"],
        revision=src.get("revision"),
        trust_remote_code=cfg.trust_remote_code,
        dtype=dtype,
        device_map=cfg.device_map,
    )
    if cfg.device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model


def teacher_identity(teacher_dir: str | Path) -> dict:
    """Id and revision of a hub teacher, or a hash of the embedded teacher's weights."""
    teacher_dir = Path(teacher_dir)
    src = teacher_source(teacher_dir)
    if (teacher_dir / POINTER).is_file():
        return {"model": src["model"], "revision": src.get("revision")}
    digest = hashlib.sha256()
    for f in sorted(teacher_dir.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return {"model": "embedded", "weights_sha256": digest.hexdigest()[:16]}


def output_vocab_size(model) -> int:
    """Rows of the LM head (may exceed the tokenizer's vocabulary: padded vocabularies)."""
    return model.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def evaluate_ce(model, sequences: np.ndarray, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over all validation tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        ids = torch.as_tensor(sequences[i : i + batch_size], dtype=torch.long, device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    return total / count
