"""Property checks of the KD loss (kdsweep.losses) on small tensors, fp32/fp64, fixed seeds."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdsweep.cache.format import summarize_logits, temperature_grid
from kdsweep.losses import (
    IGNORE_INDEX,
    LossSpec,
    SparseTeacher,
    TeacherChunk,
    distillation_loss,
    divergence_per_token,
    loss_sums,
    restrict_to_vocab,
    sparse_teacher_from_logits,
)
from kdsweep.teacher_targets import cached_teacher_fn

CACHE_KEYS = ("topk_ids", "topk_logits", "log_normalizer", "log_normalizer_slope")


def kl_per_token(
    student_logits: torch.Tensor,
    teacher: TeacherChunk,
    temperature: float,
    mode: str,
    direction: str,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """:func:`divergence_per_token` from the student's raw logits (C, V): the per-token reference."""
    lq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return divergence_per_token(lq, teacher, temperature, mode, direction, jsd_beta)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def peaked_logits(c: int, v: int, seed: int) -> torch.Tensor:
    """(C, V) teacher-like logits: 4 * randn plus a Zipf-like offset -2 log(rank) in a random order."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.argsort(torch.rand(c, v, generator=g), dim=-1).double() + 1
    return (4 * torch.randn(c, v, generator=g, dtype=torch.float64) - 2 * torch.log(rank)).float()


def teacher_for(mode: str, logits: torch.Tensor, k: int, temperature: float):
    """What :func:`kl_per_token` takes as the teacher in ``mode``."""
    return logits if mode == "dense" else sparse_teacher_from_logits(logits, k, temperature)


def reference_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float, direction: str, beta: float = 0.5
) -> torch.Tensor:
    """(C,) full-vocabulary divergence in float64, written independently of the package."""
    lp = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    lq = F.log_softmax(student_logits.double() / temperature, dim=-1)
    if direction == "forward":
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    if direction == "reverse":
        return F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    return bucket_divergence(lp.exp(), lq.exp(), "jsd", beta)


def bucket_divergence(p: torch.Tensor, q: torch.Tensor, direction: str, beta: float = 0.5) -> torch.Tensor:
    """(C,) divergence between probability rows p (teacher) and q (student), by definition."""

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if direction == "forward":
        return kl(p, q)
    if direction == "reverse":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


# --------------------------------------------------------------------------- KL properties
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("mode,k", [("dense", None), ("topk_tail", 5), ("topk_tail", 16), ("topk_renorm", 16)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_identical_distributions_give_zero_kl(mode, k, direction, temperature):
    logits = randn(6, 16, seed=0, scale=3.0)
    kl = kl_per_token(logits, teacher_for(mode, logits, k, temperature), temperature, mode, direction)
    assert kl.shape == (6,)
    torch.testing.assert_close(kl, torch.zeros(6), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mode,k", [("dense", None)] + [(m, k) for m in ("topk_tail", "topk_renorm") for k in (1, 5, 16)]
)
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_kl_is_nonnegative_for_random_logits(mode, k, direction):
    for seed in range(3):
        teacher = randn(32, 16, seed=seed, scale=4.0)
        student = randn(32, 16, seed=100 + seed, scale=4.0)
        for temperature in (0.5, 1.0, 3.0):
            kl = kl_per_token(student, teacher_for(mode, teacher, k, temperature), temperature, mode, direction)
            assert torch.isfinite(kl).all()
            assert kl.min() >= -1e-6, (seed, temperature, kl.min())


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_tail_with_k_equal_vocab_equals_dense(direction, temperature):
    teacher, student = randn(24, 20, seed=1, scale=3.0), randn(24, 20, seed=2, scale=3.0)
    sparse = kl_per_token(
        student, sparse_teacher_from_logits(teacher, 20, temperature), temperature, "topk_tail", direction
    )
    dense = kl_per_token(student, teacher, temperature, "dense", direction)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        dense.double(), reference_kl(teacher, student, temperature, direction), atol=1e-5, rtol=0
    )


def test_topk_tail_with_small_k_is_exact_over_k_plus_one_buckets():
    """k < V: the KL of the (k + 1)-bucket distributions, computed by hand from full softmaxes."""
    teacher, student, temperature, k = randn(8, 12, seed=3, scale=2.0), randn(8, 12, seed=4, scale=2.0), 1.5, 4
    p, q = F.softmax(teacher.double() / temperature, -1), F.softmax(student.double() / temperature, -1)
    ids = p.topk(k, -1).indices
    p_b = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    sparse = sparse_teacher_from_logits(teacher, k, temperature)
    for direction in ("forward", "reverse", "jsd"):
        got = kl_per_token(student, sparse, temperature, "topk_tail", direction, jsd_beta=0.3)
        torch.testing.assert_close(got.double(), bucket_divergence(p_b, q_b, direction, beta=0.3), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the cached teacher
def _cache_batch(logits: torch.Tensor, b: int, length: int, betas) -> tuple[dict, torch.Tensor]:
    summary = summarize_logits(logits, k=logits.shape[-1], betas=betas)
    return {key: summary[key].reshape(b, length, -1) for key in CACHE_KEYS}, summary["max_error"]


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_cached_teacher_with_k_equal_vocab_equals_dense(temperature, direction):
    """The cache path (summarize_logits -> cached_teacher_fn) reproduces the dense KL.

    The logits are rounded to a 1/64 grid within (-32, 0] after the max shift, so the
    float16 ``topk_logits`` store them exactly: this isolates the cache's arithmetic
    (max shift, log-normaliser, dropped last position) from float16 rounding, which
    ``test_cached_teacher_realistic_logits_within_1e-4`` covers. At a grid point (T = 1)
    the normaliser is exact; in between it is a Hermite interpolation whose error e the
    cache reports as ``max_error``, and e moves the KL by at most about e * (1 + KL).
    """
    b, length, v = 3, 6, 32
    raw = peaked_logits(b * length, v, seed=0)
    logits = ((raw - raw.max(-1, keepdim=True).values) * 64).round().clamp(min=-31 * 64) / 64 + 1.5
    betas = temperature_grid(1.0, 4.0, 8)
    batch, max_error = _cache_batch(logits, b, length, betas)
    n = b * (length - 1)
    teacher = cached_teacher_fn(batch, betas, temperature)(0, n)
    assert teacher.ids.shape == (n, v)

    student = randn(n, v, seed=5, scale=2.0)
    # Position t predicts t + 1, and the last position of each sequence has no target.
    aligned = logits.reshape(b, length, v)[:, :-1].reshape(n, v)
    dense = kl_per_token(student, aligned, temperature, "dense", direction)
    cached = kl_per_token(student, teacher, temperature, "topk_tail", direction)
    tol = torch.full_like(dense, 1e-4) if temperature == 1.0 else 1e-5 + float(max_error) * (1 + dense)
    assert ((cached - dense).abs() <= tol).all(), ((cached - dense).abs(), tol)
    # The check can see an off-by-one position: the next position's teacher is far away.
    shifted = logits.reshape(b, length, v)[:, 1:].reshape(n, v)
    assert (cached - kl_per_token(student, shifted, temperature, "dense", direction)).abs().max() > 0.1


# --------------------------------------------------------------------------- the total
def _sums(alpha, temperature, scale_by_t2=True, mode="topk_tail"):
    student, teacher = randn(10, 16, seed=6, scale=2.0), randn(10, 16, seed=7, scale=2.0)
    targets = torch.randint(0, 16, (10,), generator=torch.Generator().manual_seed(8))
    targets[[2, 7]] = IGNORE_INDEX
    spec = LossSpec(alpha=alpha, temperature=temperature, mode=mode, scale_by_t2=scale_by_t2)
    return (
        student,
        teacher,
        targets,
        spec,
        loss_sums(student, targets, teacher_for(mode, teacher, 5, temperature), spec),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_t2_scaling_of_the_kl_term(temperature):
    *_, spec, out = _sums(alpha=1.0, temperature=temperature)
    assert out.num_tokens == 8
    kl = out.kl_sum / out.num_tokens
    torch.testing.assert_close(out.total(out.num_tokens), temperature**2 * kl)
    *_, spec, out = _sums(alpha=1.0, temperature=temperature, scale_by_t2=False)
    torch.testing.assert_close(out.total(out.num_tokens), kl)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["dense", "topk_tail"])
def test_total_matches_independent_formula(alpha, mode):
    temperature = 2.0
    student, teacher, targets, spec, out = _sums(alpha=alpha, temperature=temperature, mode=mode)
    real = targets != IGNORE_INDEX
    ce = F.cross_entropy(student.double()[real], targets[real])  # mean over real tokens
    if mode == "dense":
        kl = reference_kl(teacher, student, temperature, "forward")[real].mean()
    else:  # k + 1 buckets: top-5 of the teacher plus the rest
        p = F.softmax(teacher.double() / temperature, -1)
        q = F.softmax(student.double() / temperature, -1)
        ids = p.topk(5, -1).indices
        p_b = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
        q_b = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
        kl = (p_b * (p_b.log() - q_b.log())).sum(-1)[real].mean()
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    torch.testing.assert_close(out.total(int(real.sum())).double(), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- chunking and accumulation
def _sparse_fn(teacher: SparseTeacher, offset: int = 0):
    return lambda a, b: SparseTeacher(teacher.ids[offset + a : offset + b], teacher.log_probs[offset + a : offset + b])


@pytest.mark.parametrize(
    "mode,direction",
    [
        ("topk_tail", "forward"),
        ("topk_tail", "reverse"),
        ("topk_tail", "jsd"),
        ("dense", "jsd"),
        ("topk_renorm", "jsd"),
        ("dense", "forward"),
        ("topk_renorm", "forward"),
    ],
)
def test_chunked_equals_unchunked(mode, direction):
    n, h, v, temperature = 45, 12, 24, 2.0
    teacher_logits = randn(n, v, seed=9, scale=3.0)
    teacher = teacher_for(mode, teacher_logits, 6, temperature)
    fn = (lambda a, b: teacher_logits[a:b]) if mode == "dense" else _sparse_fn(teacher)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(10))
    targets[[0, 3, 4, 20, 44]] = IGNORE_INDEX
    targets[7:14] = IGNORE_INDEX  # one whole chunk of 7 without targets is skipped
    results = []
    for chunk_size in (7, 64):
        hidden = randn(n, h, seed=11).requires_grad_()
        weight = randn(v, h, seed=12, scale=0.5).requires_grad_()
        spec = LossSpec(alpha=0.4, temperature=temperature, mode=mode, direction=direction, chunk_size=chunk_size)
        out = distillation_loss(hidden, weight, targets, fn, spec)
        loss = out.total(out.num_tokens)
        loss.backward()
        results.append((loss.detach(), out.num_tokens, out.top1_matches, hidden.grad, weight.grad))
    (l1, n1, t1, gh1, gw1), (l2, n2, t2, gh2, gw2) = results
    assert n1 == n2 == int((targets != IGNORE_INDEX).sum())
    assert t1 == t2
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh1, gh2, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw1, gw2, atol=1e-5, rtol=0)
    assert gh1[7:14].abs().max() == 0


def test_batchmean_under_gradient_accumulation_with_uneven_padding():
    """16 sequences at once == 4 accumulated micro-batches of 4, each normalised by the
    real-token count of the whole 16-sequence batch (padding differs between sequences)."""
    b, steps, h, v, micro = 16, 8, 8, 16, 4
    spec = LossSpec(alpha=0.5, temperature=2.0, chunk_size=5)
    targets = torch.randint(0, v, (b, steps), generator=torch.Generator().manual_seed(13))
    padding = [0, 1, 2, 3, 5, 7, 0, 0, 6, 8, 1, 0, 4, 2, 0, 3]  # sequence 9 has no target at all
    for i, pad in enumerate(padding):
        if pad:
            targets[i, steps - pad :] = IGNORE_INDEX
    num_real = int((targets != IGNORE_INDEX).sum())
    teacher = sparse_teacher_from_logits(randn(b * steps, v, seed=14, scale=3.0), 5, spec.temperature)
    hidden0 = randn(b, steps, h, seed=15, dtype=torch.float64)
    weight0 = randn(v, h, seed=16, scale=0.5, dtype=torch.float64)

    hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    out = distillation_loss(hidden.reshape(-1, h), weight, targets.reshape(-1), _sparse_fn(teacher), spec)
    full = out.total(num_real)
    full.backward()

    hidden_acc, weight_acc = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    accumulated, naive, tokens = 0.0, 0.0, 0
    for j in range(0, b, micro):
        out_j = distillation_loss(
            hidden_acc[j : j + micro].reshape(-1, h),
            weight_acc,
            targets[j : j + micro].reshape(-1),
            _sparse_fn(teacher, offset=j * steps),
            spec,
        )
        loss_j = out_j.total(num_real)
        loss_j.backward()
        accumulated += float(loss_j.detach())
        naive += float(out_j.total(out_j.num_tokens).detach()) / (b // micro)
        tokens += out_j.num_tokens

    assert tokens == out.num_tokens == num_real
    assert abs(accumulated - float(full.detach())) <= 1e-6
    torch.testing.assert_close(hidden_acc.grad, hidden.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(weight_acc.grad, weight.grad, atol=1e-6, rtol=0)
    # Averaging each micro-batch by its own token count is not the same loss (so the padding matters).
    assert abs(naive - float(full.detach())) > 1e-3


# --------------------------------------------------------------------------- vocabularies and modes
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_student_vocab_smaller_than_teacher_ids_counts_their_mass_in_the_tail(direction):
    v_teacher, v_student, k, temperature = 20, 12, 6, 1.0
    teacher_logits = randn(10, v_teacher, seed=17, scale=2.0)
    teacher_logits[:, 15] += 6.0  # every position's top-k contains an id the student lacks
    student = randn(10, v_student, seed=18, scale=2.0).requires_grad_()
    sparse = sparse_teacher_from_logits(teacher_logits, k, temperature)
    assert (sparse.ids >= v_student).any(-1).all()

    restricted = restrict_to_vocab(sparse, v_student)
    invalid = sparse.ids >= v_student
    assert torch.isinf(restricted.log_probs[invalid]).all() and (restricted.ids < v_student).all()

    kl = kl_per_token(student, sparse, temperature, "topk_tail", direction)
    assert torch.isfinite(kl).all() and kl.min() >= -1e-6
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()

    # By hand: buckets = the teacher's in-vocabulary top-k ids, plus one tail holding the rest
    # (for the teacher, that includes the mass on ids >= v_student).
    p = F.softmax(teacher_logits.double() / temperature, -1)
    q = F.softmax(student.detach().double() / temperature, -1)
    expected = []
    for i in range(10):
        ids = sparse.ids[i][~invalid[i]]
        p_b = torch.cat([p[i, ids], (1 - p[i, ids].sum()).reshape(1)])
        q_b = torch.cat([q[i, ids], (1 - q[i, ids].sum()).reshape(1)])
        a, c = (p_b, q_b) if direction == "forward" else (q_b, p_b)
        expected.append((a * (a.log() - c.log())).sum())
    torch.testing.assert_close(kl.detach().double(), torch.stack(expected), atol=1e-5, rtol=0)


def test_student_vocab_covered_by_teacher_topk_gives_a_proper_kl():
    """The student has no tail bucket: the teacher is conditioned on the student's vocabulary."""
    v_teacher, v_student, temperature = 12, 8, 1.0
    teacher_logits = randn(6, v_teacher, seed=19, scale=2.0)
    student = randn(6, v_student, seed=20, scale=2.0)
    sparse = sparse_teacher_from_logits(teacher_logits, v_teacher, temperature)  # top-k = all 12 ids
    kl = kl_per_token(student, sparse, temperature, "topk_tail", "forward")
    assert kl.min() >= -1e-6, kl


