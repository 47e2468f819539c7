"""Validation metrics of a student against its teacher (used by ``distill`` and ``evaluate``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from tqdm import tqdm

from kdsweep.losses import LossOutput, LossSpec, TeacherFn, student_loss


@torch.no_grad()
def evaluate(
    student,
    batches: Iterable[dict[str, torch.Tensor]],
    teacher_fn_for: Callable[[dict[str, torch.Tensor]], TeacherFn],
    spec: LossSpec,
    progress: bool = False,
    total: int | None = None,
    forward: Callable[[torch.Tensor, TeacherFn, LossSpec], LossOutput] | None = None,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Validation CE, perplexity, KL to the teacher and top-1 agreement, averaged over tokens.

    ``spec.temperature`` should be 1: these metrics compare the true distributions, so
    they are comparable across trials whatever KD temperature each trained with.
    ``val_loss`` is the student's own next-token CE; it does not depend on ``alpha``
    or ``T``, which is why sweeps select on it.

    Args:
        forward: ``forward(input_ids, teacher_fn, spec)``, the student's loss (a wrapped
            :class:`kdsweep.distributed.LossForward` on several ranks); default
            :func:`kdsweep.losses.student_loss` on ``student``.
        reduce: sums the token-summed metrics over the ranks, when each rank evaluated its part
            of every batch (a batch's ``weight`` 0 marks a rank's stand-in part, not counted).
    """
    forward = forward or partial(student_loss, student)
    was_training = student.training
    student.eval()
    ce = kl = top1 = 0.0
    tokens = 0
    for batch in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, total=total, leave=False):
        out = forward(batch["input_ids"], teacher_fn_for(batch), spec)
        if "weight" in batch and not float(batch["weight"]):
            continue
        ce, kl, top1 = ce + out.ce_sum.item(), kl + out.kl_sum.item(), top1 + out.top1_matches.item()
        tokens += out.num_tokens
    student.train(was_training)
    if reduce is not None:
        ce, kl, top1, tokens = reduce([ce, kl, top1, tokens])
        tokens = int(tokens)
    val_loss = ce / max(tokens, 1)
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50)),
        "val_kl": kl / max(tokens, 1),
        "val_top1_agreement": top1 / max(tokens, 1),
        "val_tokens": tokens,
    }
