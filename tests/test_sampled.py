"""Loss mode ``sampled`` (random-sampling KD): the estimator against a float64 dense reference, its
fused gradient against autograd, and the config pairing of loss.mode with teacher.cache_mode."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import REPO, tiny_params_dict

from kdsweep.cache.format import sample_ids
from kdsweep.config import validate
from kdsweep.errors import UserError
from kdsweep.losses import (
    LossSpec,
    distillation_loss,
    loss_sums,
    sampled_chunk_loss_and_grad,
    sampled_divergence,
    sampled_teacher,
)

V, DRAWS, ROUNDS = 40, 12, 4000


def logits_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, V) float64 teacher and student logits with different shapes."""
    g = torch.Generator().manual_seed(seed)
    teacher = 3 * torch.randn(2, V, generator=g, dtype=torch.float64)
    return teacher, teacher + 1.5 * torch.randn(2, V, generator=g, dtype=torch.float64)


def draw_teacher(teacher: torch.Tensor, kd_t: float, proposal_t: float, generator: torch.Generator):
    """A SampledTeacher of one draw of DRAWS tokens at ``proposal_t``, in float64 (exact p and q)."""
    ids, counts = sample_ids(teacher, DRAWS, proposal_t, generator)
    lp = torch.log_softmax(teacher / kd_t, -1).gather(-1, ids)
    lq = torch.log_softmax(teacher / proposal_t, -1).gather(-1, ids)
    return sampled_teacher(ids, counts, lp, lq)


@pytest.mark.parametrize(("kd_t", "proposal_t"), [(1.0, 1.0), (2.0, 1.0), (1.0, 1.5)])
def test_estimate_and_gradient_average_to_the_dense_kl(kd_t, proposal_t):
    """Averaged over ROUNDS draws, KL^ and its gradient match the float64 dense KL(p_T || q_T) and its
    gradient within 4 standard errors, the standard error estimated from the draws themselves
    (Var[KL^] = Var_q[(p/q)(log p - log q_S)] / N: the estimator's own variance)."""
    teacher, student = logits_pair(seed=int(10 * kd_t + proposal_t))
    z = student.clone().requires_grad_(True)
    lq_s = torch.log_softmax(z / kd_t, -1)
    p = torch.softmax(teacher / kd_t, -1)
    dense = (p * (p.log() - lq_s)).sum(-1)
    dense_grad = torch.autograd.grad(dense.sum(), z, retain_graph=True)[0]
    g = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(ROUNDS):
        est = sampled_divergence(lq_s, draw_teacher(teacher, kd_t, proposal_t, g))
        values.append(est.detach())
        grads.append(torch.autograd.grad(est.sum(), z, retain_graph=True)[0])
    values, grads = torch.stack(values), torch.stack(grads)
    stderr = values.std(0) / math.sqrt(ROUNDS)
    assert ((values.mean(0) - dense).abs() <= 4 * stderr + 1e-12).all(), (values.mean(0), dense, stderr)
    # The gradient as a whole: E||mean - grad||^2 = trace(Cov) / ROUNDS (per-coordinate standard errors are
    # unreliable for tokens a few draws ever reach); 9x that is a 3-sigma-like margin.
    squared_error = ((grads.mean(0) - dense_grad) ** 2).sum(-1)
    assert (squared_error <= 9 * grads.var(0).sum(-1) / ROUNDS).all(), squared_error


def test_renormalising_the_sample_would_be_biased():
    """The unbiased weights are not self-normalised: at T != tau the self-normalised estimate
    misses the dense KL by many standard errors, where the unbiased one does not (the test above)."""
    teacher, student = logits_pair(seed=3)
    lq_s = torch.log_softmax(student / 2.0, -1)
    p = torch.softmax(teacher / 2.0, -1)
    dense = (p * (p.log() - lq_s)).sum(-1)
    g = torch.Generator().manual_seed(1)
    values = []
    for _ in range(ROUNDS):
        t = draw_teacher(teacher, 2.0, 1.0, g)
        t.weights = t.weights / t.weights.sum(-1, keepdim=True)
        values.append(sampled_divergence(lq_s, t))
    values = torch.stack(values)
    assert ((values.mean(0) - dense).abs() > 4 * values.std(0) / math.sqrt(ROUNDS)).any()