def test_topk_renorm_differs_from_topk_tail_when_k_below_vocab():
    teacher, student, temperature = randn(16, 20, seed=21, scale=2.0), randn(16, 20, seed=22, scale=2.0), 2.0
    sparse = sparse_teacher_from_logits(teacher, 5, temperature)
    for direction in ("forward", "reverse"):
        tail = kl_per_token(student, sparse, temperature, "topk_tail", direction)
        renorm = kl_per_token(student, sparse, temperature, "topk_renorm", direction)
        assert torch.isfinite(tail).all() and torch.isfinite(renorm).all()
        assert (tail - renorm).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [1.0, 40.0])
@pytest.mark.parametrize(
    "mode,direction", [(m, d) for m in ("topk_tail", "topk_renorm") for d in ("forward", "reverse", "jsd")]
)
def test_no_nan_gradients_when_topk_covers_the_vocabulary(mode, direction, scale):
    """k = V leaves an empty tail bucket; scale 40 makes most teacher probabilities underflow to 0."""
    n, h, v = 12, 8, 16
    teacher = sparse_teacher_from_logits(randn(n, v, seed=23, scale=scale), v, 1.5)
    hidden = randn(n, h, seed=24).requires_grad_()
    weight = randn(v, h, seed=25, scale=scale / 4).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(26))
    spec = LossSpec(alpha=0.7, temperature=1.5, mode=mode, direction=direction, chunk_size=5)
    out = distillation_loss(hidden, weight, targets, _sparse_fn(teacher), spec)
    loss = out.total(out.num_tokens)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


