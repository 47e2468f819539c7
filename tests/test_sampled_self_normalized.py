"""Self-normalised sampled caches (``teacher.sample_weights: self_normalized``): the weights against
float64 references (c/N at T = tau, the full teacher restricted to the sampled ids elsewhere), the loss
and its gradient, real cache files from the tiny pipeline's teacher (verify, inspect, a damaged file),
the old sampled layout left as it was, and a training at T = 2 on the new cache."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import tiny_params_dict
from test_cache import kdsweep_cli

from kdsweep.cache import format as cache_format
from kdsweep.cache.format import sample_ids
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.verify import inspect_cache, verify_cache
from kdsweep.cache.writer import generate
from kdsweep.config import validate
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.losses import LossSpec, sampled_chunk_loss_and_grad, self_normalized_teacher
from kdsweep.models import load_causal_lm
from kdsweep.teacher_targets import batch_to_tensors, cached_teacher_fn

V, DRAWS = 40, 6
SNIS = {"cache_mode": "sampled", "sample_weights": "self_normalized", "sample_draws": DRAWS}


def teacher_logits(seed: int, rows: int = 5) -> torch.Tensor:
    """(rows, V) float64 teacher logits with a few confident and a few flat rows."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, V, generator=g, dtype=torch.float64)
        * torch.linspace(1, 6, rows, dtype=torch.float64)[:, None]
    )


def reference(logits: torch.Tensor, ids, counts, kd_t: float, proposal_t: float):
    """float64 SNIS weights and log p^_T from the full teacher distribution restricted to the sampled ids:
    w proportional to c p_T / q_tau; log p^_T = log p_T - log sum_u (c_u / N) p_T(u) / q_tau(u)."""
    p = torch.log_softmax(logits / kd_t, -1).gather(-1, ids)
    q = torch.log_softmax(logits / proposal_t, -1).gather(-1, ids)
    share = counts.double() / counts.sum(-1, keepdim=True)
    ratio = (share * (p - q).exp()).masked_fill(counts == 0, 0)
    return ratio / ratio.sum(-1, keepdim=True), p - ratio.sum(-1, keepdim=True).log()


def test_weights_are_the_counts_over_n_at_the_proposal_temperature():
    logits = teacher_logits(0)
    ids, counts = sample_ids(logits, DRAWS, 1.5, torch.Generator().manual_seed(0))
    log_q = torch.log_softmax(logits / 1.5, -1).gather(-1, ids)
    t = self_normalized_teacher(ids, counts, log_q, 1.5 / 1.5)
    assert torch.equal(t.weights, counts.float() / DRAWS)
    valid = counts > 0
    torch.testing.assert_close(t.log_probs[valid], log_q.float()[valid])


@pytest.mark.parametrize(("kd_t", "proposal_t"), [(2.0, 1.0), (0.7, 1.0), (4.0, 1.5)])
def test_weights_match_the_full_teacher_restricted_to_the_sampled_ids(kd_t, proposal_t):
    logits = teacher_logits(1)
    ids, counts = sample_ids(logits, DRAWS, proposal_t, torch.Generator().manual_seed(1))
    log_q = torch.log_softmax(logits / proposal_t, -1).gather(-1, ids)
    t = self_normalized_teacher(ids, counts, log_q.float(), proposal_t / kd_t)
    w_ref, lp_ref = reference(logits, ids, counts, kd_t, proposal_t)
    torch.testing.assert_close(t.weights.double(), w_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.weights.sum(-1), torch.ones(len(ids)))
    valid = counts > 0
    torch.testing.assert_close(t.log_probs.double()[valid], lp_ref[valid], rtol=1e-5, atol=1e-5)


