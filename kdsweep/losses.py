r"""Knowledge-distillation losses over a cached or live teacher, computed in chunks of tokens.

The loss, for real (non-padding) target tokens n = 1..N of the whole accumulated batch::

    total = (1 - alpha) * CE + alpha * T^2 * KL

    CE = (1/N) sum_n  -log q_1(y_n | x_<n)                       (student, temperature 1)
    KL = (1/N) sum_n  KL( p_T(. | x_<n) || q_T(. | x_<n) )         (forward, the default)

where p_T = softmax(teacher_logits / T), q_T = softmax(student_logits / T), ``alpha`` weighs
the KD term and T is the *KD* temperature (it never means a sampling temperature here).
The T^2 factor (Hinton et al., 2015) keeps the KD gradient's scale independent of T;
``scale_by_t2=False`` drops it. ``kl_reduction: batchmean`` means exactly the (1/N) above:
KL summed over the vocabulary, averaged over real target tokens. ``F.kl_div(...,
reduction="batchmean")`` on a (B, T, V) tensor divides by B only, so it is not used.

Modes (how p_T is represented):

* ``topk_tail``: k + 1 buckets, the teacher's top-k tokens plus one tail bucket holding the
  remaining mass, on both sides. Exact for the teacher values it is given (the cache stores
  the full-vocabulary normaliser; its own precision is stated in ``kdsweep.cache``), and
  equal to the dense KL when k = V. Teacher ids the student's vocabulary lacks count in the
  tail bucket.
* ``topk_renorm``: the teacher renormalised over its top-k (common practice, biased: see
  Anshumann et al., 2025, "Sparse Logit Sampling"). Forward: the student is not
  renormalised; reverse: both sides are, so the KL stays non-negative.
* ``dense``: the full vocabulary (needs a live teacher).

``direction: reverse`` swaps the arguments: KL(q_T || p_T) over the same buckets.

Memory: the student's logits are never materialised for the whole batch. The LM head and
the loss run on ``chunk_size`` tokens at a time under activation checkpointing, so the
backward pass recomputes one chunk's logits at a time. Peak extra memory is
O(chunk_size x V), independent of batch x sequence length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# A finite stand-in for log(0): keeps gradients finite where a bucket is empty.
_LOG_ZERO = -1e30


@dataclass(frozen=True)
class LossSpec:
    """The knobs of :func:`distillation_loss` (see the module docstring for the formula)."""

    alpha: float
    temperature: float
    mode: str = "topk_tail"  # topk_tail | topk_renorm | dense
    direction: str = "forward"  # forward | reverse
    scale_by_t2: bool = True
    chunk_size: int = 1024


@dataclass
class SparseTeacher:
    """Teacher log-probabilities at temperature T of its top-k tokens, for C positions.

    Attributes:
        ids: (C, k) int64 token ids.
        log_probs: (C, k) float32 log p_T(id); ``-inf`` marks an id the student's
            vocabulary lacks (its mass then counts in the tail bucket).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor


TeacherChunk = SparseTeacher | torch.Tensor  # or (C, V_teacher) dense logits
TeacherFn = Callable[[int, int], TeacherChunk]


@dataclass
class LossOutput:
    """Sums over the chunk's (or batch's) real tokens; divide by a token count to average."""

    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    top1_matches: torch.Tensor
    num_tokens: int

    def total(self, spec: LossSpec, normalizer: int) -> torch.Tensor:
        """``((1 - alpha) * CE_sum + alpha * T^2 * KL_sum) / normalizer``."""
        t2 = spec.temperature**2 if spec.scale_by_t2 else 1.0
        return ((1 - spec.alpha) * self.ce_sum + spec.alpha * t2 * self.kl_sum) / max(normalizer, 1)