# --------------------------------------------------------------------------- JSD
def test_jsd_is_symmetric_at_half_and_bounded_by_log2():
    a, b, temperature = randn(16, 24, seed=27, scale=4.0), randn(16, 24, seed=28, scale=4.0), 1.0
    ab = kl_per_token(b, a, temperature, "dense", "jsd", jsd_beta=0.5)
    ba = kl_per_token(a, b, temperature, "dense", "jsd", jsd_beta=0.5)
    torch.testing.assert_close(ab, ba, atol=1e-6, rtol=0)
    assert ab.max() <= math.log(2) + 1e-6
    # beta weighs the teacher's side: it is not symmetric elsewhere.
    assert (
        kl_per_token(b, a, temperature, "dense", "jsd", jsd_beta=0.2)
        - kl_per_token(a, b, temperature, "dense", "jsd", jsd_beta=0.2)
    ).abs().max() > 1e-3
    torch.testing.assert_close(
        kl_per_token(b, a, 2.0, "dense", "jsd", jsd_beta=0.2).double(),
        reference_kl(a, b, 2.0, "jsd", beta=0.2),
        atol=1e-6,
        rtol=0,
    )


# --------------------------------------------------------------------------- the fused chunked head + loss
def _naive(hidden, weight, targets, teacher_logits, spec, k):
    """Full (N, V) logits and plain autograd: what the chunked loss must reproduce."""
    logits = hidden @ weight.t()
    teacher = (
        teacher_logits if spec.mode == "dense" else sparse_teacher_from_logits(teacher_logits, k, spec.temperature)
    )
    return loss_sums(logits, targets, teacher, spec)