def test_fused_gradient_equals_autograd():
    """sampled_chunk_loss_and_grad (closed form) against autograd through loss_sums, with ignored targets."""
    teacher, student = logits_pair(seed=5)
    teacher, student = teacher.repeat(3, 1), student.repeat(3, 1).float()
    t = draw_teacher(teacher, 2.0, 1.0, torch.Generator().manual_seed(2))
    t = type(t)(t.ids, t.log_probs.float(), t.weights.float())
    targets = torch.tensor([3, -100, 7, 1, 0, -100])
    spec = LossSpec(alpha=0.7, temperature=2.0, mode="sampled")
    z = student.clone().requires_grad_(True)
    out = loss_sums(z, targets, t, spec)
    (ref,) = torch.autograd.grad(out.weighted_sum, z)
    sums, grad = sampled_chunk_loss_and_grad(student.clone(), targets, t, spec, need_grad=True)
    torch.testing.assert_close(sums[2].float(), out.kl_sum.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[0].float(), out.weighted_sum.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_distillation_loss_runs_the_sampled_mode_chunk_by_chunk():
    """The public chunked path (LM head + loss per chunk) gives autograd's gradient of the head weight."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    teacher, _ = logits_pair(seed=6)
    t = draw_teacher(teacher.repeat(3, 1), 1.0, 1.0, torch.Generator().manual_seed(3))
    t = type(t)(t.ids, t.log_probs.float(), t.weights.float())
    targets = torch.tensor([1, 2, -100, 4, 5, 6])
    spec = LossSpec(alpha=0.5, temperature=1.0, mode="sampled", chunk_size=4)

    def teacher_fn(a, b):
        return type(t)(t.ids[a:b], t.log_probs[a:b], t.weights[a:b])

    w = weight.clone().requires_grad_(True)
    out = distillation_loss(hidden, w, targets, teacher_fn, spec)
    (fused,) = torch.autograd.grad(out.weighted_sum, w)
    w_ref = weight.clone().requires_grad_(True)
    ref = loss_sums(hidden @ w_ref.t(), targets, t, spec)
    (expected,) = torch.autograd.grad(ref.weighted_sum, w_ref)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- config pairing
@pytest.mark.parametrize(
    ("teacher", "loss", "named"),
    [
        ({"cache_mode": "topk"}, {"mode": "sampled"}, ["loss.mode", "teacher.cache_mode"]),
        ({"cache_mode": "sampled"}, {"mode": "topk_tail"}, ["loss.mode", "teacher.cache_mode"]),
        ({"cache_mode": "sampled"}, {"mode": "topk_renorm"}, ["loss.mode", "teacher.cache_mode"]),
        ({"cache_mode": "sampled", "use_cached_logits": False}, {"mode": "sampled"}, ["teacher.use_cached_logits"]),
        ({"cache_mode": "sampled"}, {"mode": "sampled", "direction": "reverse"}, ["loss.direction"]),
        ({"cache_mode": "sampled", "sample_temperature": 5.0}, {"mode": "sampled"}, ["teacher.sample_temperature"]),
        ({"cache_mode": "sampled"}, {"mode": "sampled", "temperature": 6.0}, ["loss.temperature"]),
    ],
)
def test_a_config_that_makes_no_sense_names_the_keys(teacher, loss, named):
    with pytest.raises(UserError) as err:
        validate(tiny_params_dict(teacher=teacher, loss=loss))
    for key in named:
        assert key in str(err.value)


def test_sampled_pairs_validate():
    validate(tiny_params_dict(teacher={"cache_mode": "sampled", "sample_temperature": 2.0}, loss={"mode": "sampled"}))
    validate(tiny_params_dict(teacher={"use_cached_logits": False}, loss={"mode": "topk_tail"}))


def test_cli_exits_2_on_a_mismatched_pair(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(loss={"mode": "sampled"})))
    run = subprocess.run(
        [sys.executable, "-c", "from kdsweep.cli import main; main()", "cache", "generate", "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2, run.stderr
    assert "loss.mode" in run.stdout + run.stderr and "teacher.cache_mode" in run.stdout + run.stderr
    assert "Traceback" not in run.stderr
