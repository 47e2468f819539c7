"""Stage ``student``: derive the student from the teacher.

``student.kind: compressed`` (the default) replaces each MoE layer's E experts by one
shared core FFN plus low-rank per-expert wrappers fitted to the teacher's experts
(``kdsweep.compress``), so the reference's ``.*shared_core.*`` and ``.*wrapper.*`` patterns
select real parameters. ``kind: copy`` starts from the teacher's own architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdsweep.compress import compress_from_teacher, count_parameters
from kdsweep.config import Params
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.fsio import atomic_path, write_json
from kdsweep.models import evaluate_ce, load_teacher


def main(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    teacher_dir: Path = Path("models/teacher"),
    out: Path = Path("models/student_init"),
    metrics_path: Path = Path("metrics/student.json"),
) -> dict:
    """Build the student, save it with ``save_pretrained`` and report its size."""
    cfg = params.student
    data = load_prepared(prepared_dir)
    device = torch.device("cpu")  # fitting is cheap; the student moves to the GPU in distill
    teacher = load_teacher(teacher_dir, params.teacher, device).float()
    shape = dict(  # the student's shape and copies; the fitted student and its random baseline share them
        wrapper_rank=cfg.wrapper_rank,
        core_intermediate_size=cfg.core_intermediate_size,
        layers=cfg.layers,
        copy_attention=cfg.copy_attention,
        copy_embeddings=cfg.copy_embeddings,
        seed=cfg.seed,
    )
    if cfg.kind == "copy":
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_config(teacher.config)
        if cfg.init == "teacher":
            student.load_state_dict(teacher.state_dict())
        report = []
    else:
        calib = None
        if cfg.calibration_sequences:
            calib = torch.as_tensor(data.train[: cfg.calibration_sequences], dtype=torch.long)
        if not hasattr(teacher.model.layers[0].mlp, "experts"):
            raise UserError(
                "student.kind: 'compressed' needs a mixture-of-experts teacher (Qwen3-MoE style); "
                "use student.kind: copy for a dense teacher"
            )
        student, report = compress_from_teacher(teacher, init=cfg.init, calibration_input_ids=calib, **shape)
    for row in report:
        print(
            f"student: layer {row['layer']}: expert reconstruction error {row['relative_error']:.4f} "
            f"(max {row['max_relative_error']:.4f}) on {row['num_samples']} {row['inputs']} inputs"
        )
    t_count, s_count = count_parameters(teacher), count_parameters(student)
    val = data.validation[: cfg.eval_sequences]
    val_loss = {"teacher": evaluate_ce(teacher, val, 16, device), "student": evaluate_ce(student, val, 16, device)}
    if cfg.kind == "compressed" and cfg.init == "teacher":
        # The same shape, freshly initialised: how much the fit to the teacher is worth.
        baseline, _ = compress_from_teacher(teacher, init="random", **shape)
        val_loss["random_init_student"] = evaluate_ce(baseline, val, 16, device)
    print("student: validation CE " + ", ".join(f"{k} {v:.4f}" for k, v in val_loss.items()))
    metrics = {
        "teacher": t_count,
        "student": s_count,
        "val_loss": val_loss,
        "compression_ratio": round(t_count["total"] / s_count["total"], 3),
        "expert_parameter_ratio": round(s_count["expert"] / max(t_count["expert"], 1), 4),
        "reconstruction": report,
    }
    with atomic_path(out, directory=True) as tmp:
        student.save_pretrained(tmp)
    write_json(metrics_path, metrics)
    print(
        f"student: {s_count['total']:,} parameters ({s_count['active_per_token']:,} active per token), "
        f"teacher {t_count['total']:,}; expert parameters {metrics['expert_parameter_ratio']:.1%} of the teacher's"
    )
    return metrics