@pytest.mark.parametrize(
    "mode,direction",
    [
        ("topk_tail", "forward"),
        ("topk_tail", "reverse"),
        ("topk_tail", "jsd"),
        ("topk_renorm", "forward"),
        ("dense", "forward"),
        ("dense", "jsd"),
    ],
)
def test_chunked_loss_and_gradients_equal_full_logits_autograd(mode, direction):
    """fp32, within 1e-5: the gradients the chunks take in the forward pass are autograd's."""
    n, h, v, k, temperature = 50, 16, 40, 6, 2.0
    teacher_logits = randn(n, v, seed=30, scale=3.0)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(31))
    targets[[1, 2, 30]] = IGNORE_INDEX
    spec = LossSpec(alpha=0.6, temperature=temperature, mode=mode, direction=direction, chunk_size=16, jsd_beta=0.4)
    fn = (
        (lambda a, b: teacher_logits[a:b])
        if mode == "dense"
        else _sparse_fn(sparse_teacher_from_logits(teacher_logits, k, temperature))
    )
    results = []
    for fused in (True, False):
        hidden = randn(n, h, seed=32).requires_grad_()
        weight = randn(v, h, seed=33, scale=0.5).requires_grad_()
        out = (
            distillation_loss(hidden, weight, targets, fn, spec)
            if fused
            else _naive(hidden, weight, targets, teacher_logits, spec, k)
        )
        (out.total(40) * 3.0).backward()  # an arbitrary upstream gradient scale
        results.append((out, hidden.grad, weight.grad))
    (fo, fh, fw), (no, nh, nw) = results
    for name in ("weighted_sum", "ce_sum", "kl_sum", "top1_matches"):
        torch.testing.assert_close(getattr(fo, name), getattr(no, name).detach(), atol=1e-5, rtol=1e-6)
    assert fo.num_tokens == no.num_tokens == n - 3
    torch.testing.assert_close(fh, nh, atol=1e-5, rtol=0)
    torch.testing.assert_close(fw, nw, atol=1e-5, rtol=0)


