"""The teacher side of a batch, cached or live, as a ``teacher_fn(start, end)`` for the loss,
and the validation batches (with their cached teacher arrays) that ``distill`` and ``evaluate`` read.

Both sources use the same positions as the student: position t of a sequence predicts
token t + 1, and only positions 0..L-2 (those with a next token) are used, flattened to
(N = B * (L - 1),).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from kdsweep.cache.format import log_normalizer
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.losses import (
    SparseTeacher,
    TeacherFn,
    sampled_teacher,
    self_normalized_teacher,
    sparse_teacher_from_logits,
)


def batch_to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """numpy arrays from the data loader -> tensors on ``device`` (ids as int64)."""
    out = {}
    for key, arr in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if key in ("input_ids", "topk_ids"):
            t = t.long()
        out[key] = t.to(device, non_blocking=True)
    return out


def validation_batches(
    sequences: np.ndarray,
    cache: TeacherLogitCache | None,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    part: Callable[[np.ndarray], tuple[np.ndarray, float]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The validation split in order, ``batch_size`` sequences a batch (at most ``max_batches``),
    with the cached teacher arrays when there is a cache, as tensors on ``device``. ``part``
    (several ranks: :func:`kdsweep.distributed.part`) cuts each batch's indices to this rank's
    part and its ``weight``."""
    n = math.ceil(len(sequences) / batch_size)
    for b in range(n if max_batches is None else min(n, max_batches)):
        idx = np.arange(b * batch_size, min(len(sequences), (b + 1) * batch_size))
        idx, weight = part(idx) if part is not None else (idx, 1.0)
        batch = cache.read(idx) if cache is not None else {}
        batch["input_ids"] = sequences[idx]
        batch["weight"] = np.float32(weight)
        yield batch_to_tensors(batch, device)


def cached_teacher_fn(batch: dict[str, torch.Tensor], betas, temperature: float) -> TeacherFn:
    """Teacher top-k log-probabilities at ``temperature`` from cached arrays (B, L, ...).

    ``log p_i = s_i / T - f(1/T)`` with s the stored shifted logits and f the interpolated
    full-vocabulary log-normaliser. f is floored at the top-k's own logsumexp so the top-k
    mass never exceeds 1 (interpolation error can only shrink the tail, never invert it).

    A sampled cache's batch (it has ``sample_counts``) gives a
    :class:`~kdsweep.losses.SampledTeacher`: the same log-probabilities at the sampled ids, and
    importance weights against the proposal temperature the batch carries (``sample_temperature``).
    A self-normalised sampled cache's batch (it has ``sample_log_probs``, log q_tau, and no
    normaliser) gives the self-normalised weights at any ``temperature``; ``betas`` is unused then.
    """
    k = batch["topk_ids"].shape[-1]
    ids = batch["topk_ids"][:, :-1].reshape(-1, k)
    if "sample_log_probs" in batch:
        proposal = float(batch["sample_temperature"].reshape(-1)[0])
        counts = batch["sample_counts"][:, :-1].reshape(-1, k)
        log_q = batch["sample_log_probs"][:, :-1].reshape(-1, k)
        teacher = self_normalized_teacher(ids, counts, log_q, proposal / temperature)
        return lambda a, b: type(teacher)(ids[a:b], teacher.log_probs[a:b], teacher.weights[a:b])
    log_probs = _cached_log_probs(batch, betas, temperature)
    if "sample_counts" not in batch:
        return lambda a, b: SparseTeacher(ids[a:b], log_probs[a:b])
    proposal = float(batch["sample_temperature"].reshape(-1)[0])
    proposal_log_probs = log_probs if proposal == temperature else _cached_log_probs(batch, betas, proposal)
    counts = batch["sample_counts"][:, :-1].reshape(-1, k)
    teacher = sampled_teacher(ids, counts, log_probs, proposal_log_probs)
    return lambda a, b: type(teacher)(ids[a:b], teacher.log_probs[a:b], teacher.weights[a:b])


def _cached_log_probs(batch: dict[str, torch.Tensor], betas, temperature: float) -> torch.Tensor:
    """(N, k) log p_T at the cached ids of positions 0..L-2 (see :func:`cached_teacher_fn`)."""
    k = batch["topk_ids"].shape[-1]
    s = batch["topk_logits"][:, :-1].reshape(-1, k).float() / temperature
    lse = log_normalizer(
        batch["log_normalizer"][:, :-1], batch["log_normalizer_slope"][:, :-1], betas, 1.0 / temperature
    ).reshape(-1)
    lse = torch.maximum(lse, torch.logsumexp(s, dim=-1))
    return s - lse.unsqueeze(-1)


@torch.no_grad()
def live_teacher_fn(
    teacher, input_ids: torch.Tensor, temperature: float, mode: str, top_k: int, vocab_size: int
) -> TeacherFn:
    """Run the teacher's decoder once (eval, no_grad, its own dtype); the LM head runs per
    chunk inside ``teacher_fn`` so no (B, L, V) teacher tensor exists. The chunk's logits
    are upcast to float32 before the loss."""
    hidden = teacher.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    head = teacher.get_output_embeddings()

    @torch.no_grad()
    def teacher_fn(a: int, b: int):
        # .to: a teacher spread over devices (teacher.device_map: auto) leaves its logits on the head's
        logits = head(hidden[a:b])[:, :vocab_size].float().to(input_ids.device)
        if mode == "dense":
            return logits
        return sparse_teacher_from_logits(logits, top_k, temperature)

    return teacher_fn
