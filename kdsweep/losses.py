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

Directions (what "KL" is), over the same buckets:

* ``forward``: KL(p_T || q_T), mass-covering (the default);
* ``reverse``: KL(q_T || p_T), mode-seeking;
* ``jsd``: the generalised Jensen-Shannon divergence with weight ``beta`` (Agarwal et al.,
  2024, "On-policy distillation", GKD), ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with
  ``m = beta * p + (1 - beta) * q``; beta = 0.5 is the symmetric JSD. It is bounded by
  log 2 and vanishes (with its gradient) as beta goes to 0 or 1, so beta is kept inside (0, 1).

Modes (how p_T is represented):

* ``topk_tail``: k + 1 buckets, the teacher's top-k tokens plus one tail bucket holding the
  remaining mass, on both sides. Exact for the teacher values it is given (the cache stores
  the full-vocabulary normaliser; its own precision is stated in ``kdsweep.cache``), and
  equal to the dense loss when k = V. Teacher ids the student's vocabulary lacks count in the
  tail bucket.
* ``topk_renorm``: the teacher renormalised over its top-k (common practice, biased: see
  Anshumann et al., 2025, "Sparse Logit Sampling"). Forward: the student is not
  renormalised; reverse and jsd: both sides are, so the divergence stays non-negative.