def test_no_grad_and_frozen_head_paths_give_the_same_sums_and_hidden_gradient():
    n, h, v, temperature = 30, 8, 20, 1.5
    sparse = sparse_teacher_from_logits(randn(n, v, seed=34, scale=3.0), 5, temperature)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(35))
    spec = LossSpec(alpha=0.5, temperature=temperature, chunk_size=7)
    hidden, weight = randn(n, h, seed=36).requires_grad_(), randn(v, h, seed=37).requires_grad_()
    full = distillation_loss(hidden, weight, targets, _sparse_fn(sparse), spec)
    full.total(n).backward()
    with torch.no_grad():
        plain = distillation_loss(hidden, weight, targets, _sparse_fn(sparse), spec)
    torch.testing.assert_close(plain.weighted_sum, full.weighted_sum.detach())
    torch.testing.assert_close(plain.kl_sum, full.kl_sum)

    frozen_hidden = hidden.detach().clone().requires_grad_()
    frozen = distillation_loss(frozen_hidden, weight.detach(), targets, _sparse_fn(sparse), spec)
    frozen.total(n).backward()
    torch.testing.assert_close(frozen_hidden.grad, hidden.grad)
    assert not full.ce_sum.requires_grad and not full.kl_sum.requires_grad  # logging values


def test_bf16_autocast_runs_the_head_in_bf16_and_the_loss_in_fp32():
    n, h, v, temperature = 64, 32, 48, 2.0
    sparse = sparse_teacher_from_logits(randn(n, v, seed=38, scale=3.0), 8, temperature)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(39))
    spec = LossSpec(alpha=0.5, temperature=temperature, chunk_size=20)
    results = []
    for bf16 in (False, True):
        hidden, weight = randn(n, h, seed=40).requires_grad_(), randn(v, h, seed=41, scale=0.3).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = distillation_loss(hidden, weight, targets, _sparse_fn(sparse), spec)
        out.total(n).backward()
        assert out.weighted_sum.dtype == torch.float32
        assert hidden.grad.dtype == weight.grad.dtype == torch.float32  # fp32 master weights
        results.append((out.total(n).detach(), weight.grad))
    (l32, g32), (l16, g16) = results
    assert l16 != l32  # bf16 did run
    torch.testing.assert_close(l16, l32, rtol=2e-2, atol=0)
    torch.testing.assert_close(g16, g32, rtol=0.1, atol=2e-3)