def sparse_teacher_from_logits(logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
    """Exact top-k log-probabilities at ``temperature`` from full teacher logits (C, V)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    return SparseTeacher(ids, lp)


def restrict_to_vocab(teacher: SparseTeacher, vocab_size: int) -> SparseTeacher:
    """Mark ids the student cannot produce (>= its vocabulary) so their mass moves to the tail."""
    valid = teacher.ids < vocab_size
    if bool(valid.all()):
        return teacher
    return SparseTeacher(teacher.ids.clamp(max=vocab_size - 1),
                         teacher.log_probs.masked_fill(~valid, float("-inf")))


def _tail(full_log_probs: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
    """Log-mass outside the (valid) top-k ids of a full distribution (C, V), by masking them.

    Returns the tail log-mass (C,) and whether the ids cover the whole vocabulary (C,).
    """
    mask = torch.zeros_like(full_log_probs).scatter_add_(-1, ids, valid.to(full_log_probs.dtype)) > 0
    masked = full_log_probs.masked_fill(mask, _LOG_ZERO)
    return torch.logsumexp(masked, dim=-1), mask.all(-1)


def kl_per_token(student_logits: torch.Tensor, teacher: TeacherChunk, temperature: float, mode: str,
                 direction: str) -> torch.Tensor:
    """KL between teacher and student at ``temperature`` for each of C positions.

    Args:
        student_logits: (C, V) float32.
        teacher: :class:`SparseTeacher` for the top-k modes, or (C, V_t) logits for ``dense``.
    Returns:
        (C,) KL values (nats).
    """
    lq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if mode == "dense":
        if not torch.is_tensor(teacher):
            raise ValueError("loss mode 'dense' needs full teacher logits (a live teacher)")
        lp = torch.log_softmax(teacher[:, : lq.shape[-1]].float() / temperature, dim=-1)
        if direction == "forward":
            return (lp.exp() * (lp - lq)).sum(-1)
        return (lq.exp() * (lq - lp)).sum(-1)

    if torch.is_tensor(teacher):
        raise ValueError(f"loss mode {mode!r} needs a SparseTeacher")
    teacher = restrict_to_vocab(teacher, lq.shape[-1])
    lp_k = teacher.log_probs.float()
    valid = torch.isfinite(lp_k)
    lp_k_safe = lp_k.masked_fill(~valid, _LOG_ZERO)
    lq_k = lq.gather(-1, teacher.ids)

    if mode == "topk_renorm":
        lp_hat = lp_k_safe - torch.logsumexp(lp_k_safe, -1, keepdim=True)
        if direction == "forward":
            return (lp_hat.exp() * (lp_hat - lq_k)).sum(-1)
        lq_k_safe = lq_k.masked_fill(~valid, _LOG_ZERO)
        lq_hat = lq_k_safe - torch.logsumexp(lq_k_safe, -1, keepdim=True)
        return (lq_hat.exp() * (lq_hat - lp_hat)).sum(-1)

    if mode != "topk_tail":
        raise ValueError(f"unknown loss mode {mode!r}")
    p_k = lp_k_safe.exp()
    lq_tail, covered = _tail(lq, teacher.ids, valid)
    # Where the top-k covers the student's whole vocabulary the student has no tail bucket:
    # the teacher is then conditioned on the student's vocabulary (renormalised over the
    # valid ids, as `dense` does), which also drops rounding slivers of tail mass.
    norm = torch.where(covered, p_k.sum(-1), torch.ones_like(p_k[..., 0]))
    p_k = p_k / norm.unsqueeze(-1)
    lp_k_safe = lp_k_safe - torch.log(norm).unsqueeze(-1)
    p_tail = (1 - p_k.sum(-1)).clamp(min=0).masked_fill(covered, 0)
    if direction == "forward":
        top = torch.xlogy(p_k, p_k) - p_k * lq_k.masked_fill(~valid, 0)
        tail = torch.xlogy(p_tail, p_tail) - p_tail * lq_tail
        return top.sum(-1) + tail
    q_k = lq_k.exp() * valid
    lp_tail = torch.log(p_tail.clamp(min=1e-20))  # reverse KL is infinite where the teacher has no mass
    top = q_k * (lq_k - lp_k_safe)
    q_tail = lq_tail.exp()
    return top.sum(-1) + q_tail * (lq_tail - lp_tail)


def teacher_top1(teacher: TeacherChunk) -> torch.Tensor:
    """(C,) the teacher's most likely token at each position."""
    if torch.is_tensor(teacher):
        return teacher.argmax(-1)
    return teacher.ids.gather(-1, teacher.log_probs.argmax(-1, keepdim=True)).squeeze(-1)


def loss_sums(student_logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherChunk, spec: LossSpec,
              temperature: float | None = None) -> LossOutput:
    """CE and KL *sums* over the real targets of one chunk.

    Args:
        student_logits: (C, V).
        targets: (C,) next-token ids, ``-100`` for positions that do not count.
        teacher: the teacher at the same C positions.
    """
    t = spec.temperature if temperature is None else temperature
    real = targets != IGNORE_INDEX
    ce = F.cross_entropy(student_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    kl = (kl_per_token(student_logits, teacher, t, spec.mode, spec.direction) * real).sum()
    with torch.no_grad():
        top1 = ((student_logits.argmax(-1) == teacher_top1(teacher)) & real).sum().float()
    return LossOutput(ce, kl, top1, int(real.sum()))


def distillation_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                      teacher_fn: TeacherFn, spec: LossSpec) -> LossOutput:
    """CE and KL sums for N positions, computing the LM head and the loss per chunk.

    Args:
        hidden: (N, H) the student's final hidden states (after the final norm).
        head_weight: (V, H) the student's LM-head weight (no bias, as in Qwen/Llama).
        targets: (N,) next-token ids, ``-100`` where no loss is taken.
        teacher_fn: ``teacher_fn(start, end)`` returns the teacher for positions
            [start, end). It runs inside the checkpointed chunk, so a live teacher's
            (C, V) logits are recomputed in backward instead of being kept.
        spec: alpha, temperature, mode, direction, chunk size.
    Returns:
        Sums over the real targets; ``out.total(spec, normalizer)`` is the loss, with
        ``normalizer`` the real-token count of the *whole accumulated batch*.
    """
    n = hidden.shape[0]
    ce = hidden.new_zeros((), dtype=torch.float32)
    kl = hidden.new_zeros((), dtype=torch.float32)
    top1 = hidden.new_zeros((), dtype=torch.float32)
    tokens = 0
    for start in range(0, n, spec.chunk_size):
        end = min(n, start + spec.chunk_size)
        tgt = targets[start:end]
        if not bool((tgt != IGNORE_INDEX).any()):
            continue

        def chunk(h: torch.Tensor, start: int = start, end: int = end, tgt: torch.Tensor = tgt):
            out = loss_sums(h @ head_weight.t(), tgt, teacher_fn(start, end), spec)
            return out.ce_sum, out.kl_sum, out.top1_matches

        h = hidden[start:end]
        if torch.is_grad_enabled() and h.requires_grad:
            c, k, t = checkpoint(chunk, h, use_reentrant=False)
        else:
            c, k, t = chunk(h)
        ce, kl, top1 = ce + c, kl + k, top1 + t
        tokens += int((tgt != IGNORE_INDEX).sum())
    return LossOutput(ce, kl, top1, tokens)