def test_loss_and_gradient_against_a_float64_reference():
    """sampled_chunk_loss_and_grad on the self-normalised teacher: the weighted loss and its gradient in
    the student's logits against autograd through (1 - alpha) CE + alpha T^2 sum_u w_u (log p^ - log q_S) in float64."""
    kd_t, proposal_t, alpha = 2.0, 1.0, 0.6
    logits = teacher_logits(2, rows=6)
    ids, counts = sample_ids(logits, DRAWS, proposal_t, torch.Generator().manual_seed(2))
    log_q = torch.log_softmax(logits / proposal_t, -1).gather(-1, ids)
    student = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = torch.tensor([3, -100, 7, 1, 0, 5])
    w_ref, lp_ref = reference(logits, ids, counts, kd_t, proposal_t)
    z = student.clone().requires_grad_(True)
    real = targets != -100
    ce = torch.nn.functional.cross_entropy(z[real], targets[real], reduction="sum")
    lq_s = torch.log_softmax(z / kd_t, -1).gather(-1, ids)
    kl = (w_ref * (lp_ref.masked_fill(counts == 0, 0) - lq_s)).masked_fill(counts == 0, 0).sum(-1)[real].sum()
    total = (1 - alpha) * ce + alpha * kd_t**2 * kl
    (grad_ref,) = torch.autograd.grad(total, z)
    teacher = self_normalized_teacher(ids, counts, log_q.float(), proposal_t / kd_t)
    spec = LossSpec(alpha=alpha, temperature=kd_t, mode="sampled")
    sums, grad = sampled_chunk_loss_and_grad(student.float(), targets, teacher, spec, need_grad=True)
    torch.testing.assert_close(sums[0], total.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[2], kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- config
def test_any_kd_temperature_validates_and_a_top_k_cache_refuses_the_option():
    validate(tiny_params_dict(teacher=SNIS, loss={"mode": "sampled", "temperature": 6.0}))
    validate(tiny_params_dict(teacher={**SNIS, "sample_temperature": 9.0}, loss={"mode": "sampled"}))
    with pytest.raises(UserError, match="loss.temperature"):  # the exact weights keep their range check
        validate(tiny_params_dict(teacher={"cache_mode": "sampled"}, loss={"mode": "sampled", "temperature": 6.0}))
    with pytest.raises(UserError, match="teacher.sample_weights"):
        validate(tiny_params_dict(teacher={"sample_weights": "self_normalized"}))


# --------------------------------------------------------------------------- cache files
@pytest.fixture(scope="module")
def caches(tiny_pipeline, tmp_path_factory) -> dict[str, Path]:
    """The validation split's self-normalised caches (q8 and fp16 values) and an exact sampled one."""
    from kdsweep.stages.teacher_logits import layout_for

    out = tmp_path_factory.mktemp("snis")
    prepared = load_prepared(tiny_pipeline / "data/prepared")
    model = load_causal_lm(tiny_pipeline / "models/teacher").eval()
    kinds = {
        "q8": {**SNIS, "cache_values": "q8"},
        "fp16": {**SNIS, "sample_temperature": 1.5},
        "exact": {"cache_mode": "sampled", "cache_values": "q8", "sample_draws": DRAWS},
    }
    paths = {}
    for kind, teacher in kinds.items():
        params = validate(tiny_params_dict(teacher=teacher, loss={"mode": "sampled"}))
        layout = layout_for(prepared, tiny_pipeline / "models/teacher", params, "validation")
        seqs = prepared.split("validation")
        paths[kind] = generate(model, seqs, out / f"{kind}.h5", layout, batch_size=8, device=torch.device("cpu"))
    return paths


@pytest.mark.parametrize("kind", ["q8", "fp16"])
def test_verify_passes_with_the_teacher_and_inspect_names_the_mode(caches, tiny_pipeline, kind):
    lines = []
    verify_cache(caches[kind], teacher=str(tiny_pipeline / "models/teacher"), report=lines.append)
    assert lines[-1].endswith(": ok"), lines
    assert any("log q error bound" in line and line.endswith("ok") for line in lines), lines
    assert any("log q agreement with a fresh forward" in line and line.endswith("ok") for line in lines), lines
    assert any("counts sum to sample_draws" in line and line.endswith("ok") for line in lines), lines
    report = inspect_cache(caches[kind])
    assert "self-normalised weights" in report and "no temperature grid" in report and "any T > 0" in report


def test_the_file_stores_no_grid_and_reads_weights_at_any_temperature(caches, tiny_pipeline):
    """No normaliser datasets or grid attributes; at T = tau the weights are c / N; at T = 2 they match the
    float64 reference from a fresh forward (the full teacher restricted to the sampled ids) within the
    stored log q bound's effect."""
    cache = TeacherLogitCache(caches["q8"])
    assert cache.self_normalized and cache.temperature_range == (0.0, float("inf"))
    assert set(cache.stored) == {"input_ids", "sample_id_deltas", "sample_counts"} | {
        "sample_log_prob_codes",
        "sample_log_prob_min",
    }
    assert "betas" not in cache.attrs and int(cache.attrs["format_version"]) == 4
    cache.check_temperature(9.0)  # any T
    batch = batch_to_tensors(cache.read([0, 1]), torch.device("cpu"))
    n = batch["topk_ids"][:, :-1].numel() // DRAWS
    counts = batch["sample_counts"][:, :-1].reshape(-1, DRAWS)
    assert (counts.long().sum(-1) == DRAWS).all()
    torch.testing.assert_close(cached_teacher_fn(batch, cache.betas, 1.0)(0, n).weights, counts.float() / DRAWS)
    model = load_causal_lm(tiny_pipeline / "models/teacher").eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1, : cache.vocab_size].double()
    ids = batch["topk_ids"][:, :-1].reshape(-1, DRAWS)
    w_ref, _ = reference(logits.reshape(-1, logits.shape[-1]), ids, counts, 2.0, 1.0)
    weights = cached_teacher_fn(batch, cache.betas, 2.0)(0, n).weights.double()
    bound = float(cache.attrs["log_prob_max_error"])  # weights move by at most exp(2 |tau/T - 1| bound)
    assert ((weights - w_ref).abs() <= w_ref * np.expm1(2 * 0.5 * bound) + 1e-6).all()
    cache.close()


