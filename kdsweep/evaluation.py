"""Validation metrics of a student against its teacher (used by ``distill`` and ``evaluate``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from kdsweep.losses import LossSpec, TeacherFn, student_loss


@torch.no_grad()
def evaluate(
    student,
    batches: Iterable[dict[str, torch.Tensor]],
    teacher_fn_for: Callable[[dict[str, torch.Tensor]], TeacherFn],
    spec: LossSpec,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Validation CE, perplexity, KL to the teacher and top-1 agreement, averaged over tokens.

    ``spec.temperature`` should be 1: these metrics compare the true distributions, so
    they are comparable across trials whatever KD temperature each trained with.
    ``val_loss`` is the student's own next-token CE; it does not depend on ``alpha``
    or ``T``, which is why sweeps select on it.
    """
    was_training = student.training
    student.eval()
    ce = kl = top1 = 0.0
    tokens = 0
    for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, total=total, leave=False):
        out = student_loss(student, batch["input_ids"], teacher_fn_for(batch), spec)
        ce, kl, top1 = ce + out.ce_sum.item(), kl + out.kl_sum.item(), top1 + out.top1_matches.item()
        tokens += out.num_tokens
    student.train(was_training)
    val_loss = ce / max(tokens, 1)
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50)),
        "val_kl": kl / max(tokens, 1),
        "val_top1_agreement": top1 / max(tokens, 1),
        "val_tokens": tokens,
    }
