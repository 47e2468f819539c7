"""Caches with q8 values and sampled ids, generated from the tiny pipeline's teacher: verify, the stored
probability bound (and a tampered one), the documented plain-h5py reader, and training reading them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import tiny_params_dict
from test_cache import assert_docs_reader_agrees, kdsweep_cli

from kdsweep.cache import format as cache_format
from kdsweep.cache.format import (
    decode_q8,
    encode_q8,
    summarize_logits,
    teacher_topk_probs,
    temperature_grid,
)
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.verify import inspect_cache, verify_cache
from kdsweep.cache.writer import generate
from kdsweep.config import validate
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.models import load_causal_lm
from kdsweep.teacher_targets import batch_to_tensors, cached_teacher_fn

KINDS = {
    "q8": {"cache_values": "q8"},
    "sampled": {"cache_mode": "sampled", "sample_draws": 32},
    "sampled-q8": {"cache_mode": "sampled", "cache_values": "q8", "sample_draws": 32, "sample_temperature": 2.0},
}


@pytest.fixture(scope="module")
def caches(tiny_pipeline, tmp_path_factory) -> dict[str, Path]:
    """The validation split's cache of each kind (and the pipeline's fp16 top-k one)."""
    out = tmp_path_factory.mktemp("caches")
    paths = {"fp16": tiny_pipeline / "data/teacher_logits/validation.h5"}
    from kdsweep.stages.teacher_logits import layout_for

    prepared = load_prepared(tiny_pipeline / "data/prepared")
    model = load_causal_lm(tiny_pipeline / "models/teacher").eval()
    for kind, teacher in KINDS.items():
        loss = {"mode": "sampled"} if teacher.get("cache_mode") == "sampled" else {}
        params = validate(tiny_params_dict(teacher=teacher, loss=loss))
        layout = layout_for(prepared, tiny_pipeline / "models/teacher", params, "validation")
        seqs = prepared.split("validation")
        paths[kind] = generate(model, seqs, out / f"{kind}.h5", layout, batch_size=8, device=torch.device("cpu"))
    return paths


def test_q8_code_is_exact_at_the_top_and_within_half_a_step():
    vals = -torch.rand(64, 16) * 12
    vals[:, 3] = 0
    codes, low = encode_q8(vals, torch.ones_like(vals, dtype=torch.bool))
    decoded = decode_q8(codes, low)
    assert (decoded[:, 3] == 0).all() and codes.dtype == torch.uint8
    step = low.float().abs().unsqueeze(-1) * (codes.float() + 0.25) / 255**2 + low.float().abs().unsqueeze(-1) / 1024
    assert ((decoded - vals).abs() <= step).all()


def test_q8_probabilities_and_stored_bound_on_a_confident_teacher():
    """Top-64 of 4,096, T in [1, 4]: the buckets still sum to 1 and every probability is within the
    measured value_max_error of the exact softmax (and that error is small: < 1e-2)."""
    from test_cache import confident_logits

    logits = confident_logits(256, 4096, seed=1)
    betas = temperature_grid(1.0, 4.0, 8)
    summary = summarize_logits(logits.float(), 64, betas, "q8")
    assert float(summary["value_max_error"]) < 1e-2
    for temperature in (1.0, 2.0, 4.0):
        p, tail = teacher_topk_probs(summary, betas, temperature)
        torch.testing.assert_close(p.sum(-1) + tail, torch.ones(256), atol=1e-5, rtol=0)
        exact = torch.softmax(logits / temperature, -1).gather(-1, summary["topk_ids"])
        assert (p.double() - exact).abs().max() <= float(summary["value_max_error"]) * 1.01


@pytest.mark.parametrize("kind", list(KINDS))
def test_verify_passes_and_the_docs_reader_agrees(caches, kind):
    lines = []
    verify_cache(caches[kind], report=lines.append)
    assert lines[-1].endswith(": ok")
    assert any("probability error bound" in line and line.endswith("ok") for line in lines)
    assert_docs_reader_agrees(caches[kind])


def test_inspect_prints_bytes_per_logit_or_per_token(caches):
    assert "bytes per logit" in inspect_cache(caches["q8"])
    report = inspect_cache(caches["sampled"])
    assert "bytes per token" in report and "unique sampled ids per position" in report


@pytest.mark.parametrize("kind", ["q8", "sampled-q8"])
def test_verify_fails_on_a_tampered_bound(caches, tmp_path, kind):
    path = tmp_path / "tampered.h5"
    path.write_bytes(caches[kind].read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["value_max_error"] = 5e-3  # below the 1e-2 limit, above what the stored values allow
        cache_format.seal_metadata(f)  # checksums rewritten too: the bound is still checked against the data
    with pytest.raises(UserError, match="value_max_error .* exceeds .* the most the stored values allow"):
        verify_cache(path, report=lambda *_: None)
    run = kdsweep_cli("cache", "verify", path, cwd=tmp_path)
    assert run.returncode == 2 and "value_max_error" in run.stderr + run.stdout


def test_verify_with_the_teacher_fails_on_a_bound_lowered_below_the_real_error(caches, tiny_pipeline, tmp_path):
    """The stored data cap the bound from above only; the teacher itself shows a bound lowered to flatter."""
    teacher = str(tiny_pipeline / "models/teacher")
    lines = []
    verify_cache(caches["q8"], teacher=teacher, report=lines.append)  # the writer's own bound holds
    assert lines[-1].endswith(": ok")
    path = tmp_path / "lowered.h5"
    path.write_bytes(caches["q8"].read_bytes())
    with h5py.File(path, "r+") as f:
        f.attrs["value_max_error"] = 1e-7
        cache_format.seal_metadata(f)  # checksums rewritten too: the teacher still shows the bound is too low
    with pytest.raises(UserError, match="below the error measured against a fresh forward"):
        verify_cache(path, teacher=teacher, report=lambda *_: None)


def test_q8_reads_close_to_fp16_and_sampled_counts_sum_to_the_draws(caches):
    fp16, q8 = TeacherLogitCache(caches["fp16"]), TeacherLogitCache(caches["q8"])
    assert int(fp16.attrs["format_version"]) == 2 and int(q8.attrs["format_version"]) == 3
    a, b = fp16.read([0, 3]), q8.read([0, 3])
    assert np.array_equal(a["topk_ids"], b["topk_ids"])
    pa, pb = teacher_topk_probs(a, fp16.betas, 2.0)[0], teacher_topk_probs(b, q8.betas, 2.0)[0]
    assert (pa - pb).abs().max() <= 2 * float(q8.attrs["value_max_error"]) + 1e-4
    sampled = TeacherLogitCache(caches["sampled"])
    batch = sampled.read([1, 2])
    assert (batch["sample_counts"].astype(int).sum(-1) == 32).all()
    assert batch["sample_temperature"].tolist() == [1.0, 1.0]


def test_cached_teacher_fn_weights_a_sampled_batch(caches):
    """At T = tau the weights are counts / N exactly; at T != tau they differ, and both keep padding at 0."""
    cache = TeacherLogitCache(caches["sampled-q8"])
    batch = batch_to_tensors(cache.read([0, 1]), torch.device("cpu"))
    counts = batch["sample_counts"][:, :-1].reshape(-1, 32).float()
    same = cached_teacher_fn(batch, cache.betas, 2.0)(0, 10)
    torch.testing.assert_close(same.weights, (counts / 32)[:10])
    other = cached_teacher_fn(batch, cache.betas, 1.0)(0, 10)
    assert not torch.allclose(other.weights, same.weights)
    assert (other.weights[counts[:10] == 0] == 0).all()


@pytest.mark.parametrize(
    "teacher",
    [{"cache_values": "q8"}, {"cache_mode": "sampled", "sample_draws": 16, "sample_temperature": 1.5}],
)
def test_distill_and_evaluate_read_the_new_caches(pipeline_copy, teacher):
    """The stages run unchanged on a q8 and on a sampled cache (loss.mode sampled at T = 2, proposal 1.5)."""
    from contextlib import chdir

    from kdsweep.stages import distill, evaluate, teacher_logits

    loss = {"mode": "sampled"} if teacher.get("cache_mode") == "sampled" else {}
    params = validate(tiny_params_dict(teacher=teacher, loss=loss, training={"max_steps": 2, "eval_steps": 2}))
    with chdir(pipeline_copy):
        teacher_logits.main(params)
        distill.main(params)
        scores = evaluate.main(params)
    assert np.isfinite(scores["val_loss"])
    assert np.isfinite(scores["test_ce"]) and np.isfinite(scores["test_kl"]) and scores["test_kl"] >= 0


# --------------------------------------------------------------------------- metadata checksums
# What the reader relies on in each kind of file (the attributes _read_header and the decoders use),
# besides whatever else the file holds: each must be covered.
READER_ATTRS = {
    "format_version",
    "top_k",
    "vocab_size",
    "betas",
    "temperature_range",
    "log_normalizer_quantum",
    "log_normalizer_max_error",
    "fingerprint",
    "complete",
    "sequence_offset",
}
READER_ATTRS_V3 = {"cache_mode", "cache_values", "value_max_error"}
READER_ATTRS_SAMPLED = {"sample_draws", "sample_temperature"}


def flip_one_bit(f: h5py.File, name: str) -> None:
    """Flip the lowest bit of an attribute's first byte of content, keeping its type and shape
    (for a float, the last bit of the mantissa: a value still in range, only slightly off)."""
    value = f.attrs[name]
    if isinstance(value, str):
        raw = bytearray(value.encode())
        raw[len(raw) // 2] ^= 0x01
        f.attrs[name] = raw.decode("utf-8", errors="surrogateescape")
        return
    a = np.array(value)
    a.reshape(-1).view(np.uint8)[0] ^= 0x01
    f.attrs[name] = a


@pytest.mark.parametrize("kind", ["fp16", "q8", "sampled-q8"])
def test_a_one_bit_flip_in_any_attribute_fails_verify_and_training_refuses_the_file(caches, tmp_path, kind):
    with h5py.File(caches[kind], "r") as f:
        names = sorted(f.attrs)
    wanted = READER_ATTRS | (READER_ATTRS_V3 if kind != "fp16" else set())
    wanted |= READER_ATTRS_SAMPLED if kind.startswith("sampled") else set()
    assert wanted <= set(names) and "metadata_sha256" in names
    for name in names:
        path = tmp_path / f"{kind}-{name}.h5"
        path.write_bytes(caches[kind].read_bytes())
        with h5py.File(path, "r+") as f:
            before = f.attrs[name]
            flip_one_bit(f, name)
            assert not np.array_equal(np.asarray(f.attrs[name]), np.asarray(before)), name
        with pytest.raises(UserError, match=rf"^{path}: .*(delete|regenerate|re-run)") as refused:
            TeacherLogitCache(path)  # what distill, evaluate and verify open
        assert name in str(refused.value) or name == "complete", str(refused.value)
        with pytest.raises(UserError, match=rf"^{path}: "):
            verify_cache(path, report=lambda *_: None)
    betas = tmp_path / "betas.h5"
    betas.write_bytes(caches[kind].read_bytes())
    with h5py.File(betas, "r+") as f:
        flip_one_bit(f, "betas")
    run = kdsweep_cli("cache", "verify", betas, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"error: {betas}: metadata checksum mismatch (attribute betas changed")


def test_a_cache_without_checksums_is_read_but_fails_verify(caches, tmp_path):
    """A file written before the checksums existed still trains (backward compatible); verify says to regenerate it."""
    path = tmp_path / "old.h5"
    path.write_bytes(caches["fp16"].read_bytes())
    with h5py.File(path, "r+") as f:
        del f.attrs["metadata_sha256"]
    assert TeacherLogitCache(path).num_sequences > 0
    with pytest.raises(UserError, match="metadata checksums: none stored .* regenerate it"):
        verify_cache(path, report=lambda *_: None)


def test_a_sampled_cache_for_one_temperature_passes_verify_and_trains_at_it(pipeline_copy):
    """temperature_range [1, 1] with 2 grid points: the normaliser for T = 1 only (the smallest
    sampled cache); verify passes with the teacher, distill weights the draws by their counts, and
    evaluate's KL at T = 1 is finite (T = 1 is in range)."""
    from contextlib import chdir

    from kdsweep.stages import distill, evaluate, teacher_logits

    one_t = {"temperature_range": [1.0, 1.0], "temperature_grid": 2, "sample_temperature": 1.0}
    teacher = {"cache_mode": "sampled", "cache_values": "q8", "sample_draws": 6, **one_t}
    params = validate(
        tiny_params_dict(
            teacher=teacher,
            loss={"mode": "sampled", "temperature": 1.0},
            training={"max_steps": 2, "eval_steps": 2},
        )
    )
    with chdir(pipeline_copy):
        teacher_logits.main(params)
        lines = []
        verify_cache(Path("data/teacher_logits/train.h5"), teacher="models/teacher", report=lines.append)
        assert lines[-1].endswith(": ok"), lines
        cache = TeacherLogitCache(Path("data/teacher_logits/train.h5"))
        batch = batch_to_tensors(cache.read([0, 1]), torch.device("cpu"))
        counts = batch["sample_counts"][:, :-1].reshape(-1, 6).float()
        torch.testing.assert_close(cached_teacher_fn(batch, cache.betas, 1.0)(0, 20).weights, (counts / 6)[:20])
        assert float(cache.attrs["log_normalizer_max_error"]) < 1e-3
        cache.close()
        distill.main(params)
        scores = evaluate.main(params)
    assert np.isfinite(scores["test_ce"]) and np.isfinite(scores["test_kl"]) and scores["test_kl"] >= 0