def test_the_exact_sampled_layout_is_unchanged(caches):
    """A sampled cache with exact weights keeps version 3, its grid, its normaliser datasets, its
    attributes (no sample_weights) and the arrays it reads."""
    cache = TeacherLogitCache(caches["exact"])
    assert not cache.self_normalized and int(cache.attrs["format_version"]) == 3
    assert "sample_weights" not in cache.attrs and "sample_weights" not in cache.fingerprint
    assert cache.stored == (
        "input_ids",
        "sample_id_deltas",
        "sample_counts",
        "sample_logit_codes",
        "sample_logit_min",
        "tail_log_normalizer_residual",
        "tail_log_normalizer_slope",
    )
    assert {"betas", "temperature_range", "log_normalizer_quantum", "log_normalizer_max_error"} <= set(cache.attrs)
    assert set(cache.read([0])) == {
        "input_ids",
        "topk_ids",
        "topk_logits",
        "sample_counts",
        "log_normalizer",
        "log_normalizer_slope",
        "sample_temperature",
    }
    with pytest.raises(UserError, match="outside the temperature range"):
        cache.check_temperature(9.0)
    cache.close()
    lines = []
    verify_cache(caches["exact"], report=lines.append)
    assert lines[-1].endswith(": ok")


def test_verify_fails_on_a_damaged_file(caches, tmp_path):
    """Counts that no longer sum to the draws (the chunk rewritten, so its checksum holds) and a stored bound
    above what the codes allow: verify exits 2 naming the file, the failed check and the fix."""
    path = tmp_path / "damaged.h5"
    path.write_bytes(caches["q8"].read_bytes())
    with h5py.File(path, "r+") as f:
        counts = f["sample_counts"][0]
        counts[3, 0] += 1
        f["sample_counts"][0] = counts
    run = kdsweep_cli("cache", "verify", path, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"error: {path}: verify failed")
    assert "counts sum to sample_draws" in run.stderr and "fails at 1 of" in run.stderr
    assert f"fix: delete {path}" in run.stderr

    raised = tmp_path / "raised.h5"
    raised.write_bytes(caches["q8"].read_bytes())
    with h5py.File(raised, "r+") as f:
        f.attrs["log_prob_max_error"] = 0.09  # below the limit, above what the stored codes allow
        cache_format.seal_metadata(f)
    with pytest.raises(UserError, match="log_prob_max_error .* exceeds .* the most the stored values allow"):
        verify_cache(raised, report=lambda *_: None)


def test_verify_with_the_teacher_fails_on_a_bound_lowered_below_the_real_error(caches, tiny_pipeline, tmp_path):
    path = tmp_path / "lowered.h5"
    path.write_bytes(caches["q8"].read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["log_prob_max_error"] = 1e-7
        cache_format.seal_metadata(f)
    with pytest.raises(UserError, match="log q agreement: .* above the stored bound"):
        verify_cache(path, teacher=str(tiny_pipeline / "models/teacher"), report=lambda *_: None)


def test_a_training_at_t2_reads_the_new_cache(pipeline_copy):
    """A study-like run: distill at loss.temperature 2 (the draws at T = 1, no grid) and evaluate."""
    from contextlib import chdir

    from kdsweep.stages import distill, evaluate, teacher_logits

    params = validate(
        tiny_params_dict(
            teacher={**SNIS, "cache_values": "q8"},
            loss={"mode": "sampled", "temperature": 2.0},
            training={"max_steps": 2, "eval_steps": 2},
        )
    )
    with chdir(pipeline_copy):
        metrics = teacher_logits.main(params)
        assert "log_prob_max_error" in metrics["train"] and "log_normalizer_max_error" not in metrics["train"]
        distill.main(params)
        scores = evaluate.main(params)
    assert np.isfinite(scores["val_loss"]) and np.isfinite(scores["test_ce"]) and np.isfinite(scores["test_kl"])