@pytest.mark.parametrize("case", ["ids_beyond_student_vocab", "k_equals_vocab", "peaked"])
@pytest.mark.parametrize(
    "mode,direction", [(m, d) for m in ("topk_tail", "topk_renorm") for d in ("forward", "reverse", "jsd")]
)
def test_fused_gradients_match_autograd_in_edge_cases(case, mode, direction):
    """Ids the student lacks (tail bucket), a top-k that covers the vocabulary (no tail
    bucket), and logits so peaked that probabilities underflow: finite and equal to autograd."""
    n, h, v, temperature = 24, 8, 16, 1.5
    if case == "ids_beyond_student_vocab":
        teacher_logits = randn(n, 24, seed=42, scale=2.0)
        teacher_logits[:, 20] += 6.0  # always in the top-k, never in the student's vocabulary
        teacher_logits[:5, v - 1] += 8.0  # and the clamped id v - 1 is also a real top-k id in some rows
        sparse = sparse_teacher_from_logits(teacher_logits, 6, temperature)
    else:
        scale = 40.0 if case == "peaked" else 3.0
        sparse = sparse_teacher_from_logits(
            randn(n, v, seed=43, scale=scale), v if case == "k_equals_vocab" else 5, temperature
        )
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(44))
    targets[3] = IGNORE_INDEX
    spec = LossSpec(alpha=0.7, temperature=temperature, mode=mode, direction=direction, chunk_size=10)
    w_scale = 10.0 if case == "peaked" else 0.5
    grads = []
    for fused in (True, False):
        hidden = randn(n, h, seed=45).requires_grad_()
        weight = randn(v, h, seed=46, scale=w_scale).requires_grad_()
        out = (
            distillation_loss(hidden, weight, targets, _sparse_fn(sparse), spec)
            if fused
            else loss_sums(hidden @ weight.t(), targets, sparse, spec)
        )
        out.total(n).backward()
        assert (
            torch.isfinite(out.weighted_sum) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
        )
        grads.append((out.weighted_sum.detach(), hidden.grad, weight.grad))
    (l1, h1, w1), (l2, h2, w2) = grads
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)
    # fp32 rounding scales with the gradients' size (|grad| ~ 16 and loss ~ 1600 when peaked).
    torch.testing.assert_close(h1, h2, atol=1e-5 * max(1.0, float(h2.abs().max())), rtol=1e-4)
    torch.testing.assert_close(w1, w2, atol=1e-5 * max(1.0, float(w2.abs().max())), rtol=1e-4)
