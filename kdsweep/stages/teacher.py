"""Stage ``teacher``: point at a hub/local teacher, or train the embedded one.

With ``teacher.model`` set nothing is trained: ``models/teacher/teacher.json`` records the
id and revision the later stages load. With ``teacher.model: null`` a small Qwen3-MoE is
trained on the prepared corpus for ``teacher.train.max_steps`` steps (bounded so the
embedded default finishes in about a minute on two CPU cores) and saved with
``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdsweep.config import Params
from kdsweep.data import load_prepared
from kdsweep.fsio import atomic_path, write_json
from kdsweep.models import POINTER, default_device, embedded_teacher_config, evaluate_ce
from kdsweep.schedule import lr_factor


def main(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    out: Path = Path("models/teacher"),
    metrics_path: Path = Path("metrics/teacher.json"),
) -> dict:
    """Write the teacher (or a pointer to it) to ``out`` and its training metrics."""
    cfg = params.teacher
    with atomic_path(out, directory=True) as tmp:
        if cfg.model:
            (tmp / POINTER).write_text(json.dumps({"model": cfg.model, "revision": cfg.revision}, indent=2))
            metrics = {"source": cfg.model}
        else:
            metrics = train_embedded(params, prepared_dir, tmp)
    write_json(metrics_path, metrics)
    return metrics


def train_embedded(params: Params, prepared_dir: Path, out: Path) -> dict:
    """Train the embedded Qwen3-MoE teacher with plain next-token cross-entropy."""
    from transformers import Qwen3MoeForCausalLM

    cfg, tr = params.teacher, params.teacher.train
    data = load_prepared(prepared_dir)
    torch.manual_seed(tr.seed)
    device = default_device()
    config = embedded_teacher_config(
        cfg.arch, data.meta["tokenizer"]["vocab_size"], data.train.shape[1], data.meta["eos_token_id"]
    )
    model = Qwen3MoeForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.learning_rate, betas=(0.9, 0.95), weight_decay=tr.weight_decay)
    rng = np.random.default_rng(tr.seed)
    order = np.concatenate(
        [rng.permutation(len(data.train)) for _ in range(math.ceil(tr.max_steps * tr.batch_size / len(data.train)) + 1)]
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: training a {n_params / 1e6:.1f}M-parameter Qwen3-MoE for {tr.max_steps} steps on {device}")
    start, losses = time.perf_counter(), []
    bar = tqdm(range(tr.max_steps), desc="teacher", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = tr.learning_rate * lr_factor(
                step, warmup_steps=tr.warmup_steps, total_steps=tr.max_steps, kind="cosine", min_ratio=0.1
            )
        idx = np.sort(order[step * tr.batch_size : (step + 1) * tr.batch_size])
        ids = torch.as_tensor(data.train[idx], dtype=torch.long, device=device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    val_loss = evaluate_ce(model, data.validation, tr.batch_size, device)
    model.save_pretrained(out)
    return {
        "parameters": n_params,
        "train_loss_final": float(np.mean(losses[-10:])),
        "val_loss": val_loss,
        "steps": tr.max_steps,
        "seconds": round(time.perf_counter() - start, 1),
    }