* ``dense``: the full vocabulary (needs a live teacher).
* ``sampled``: random-sampling KD (Anshumann et al., 2025), forward direction only. The cache
  drew N tokens v_1..v_N at each position from the teacher at the *proposal* temperature tau
  (``teacher.sample_temperature``, a sampling temperature), q_tau = softmax(z / tau), and kept
  the unique ids u with counts c_u. With the KD temperature T and importance weights::

      w_u   = (c_u / N) * p_T(u) / q_tau(u)                 (= c_u / N when T = tau)
      KL^   = sum_u w_u * (log p_T(u) - log q_T(u))           (q_T: the student, as above)

  E[w_u] = p_T(u) for every token, so E[KL^] = KL(p_T || q_T) and E[grad KL^] = grad KL: the
  estimate and its gradient are unbiased (no renormalisation, which would bias them). The
  gradient with respect to the student's logits is (sum_u w_u * q_T - w) / T. Per position,
  Var[KL^] = (1/N) Var_{v ~ q_tau}[(p_T(v) / q_tau(v)) (log p_T(v) - log q_T(v))], so the
  error of the mean over M positions or draws shrinks as 1 / sqrt(N M) (tests/test_sampled.py).
  p_T and q_tau at the kept ids come from the cache exactly as in ``topk_tail``.

  A self-normalised sampled cache (``teacher.sample_weights: self_normalized``) stores log q_tau
  at the kept ids and no normaliser, so p_T is known only up to Z_T = sum_v q_tau(v)^(tau/T)
  (log p_T = (tau/T) log q_tau - log Z_T). Z_T is estimated from the same draws (unbiased for
  Z_T) and the weights are normalised by it, so they sum to 1::

      Z^_T  = sum_u (c_u / N) * q_tau(u)^(tau/T - 1)
      log p^_T(u) = (tau/T) log q_tau(u) - log Z^_T
      w_u   = (c_u / N) * p^_T(u) / q_tau(u)  =  c_u q_tau(u)^(tau/T - 1) / sum_u' c_u' q_tau(u')^(tau/T - 1)

  At T = tau, Z^ = 1 and w_u = c_u / N exactly. At T != tau the weights (and KL^) are biased,
  O(1/N), and consistent as N grows (a ratio of two unbiased means); the gradient depends on w alone.

Position selection (``kd_fraction`` f < 1; Tavor et al., 2026, "Rethinking Selective Knowledge
Distillation", SE-KD): the KD term covers only the positions where the student is most
uncertain, CE still covers every real position. In each sequence with n real targets the
ceil(f * n) positions of highest student entropy H_n = -sum_v q_1(v) log q_1(v) are selected
(the student's own logits, detached, at temperature 1: its actual predictive uncertainty, so the
choice does not move when T is tuned, and the same score the initial student gives a cache
before T is known). With S the selected set of the whole accumulated batch::

    total = (1 - alpha) * CE + alpha * T^2 * (1/|S|) sum_{n in S} KL_n

so ``batchmean`` averages the KD term over the *selected* positions. One
``weighted_sum / N`` carries both terms: the KD sum is scaled by ``kd_scale = N / |S|``
(:func:`kd_position_count` gives |S| from the sequences' lengths before any forward pass).
Selecting per sequence makes the choice independent of micro-batch size, gradient accumulation
and the number of ranks. f = 1 (the default) selects every real position and skips the entropy.

Memory and time: the student's logits are never materialised for the whole batch. The LM
head and the loss run on ``chunk_size`` tokens at a time, and each chunk's gradient with
respect to its logits is taken right there, in the forward pass (analytically for the
(C, V) part, see :func:`chunk_loss_and_grad`), and turned into gradients of the hidden
states and the head weight (as Liger-Kernel's fused linear losses do). So backward needs no
recomputation (three head matmuls, as the naive path), and peak extra memory is about four
(chunk_size, V) float32 buffers plus one head-weight gradient, independent of batch x
sequence (``bench/loss.py``: 6% of the naive path's at V = 151,936, chunk 256). With f < 1 a first
pass over the chunks (no gradient) takes the student's entropies: one head matmul more per chunk.
:func:`loss_sums` is the same loss written for plain autograd (the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# A finite stand-in for log(0): keeps products 0 * log(0) at 0 and gradients finite.
_LOG_ZERO = -1e30
# Floor of the teacher's tail mass in log space: reverse KL is infinite where the teacher
# has no mass but the student has some; this keeps it finite (and large).
_TINY = 1e-20


@dataclass(frozen=True)
class LossSpec:
    """The knobs of :func:`distillation_loss` (see the module docstring for the formula)."""

    alpha: float
    temperature: float
    mode: str = "topk_tail"  # topk_tail | topk_renorm | dense | sampled
    direction: str = "forward"  # forward | reverse | jsd
    scale_by_t2: bool = True
    chunk_size: int = 1024
    jsd_beta: float = 0.5
    kd_fraction: float = 1.0  # share f of each sequence's real positions the KD term covers
    kd_scale: float = 1.0  # N / |S| of the accumulated batch (1 when f = 1)

    @property
    def ce_weight(self) -> float:
        return 1.0 - self.alpha

    @property
    def kl_weight(self) -> float:
        """``alpha * T^2 * kd_scale`` (``alpha * kd_scale`` without the T^2 convention)."""
        return self.alpha * (self.temperature**2 if self.scale_by_t2 else 1.0) * self.kd_scale


def kd_position_count(real_positions: int, fraction: float) -> int:
    """How many of a sequence's ``real_positions`` the KD term covers: ceil(f * n), 0 only if n = 0.

    The 1e-9 keeps products like 0.3 * 10 = 3.0000000000000004 from rounding up.
    """
    return math.ceil(real_positions * fraction - 1e-9)


def student_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(C,) entropy in nats of softmax(logits) at temperature 1, from (C, V) logits (no gradient)."""
    with torch.no_grad():
        lp = torch.log_softmax(logits.float(), dim=-1)
        return -(lp.exp() * lp).sum(-1)


def select_kd_positions(entropy: torch.Tensor, real: torch.Tensor, fraction: float) -> torch.Tensor:
    """The KD positions: in each row (a sequence), the ceil(f * n) real positions of highest entropy.

    Args:
        entropy: (S, L) the student's entropy at each position.
        real: (S, L) bool, positions with a target (n = real.sum(-1) per row).
        fraction: f in (0, 1].
    Returns:
        (S, L) bool mask, a subset of ``real``; ties go to the earlier position.
    """
    counts = torch.tensor([kd_position_count(int(n), fraction) for n in real.sum(-1)], device=real.device)
    order = entropy.masked_fill(~real, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return (rank < counts.unsqueeze(-1)) & real


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


@dataclass
class SampledTeacher(SparseTeacher):
    """A sampled teacher (loss mode ``sampled``): the unique sampled ids of C positions.

    Attributes:
        ids: (C, W) int64 token ids (padding slots repeat an id).
        log_probs: (C, W) float32 log p_T(id), ``-inf`` in padding slots.
        weights: (C, W) float32 importance weights w (see the module docstring), 0 in padding slots.
    As a :class:`SparseTeacher` (the ``topk_tail`` buckets: the kept ids plus the rest) it is exact.
    """

    weights: torch.Tensor


def sampled_teacher(
    ids: torch.Tensor, counts: torch.Tensor, log_probs: torch.Tensor, proposal_log_probs: torch.Tensor
) -> SampledTeacher:
    """The importance-weighted sampled teacher from what a sampled cache stores.

    Args:
        ids: (C, W) sampled ids; counts: (C, W) draws of each, 0 in padding slots.
        log_probs: (C, W) log p_T at the KD temperature; proposal_log_probs: (C, W) log q_tau at
            the proposal temperature (equal tensors when T = tau, giving weights c / N exactly).
    Returns:
        ``w = (c / N) * exp(log p_T - log q_tau)``, N the row's draw count.
    """
    c = counts.to(log_probs.dtype)
    valid = c > 0
    ratio = torch.exp((log_probs - proposal_log_probs).masked_fill(~valid, 0))
    weights = c / c.sum(-1, keepdim=True).clamp(min=1) * ratio
    return SampledTeacher(ids, log_probs.masked_fill(~valid, float("-inf")), weights.masked_fill(~valid, 0))


def self_normalized_teacher(
    ids: torch.Tensor, counts: torch.Tensor, proposal_log_probs: torch.Tensor, ratio: float
) -> SampledTeacher:
    """The self-normalised sampled teacher at KD temperature T from log q_tau alone (module docstring).

    Args:
        ids: (C, W) sampled ids; counts: (C, W) draws of each, 0 in padding slots.
        proposal_log_probs: (C, W) log q_tau at the ids (any value in padding slots).
        ratio: tau / T, the proposal temperature over the KD temperature.
    Returns:
        log_probs ``(tau/T) log q_tau - log Z^_T`` and weights ``(c/N) exp(log p^_T - log q_tau)``,
        which sum to 1 per position (``c / N`` at tau / T = 1).
    """
    lq = proposal_log_probs.float()
    if ratio == 1.0:  # Z^_T = 1: the weights are c / N exactly, not up to a logsumexp's rounding
        return sampled_teacher(ids, counts, lq, lq)
    c = counts.to(lq.dtype)
    valid = c > 0
    share = c / c.sum(-1, keepdim=True).clamp(min=1)
    terms = (share.clamp(min=1e-30).log() + (ratio - 1) * lq).masked_fill(~valid, float("-inf"))
    log_z = torch.logsumexp(terms, dim=-1, keepdim=True)
    return sampled_teacher(ids, counts, ratio * lq - log_z, lq)


def sampled_divergence(lq: torch.Tensor, teacher: SampledTeacher) -> torch.Tensor:
    """The per-position estimate KL^ = sum_u w_u (log p_T(u) - log q_T(u)) (module docstring).

    Args:
        lq: (C, V) student log-probabilities at the KD temperature.
    Returns:
        (C,) estimates (nats); ids beyond the student's vocabulary carry no weight.
    """
    valid = (teacher.weights > 0) & (teacher.ids < lq.shape[-1])
    ids = teacher.ids.clamp(max=lq.shape[-1] - 1)
    terms = teacher.weights * (teacher.log_probs.float() - lq.gather(-1, ids))
    return terms.masked_fill(~valid, 0).sum(-1)


def _ce_and_top1(z: torch.Tensor, targets: torch.Tensor, teacher: TeacherChunk):
    """What every closed-form chunk loss starts with: the real targets, their ids (C, 1), the
    log-normaliser of the raw logits (C, 1), the CE sum and the top-1 matches with the teacher."""
    real = targets != IGNORE_INDEX
    y = targets.clamp(min=0).unsqueeze(-1)
    with torch.no_grad():
        lse1 = torch.logsumexp(z, -1, keepdim=True)
        ce = ((lse1 - z.gather(-1, y)).squeeze(-1) * real).sum()
        top1 = ((z.argmax(-1) == teacher_top1(teacher)) & real).sum()
    return real, y, lse1, ce, top1


def sampled_chunk_loss_and_grad(
    z: torch.Tensor,
    targets: torch.Tensor,
    teacher: SampledTeacher,
    spec: LossSpec,
    need_grad: bool,
    kd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`chunk_loss_and_grad` is for the other modes, for loss mode ``sampled`` (the gradient in closed form).

    d(KL^)/dz = (W q_T - w) / T with W = sum_u w_u, w scattered onto the sampled ids;
    dCE/dz = softmax(z) - onehot(y). ``z`` (C, V) float32 is **overwritten**; ``kd`` as there.
    """
    if spec.direction != "forward":
        raise ValueError("loss mode 'sampled' estimates the forward KL only")
    t, vocab = spec.temperature, z.shape[-1]
    real, y, lse1, ce, top1 = _ce_and_top1(z, targets, teacher)
    kd = real if kd is None else kd
    with torch.no_grad():
        lq = (z / t).log_softmax(-1)
        kl = sampled_divergence(lq, teacher).masked_fill(~kd, 0).sum()
        sums = torch.stack([spec.ce_weight * ce + spec.kl_weight * kl, ce, kl, top1, real.sum()]).double()
        if not need_grad:
            return sums, None
        w = teacher.weights.float().masked_fill(~kd.unsqueeze(-1) | (teacher.ids >= vocab), 0)
        grad = lq.exp_().mul_(w.sum(-1, keepdim=True))
        grad.scatter_add_(-1, teacher.ids.clamp(max=vocab - 1), -w).mul_(spec.kl_weight / t)
        coef = (spec.ce_weight * real).to(grad.dtype).unsqueeze(-1)
        grad.addcmul_(z.sub_(lse1).exp_(), coef)
        grad.scatter_add_(-1, y, -coef)
    return sums, grad


TeacherChunk = SparseTeacher | torch.Tensor  # or (C, V_teacher) dense logits
TeacherFn = Callable[[int, int], TeacherChunk]


@dataclass
class LossOutput:
    """Sums over the real tokens of a chunk or batch; divide by a token count to average.

    ``weighted_sum = (1 - alpha) * ce_sum + alpha * T^2 * kd_scale * kl_sum`` carries the
    gradient; from :func:`distillation_loss` the other sums are detached (they are for logging).
    ``kl_sum`` covers the ``kd_tokens`` selected positions (all ``num_tokens`` when f = 1).
    """

    weighted_sum: torch.Tensor
    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    top1_matches: torch.Tensor
    num_tokens: int
    kd_tokens: int

    def total(self, normalizer: int) -> torch.Tensor:
        """The loss: ``weighted_sum / normalizer``, with ``normalizer`` the real-token count
        of the *whole accumulated batch* (``batchmean``)."""
        return self.weighted_sum / max(normalizer, 1)


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
    return SparseTeacher(teacher.ids.clamp(max=vocab_size - 1), teacher.log_probs.masked_fill(~valid, float("-inf")))


def divergence(lp: torch.Tensor, lq: torch.Tensor, direction: str, jsd_beta: float = 0.5) -> torch.Tensor:
    """Divergence between two distributions over the same buckets, per row.

    Args:
        lp: (C, K) teacher log-probabilities; ``_LOG_ZERO`` (not -inf) for an empty bucket.
        lq: (C, K) student log-probabilities, same convention.
        direction: ``forward`` KL(p||q), ``reverse`` KL(q||p) or ``jsd`` (weight ``jsd_beta``).
    Returns:
        (C,) divergences in nats.
    """
    if direction == "forward":
        return (lp.exp() * (lp - lq)).sum(-1)
    if direction == "reverse":
        return (lq.exp() * (lq - lp)).sum(-1)
    if direction == "jsd":
        lm = torch.logaddexp(lp + math.log(jsd_beta), lq + math.log1p(-jsd_beta))
        return jsd_beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - jsd_beta) * (lq.exp() * (lq - lm)).sum(-1)
    raise ValueError(f"unknown loss direction {direction!r}")


def _tail(lq: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
    """Log-mass of a full distribution (C, V) outside the (valid) top-k ids, by masking them.

    Returns the tail log-mass (C,) and whether the ids cover the whole vocabulary (C,).
    """
    # uint8 counts: valid top-k ids are distinct, so no count exceeds 1.
    mask = torch.zeros(lq.shape, dtype=torch.uint8, device=lq.device).scatter_add_(-1, ids, valid.to(torch.uint8)) > 0
    return torch.logsumexp(lq.masked_fill(mask, _LOG_ZERO), dim=-1), mask.all(-1)


def sparse_divergence(
    lp_k: torch.Tensor,
    lq_k: torch.Tensor,
    lq_tail: torch.Tensor,
    covered: torch.Tensor,
    mode: str,
    direction: str,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """The top-k modes' divergence per position, from bucket log-probabilities only.

    Args:
        lp_k: (C, k) teacher log-probabilities of its top-k ids, ``_LOG_ZERO`` at ids the
            student lacks.
        lq_k: (C, k) student log-probabilities (at temperature T) of the same ids, same convention.
        lq_tail: (C,) student log-mass outside the valid ids (``_LOG_ZERO`` where ``covered``).
        covered: (C,) the valid ids cover the student's whole vocabulary.
    Returns:
        (C,) divergences (nats).
    """
    if mode == "topk_renorm":
        lp_hat = lp_k - torch.logsumexp(lp_k, -1, keepdim=True)
        if direction == "forward":
            return divergence(lp_hat, lq_k, direction)
        return divergence(lp_hat, lq_k - torch.logsumexp(lq_k, -1, keepdim=True), direction, jsd_beta)
    if mode != "topk_tail":
        raise ValueError(f"unknown loss mode {mode!r}")
    # Where the top-k covers the student's whole vocabulary the student has no tail bucket:
    # the teacher is then conditioned on the student's vocabulary (renormalised over the
    # valid ids, as `dense` does), which also drops rounding slivers of tail mass.
    lp_k = torch.where(covered.unsqueeze(-1), lp_k - torch.logsumexp(lp_k, -1, keepdim=True), lp_k)
    p_tail = (1 - lp_k.exp().sum(-1)).clamp(min=_TINY)
    lp_tail = torch.log(p_tail).masked_fill(covered, _LOG_ZERO)
    return divergence(
        torch.cat([lp_k, lp_tail.unsqueeze(-1)], -1), torch.cat([lq_k, lq_tail.unsqueeze(-1)], -1), direction, jsd_beta
    )


def divergence_per_token(
    lq: torch.Tensor, teacher: TeacherChunk, temperature: float, mode: str, direction: str, jsd_beta: float = 0.5
) -> torch.Tensor:
    """The KD divergence at each of C positions, given the student's log-probabilities.

    This is the plain autograd definition (the reference the fused path is tested against).

    Args:
        lq: (C, V) float32 ``log_softmax(student_logits / temperature)``.
        teacher: :class:`SparseTeacher` (at ``temperature``) for the top-k modes, or
            (C, V_t) raw logits for ``dense``.
    Returns:
        (C,) divergences (nats).
    """
    if mode == "dense":
        return divergence(_dense_teacher(teacher, lq.shape[-1], temperature), lq, direction, jsd_beta)
    if mode == "sampled":
        return sampled_divergence(lq, teacher)
    teacher, valid, lp_k = _sparse_teacher(teacher, lq.shape[-1])
    lq_k = lq.gather(-1, teacher.ids).masked_fill(~valid, _LOG_ZERO)
    lq_tail, covered = _tail(lq, teacher.ids, valid)
    return sparse_divergence(lp_k, lq_k, lq_tail.masked_fill(covered, _LOG_ZERO), covered, mode, direction, jsd_beta)


def _dense_teacher(teacher: TeacherChunk, vocab_size: int, temperature: float) -> torch.Tensor:
    """(C, V) teacher log-probabilities at ``temperature`` from its raw logits."""
    if not torch.is_tensor(teacher):
        raise ValueError("loss mode 'dense' needs full teacher logits (a live teacher)")
    # Teacher rows beyond the student's vocabulary (padded vocabularies) are dropped:
    # the teacher is conditioned on the tokens the student can produce.
    return torch.log_softmax(teacher[:, :vocab_size].float() / temperature, dim=-1)


def _sparse_teacher(teacher: TeacherChunk, vocab_size: int):
    """The teacher restricted to the student's vocabulary, which of its ids are valid, and
    their log-probabilities with ``_LOG_ZERO`` at invalid ids."""
    if torch.is_tensor(teacher):
        raise ValueError("the top-k loss modes need a SparseTeacher")
    teacher = restrict_to_vocab(teacher, vocab_size)
    valid = torch.isfinite(teacher.log_probs)
    return teacher, valid, teacher.log_probs.float().masked_fill(~valid, _LOG_ZERO)


def teacher_top1(teacher: TeacherChunk) -> torch.Tensor:
    """(C,) the teacher's most likely token at each position."""
    if torch.is_tensor(teacher):
        return teacher.argmax(-1)
    return teacher.ids.gather(-1, teacher.log_probs.argmax(-1, keepdim=True)).squeeze(-1)


def loss_sums(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherChunk,
    spec: LossSpec,
    temperature: float | None = None,
    kd_mask: torch.Tensor | None = None,
) -> LossOutput:
    """CE and KD-divergence *sums* over the real targets of one chunk (differentiable).

    Args:
        student_logits: (C, V).
        targets: (C,) next-token ids, ``-100`` for positions that do not count.
        teacher: the teacher at the same C positions.
        kd_mask: (C,) bool, the positions the KD sum covers (a subset of the real ones, see
            :func:`select_kd_positions`); None: every real position.
    """
    t = spec.temperature if temperature is None else temperature
    real = targets != IGNORE_INDEX
    logits = student_logits.float()
    lq = torch.log_softmax(logits / t, dim=-1)
    if t == 1.0:  # CE is read off the same log-probabilities: one (C, V) tensor fewer
        ce = F.nll_loss(lq, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    per_token = divergence_per_token(lq, teacher, t, spec.mode, spec.direction, spec.jsd_beta)
    kd = real if kd_mask is None else kd_mask
    kl = per_token.masked_fill(~kd, 0).sum()
    with torch.no_grad():
        top1 = ((logits.argmax(-1) == teacher_top1(teacher)) & real).sum().float()
    return LossOutput(spec.ce_weight * ce + spec.kl_weight * kl, ce, kl, top1, int(real.sum()), int(kd.sum()))


def _compute_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    """The autocast dtype if autocast is on for ``device``, else ``fallback``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def _student_buckets(zt: torch.Tensor, lse_t: torch.Tensor, teacher: TeacherChunk):
    """The top-k modes' buckets from the tempered logits ``zt`` (C, V), which become the tail.

    Returns the teacher restricted to the student's vocabulary, its valid ids (C, k), their
    log-probabilities ``lp_k``, the student's ``lq_k`` (C, k) and tail ``lq_tail`` (C,), the
    tail's log-normaliser ``tail_lse`` (C,) and where the ids cover the vocabulary (C,).
    """
    teacher, valid, lp_k = _sparse_teacher(teacher, zt.shape[-1])
    lq_k = (zt.gather(-1, teacher.ids) - lse_t).masked_fill(~valid, _LOG_ZERO)
    # zt becomes the tail: valid top-k ids -> -inf ("amin" keeps duplicate ids exact).
    inf = torch.full_like(lq_k, float("inf"))
    zt.scatter_reduce_(-1, teacher.ids, torch.where(valid, -inf, inf), "amin")
    tail_lse = torch.logsumexp(zt, -1)
    covered = torch.isneginf(tail_lse)
    lq_tail = (tail_lse - lse_t.squeeze(-1)).masked_fill(covered, _LOG_ZERO)
    return teacher, valid, lp_k, lq_k, lq_tail, tail_lse, covered


def chunk_loss_and_grad(
    z: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherChunk,
    spec: LossSpec,
    need_grad: bool,
    kd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss sums of one chunk and their gradient with respect to its logits.

    The (C, V) work is done without autograd, in place where it can be, so a chunk needs
    a few (C, V) float32 buffers (the logits, the tempered logits that become the gradient,
    temporaries). Autograd runs only on the (C, k + 1) bucket log-probabilities
    (top-k modes) and turns their gradient g into the logits' analytically: with
    q = softmax(z / T) and G = sum of g over the buckets,

        dL/dz_j = (g_j - q_j G) / T                          for a top-k id j
        dL/dz_j = q_j (g_tail / q_tail - G) / T              for j in the tail
        dCE/dz_j = softmax(z)_j - [j = y]

    ``dense`` differentiates through the (C, V) log-probabilities instead (live teacher).

    Args:
        z: (C, V) float32 student logits; **overwritten**.
        targets: (C,) next-token ids, ``-100`` where no loss is taken.
        kd: (C,) bool, the positions the KD sum covers; None: every real one.
    Returns:
        ``[weighted_sum, ce_sum, kl_sum, top1_matches, num_tokens]`` as a (5,) float64
        tensor, and d(weighted_sum)/dz (C, V) or None.
    """
    t, vocab = spec.temperature, z.shape[-1]
    real, y, lse1, ce, top1 = _ce_and_top1(z, targets, teacher)
    kd = real if kd is None else kd
    with torch.no_grad():
        zt = z / t
        lse_t = torch.logsumexp(zt, -1, keepdim=True)
        if spec.mode == "dense":
            lp = _dense_teacher(teacher, vocab, t)
            leaves = [zt.sub_(lse_t)]  # (C, V) student log-probabilities
        else:
            teacher, valid, lp_k, lq_k, lq_tail, tail_lse, covered = _student_buckets(zt, lse_t, teacher)
            leaves = [lq_k, lq_tail]
    with torch.set_grad_enabled(need_grad):
        for leaf in leaves:
            leaf.requires_grad_(need_grad)
        if spec.mode == "dense":
            per_token = divergence(lp, leaves[0], spec.direction, spec.jsd_beta)
        else:
            per_token = sparse_divergence(lp_k, lq_k, lq_tail, covered, spec.mode, spec.direction, spec.jsd_beta)
        kl = per_token.masked_fill(~kd, 0).sum()
        grads = torch.autograd.grad(kl, leaves, allow_unused=True) if need_grad else None
    sums = torch.stack([spec.ce_weight * ce + spec.kl_weight * kl.detach(), ce, kl.detach(), top1, real.sum()]).double()
    if not need_grad:
        return sums, None

    scale = spec.kl_weight / t
    with torch.no_grad():
        if spec.mode == "dense":
            (g,) = grads
            grad = leaves[0].detach().exp_()  # q, in place of the log-probabilities
            grad.mul_(-g.sum(-1, keepdim=True)).add_(g).mul_(scale)
        else:
            g_k, g_tail = grads
            if g_tail is None:  # topk_renorm has no tail bucket
                g_tail = torch.zeros_like(lq_tail)
            big_g = g_k.sum(-1) + g_tail
            q_tail = lq_tail.detach().exp()  # 0 where covered
            # Tail ids: q_j / q_tail = exp(zt_j - tail_lse) <= 1 (masked ids give exp(-inf) = 0).
            grad = zt.sub_(tail_lse.masked_fill(covered, 0).unsqueeze(-1)).exp_()
            grad.mul_(((g_tail.masked_fill(covered, 0) - big_g * q_tail) * scale).unsqueeze(-1))
            top = (g_k - lq_k.detach().exp() * big_g.unsqueeze(-1)) * scale
            grad.scatter_add_(-1, teacher.ids, top.masked_fill(~valid, 0))
        coef = (spec.ce_weight * real).to(grad.dtype).unsqueeze(-1)
        grad.addcmul_(z.sub_(lse1).exp_(), coef)  # softmax(z), in place of the logits
        grad.scatter_add_(-1, y, -coef)
    return sums, grad


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_fn: TeacherFn,
    spec: LossSpec,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    kd_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the head + loss chunk by chunk; fill the gradient buffers that are given.

    ``kd_mask`` (N,) bool: the positions the KD sum covers (None: every real one).
    Returns the sums ``[weighted, ce, kl, top1, tokens]`` (float64, detached).
    """
    dtype = _compute_dtype(hidden.device, weight.dtype)
    w = weight.detach().to(dtype)
    need_grad = grad_hidden is not None or grad_weight is not None
    sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
    # Dtypes are explicit below; autocast would otherwise re-cast the head weight per chunk.
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], spec.chunk_size):
            end = min(hidden.shape[0], start + spec.chunk_size)
            tgt = targets[start:end]
            if not bool((tgt != IGNORE_INDEX).any()):
                continue
            h = hidden[start:end].detach().to(dtype)
            loss_and_grad = sampled_chunk_loss_and_grad if spec.mode == "sampled" else chunk_loss_and_grad
            kd = None if kd_mask is None else kd_mask[start:end]
            chunk_sums, g = loss_and_grad((h @ w.t()).float(), tgt, teacher_fn(start, end), spec, need_grad, kd)
            sums += chunk_sums
            if g is None:
                continue
            g = g.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ w
            if grad_weight is not None:
                if grad_weight.dtype == dtype:
                    grad_weight.addmm_(g.t(), h)
                else:  # bf16 matmul, fp32 accumulation across chunks
                    grad_weight.add_(g.t() @ h)
    return sums


class _FusedHeadLoss(torch.autograd.Function):
    """The chunked head + loss with its gradient taken in the forward pass (no recompute).

    Only ``weighted_sum`` is differentiable; backward scales the stored gradients by its
    incoming gradient (e.g. 1 / number of tokens of the accumulated batch).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_fn, spec, kd_mask):
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        sums = _chunked(hidden, weight, targets, teacher_fn, spec, grad_hidden, grad_weight, kd_mask)
        ctx.grads = (grad_hidden, grad_weight)
        weighted, ce, kl, top1, tokens = (s.float() for s in sums)
        ctx.mark_non_differentiable(ce, kl, top1, tokens)
        return weighted, ce, kl, top1, tokens

    @staticmethod
    def backward(ctx, grad_weighted, *_):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # one backward only: the buffers are handed to autograd and scaled in place
        if grad_hidden is not None:
            grad_hidden.mul_(grad_weighted.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_weighted.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def _entropies(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N,) the student's entropy at temperature 1 at each position, chunk by chunk (no gradient);
    0 in chunks without a real target (they are never selected)."""
    dtype = _compute_dtype(hidden.device, weight.dtype)
    w = weight.detach().to(dtype)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(hidden.shape[0], start + chunk_size)
            if bool((targets[start:end] != IGNORE_INDEX).any()):
                out[start:end] = student_entropy(hidden[start:end].detach().to(dtype) @ w.t())
    return out


def distillation_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_fn: TeacherFn,
    spec: LossSpec,
    sequence_length: int | None = None,
) -> LossOutput:
    """CE and KD sums for N positions, computing the LM head and the loss per chunk.

    Args:
        hidden: (N, H) the student's final hidden states (after the final norm).
        head_weight: (V, H) the student's LM-head weight (no bias, as in Qwen/Llama).
        targets: (N,) next-token ids, ``-100`` where no loss is taken.
        teacher_fn: ``teacher_fn(start, end)`` returns the teacher for positions
            [start, end), called once per chunk (a live teacher's (C, V) logits exist for
            one chunk at a time).
        spec: alpha, temperature, mode, direction, chunk size, KD positions.
        sequence_length: with ``spec.kd_fraction`` < 1, the N positions are N / sequence_length
            sequences in a row, and each selects its own KD positions (None: one sequence).
    Returns:
        Sums over the real targets; ``out.total(normalizer)`` is the loss, with
        ``normalizer`` the real-token count of the *whole accumulated batch* (and
        ``spec.kd_scale`` that count over the batch's KD positions). Under
        ``torch.autocast`` the head matmuls run in the autocast dtype and the loss in fp32.
    """
    kd_mask = None
    if spec.kd_fraction < 1:
        rows = (-1, sequence_length or hidden.shape[0])
        entropy = _entropies(hidden, head_weight, targets, spec.chunk_size)
        real = targets != IGNORE_INDEX
        kd_mask = select_kd_positions(entropy.view(rows), real.view(rows), spec.kd_fraction).view(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad):
        weighted, ce, kl, top1, tokens = _FusedHeadLoss.apply(hidden, head_weight, targets, teacher_fn, spec, kd_mask)
    else:
        sums = _chunked(hidden, head_weight, targets, teacher_fn, spec, None, None, kd_mask)
        weighted, ce, kl, top1, tokens = sums.float()
    kd_tokens = int(tokens) if kd_mask is None else int(kd_mask.sum())
    return LossOutput(weighted, ce, kl, top1, int(tokens), kd_tokens)


def student_loss(student, input_ids: torch.Tensor, teacher_fn: TeacherFn, spec: LossSpec) -> LossOutput:
    """The student's decoder on (B, L) packed sequences, then the chunked head + loss.

    Position t predicts token t + 1, so the last position is dropped and the targets are
    ``input_ids[:, 1:]`` flattened to (B * (L - 1),), the order the teacher uses too. No KV
    cache is built (training and evaluation see whole sequences). KD positions (``spec.kd_fraction``
    < 1) are selected per sequence.
    """
    hidden = student.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    return distillation_loss(
        hidden.reshape(-1, hidden.shape[-1]),
        student.get_output_embeddings().weight,
        input_ids[:, 1:].reshape(-1),
        teacher_fn,
        spec,
        sequence_length=input_ids.shape[1] - 1,
    )
