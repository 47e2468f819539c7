"""The teacher-logit cache (the kdsweep.cache package and `kdsweep cache`): precision, coding, resume after
SIGKILL, refusal of bad files, fingerprints, padded vocabularies, shards, the CLI and the
documented plain-h5py reader. Real HDF5 files, the tiny pipeline's real teacher."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import chdir
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, tiny_params_dict, tiny_qwen3_moe
from typer.testing import CliRunner

from kdsweep.cache.cli import cache_app
from kdsweep.cache.format import (
    STORED,
    CacheLayout,
    _decode_torch,
    decode_log_normalizer,
    log_normalizer,
    reconstruct_full,
    summarize_logits,
    teacher_topk_probs,
    temperature_grid,
)
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.verify import inspect_cache, verify_cache
from kdsweep.cache.writer import generate, merge_shards
from kdsweep.config import TeacherConfig, validate
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.models import load_causal_lm

DEFAULT_GRID = TeacherConfig().temperature_grid


def confident_logits(n: int, v: int, seed: int, lifted: int = 8, low: float = 6.0, high: float = 16.0) -> torch.Tensor:
    """(n, V) float64 logits of a confident teacher: a Gaussian bulk, a Zipf prior over ids and
    ``lifted`` context tokens 6-16 above the bulk. With 8 lifted tokens the top-64 hold ~99% at
    T = 1 and the bulk overtakes them inside [1, 4]; with hundreds, the tail has a cluster of its own."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    lifts = low + (high - low) * torch.rand(n, lifted, generator=g, dtype=torch.float64)
    z.scatter_add_(-1, torch.randint(0, v, (n, lifted), generator=g), lifts)
    return z - 0.5 * torch.log(torch.arange(1, v + 1, dtype=torch.float64))


def stored(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {key: f[key][...] for key in STORED}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


def damage_chunk(path: Path, key: str, sequence: int) -> None:
    """Flip a byte in the middle of one sequence's chunk of ``key`` (one chunk per sequence)."""
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(sequence)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def kdsweep_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The real console entry point (``kdsweep.cli.main``, which turns a UserError into exit 2) in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from kdsweep.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def tiny_layout(root: Path, split: str = "validation", **teacher) -> tuple[object, np.ndarray, CacheLayout]:
    """The tiny pipeline's teacher, one split's sequences and the stage's layout for them."""
    from kdsweep.stages.teacher_logits import layout_for

    params = validate(tiny_params_dict(teacher=teacher) if teacher else tiny_params_dict())
    prepared = load_prepared(root / "data/prepared")
    model = load_causal_lm(root / "models/teacher").eval()
    return model, prepared.split(split), layout_for(prepared, root / "models/teacher", params, split)


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("lifted", [8, 300])
def test_confident_teacher_probabilities_and_tail_within_1e_3(temperature, lifted):
    """Vocabulary 4096, k = 64, the default grid: top-k probabilities and tail mass from the
    stored arrays equal a float64 softmax of the full logits within 1e-3, and the stored
    bound holds over the whole range, not only where it was measured."""
    logits = confident_logits(512, 4096, seed=lifted, lifted=lifted)
    betas = temperature_grid(1.0, 4.0, DEFAULT_GRID)
    summary = summarize_logits(logits.float(), 64, betas)
    p_cache, tail_cache = teacher_topk_probs(summary, betas, temperature)
    full = torch.softmax(logits.float().double() / temperature, dim=-1)
    p_true = full.gather(-1, summary["topk_ids"])
    assert (p_cache.double() - p_true).abs().max() < 1e-3
    assert (tail_cache.double() - (1 - p_true.sum(-1))).abs().max() < 1e-3
    assert torch.equal(summary["topk_ids"], full.topk(64, dim=-1).indices.sort(-1).values)

    bound = float(summary["max_error"])
    assert bound < 1e-3
    s = logits.float().double() - logits.float().double().max(-1, keepdim=True).values
    for t in np.linspace(1.0, 4.0, 25):
        exact = torch.logsumexp(s / t, dim=-1)
        approx = log_normalizer(summary["log_normalizer"], summary["log_normalizer_slope"], betas, 1 / t).double()
        assert (approx - exact).abs().max() <= 1.5 * bound + 1e-5, t


def test_decoding_is_bit_identical_to_what_the_writer_measured():
    logits = confident_logits(64, 512, seed=1)
    betas = temperature_grid(1.0, 4.0, 8)
    summary = summarize_logits(logits.float(), 32, betas)
    decoded = decode_log_normalizer(
        summary["tail_log_normalizer_residual"].numpy(), summary["log_normalizer_slope"].numpy(), betas
    )
    assert decoded.tobytes() == summary["tail_log_normalizer"].numpy().tobytes()
    torch.testing.assert_close(
        _decode_torch(summary["tail_log_normalizer_residual"], summary["log_normalizer_slope"], betas).float(),
        summary["tail_log_normalizer"],
        rtol=0,
        atol=0,
    )


def test_k_equal_vocab_has_an_empty_tail_and_exact_probabilities():
    logits = confident_logits(16, 48, seed=2)
    betas = temperature_grid(1.0, 4.0, 4)
    summary = summarize_logits(logits.float(), 48, betas)
    p, tail = teacher_topk_probs(summary, betas, 2.0)
    torch.testing.assert_close(p.sum(-1), torch.ones(16), atol=1e-3, rtol=0)
    assert tail.max() < 1e-30
    full = reconstruct_full(summary, betas, 2.0, 48)
    torch.testing.assert_close(full.sum(-1), torch.ones(16), atol=1e-3, rtol=0)


def test_reconstruct_full_keeps_the_top_k_and_spreads_the_tail():
    logits = confident_logits(8, 200, seed=3)
    betas = temperature_grid(1.0, 4.0, 8)
    summary = summarize_logits(logits.float(), 16, betas)
    full = reconstruct_full(summary, betas, 1.5, 200)
    p, tail = teacher_topk_probs(summary, betas, 1.5)
    torch.testing.assert_close(full.gather(-1, summary["topk_ids"]), p)
    torch.testing.assert_close(full.sum(-1), torch.ones(8), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- reader
def test_reader_lazy_in_memory_and_stored_arrays_agree(tiny_pipeline, tmp_path):
    path = tiny_pipeline / "data/teacher_logits/validation.h5"
    lazy, memory = TeacherLogitCache(path), TeacherLogitCache(path, in_memory=True)
    idx = [5, 0, 17, 5]
    a, b = lazy.read(idx), memory.read(idx)
    assert_same_arrays(a, b)
    raw = lazy.read_stored(idx)
    assert np.array_equal(a["topk_ids"], np.cumsum(raw["topk_id_deltas"].astype(np.int64), -1))
    assert (np.diff(a["topk_ids"], axis=-1) > 0).all() and a["topk_ids"].max() < lazy.vocab_size
    assert a["log_normalizer"].shape[-1] == len(lazy.betas) + lazy.top_k
    with pytest.raises(IndexError):
        lazy.read([lazy.num_sequences])
    # teacher.cache_compression: none stores the same bytes without gzip.
    model, seqs, layout = tiny_layout(tiny_pipeline)
    plain = generate(
        model, seqs, tmp_path / "validation.h5", layout, batch_size=8, device=torch.device("cpu"), compression=0
    )
    with h5py.File(plain) as f:
        assert f["topk_logits"].compression is None and f["topk_logits"].fletcher32
    assert_same_arrays(TeacherLogitCache(plain).read(idx), a)
    with pytest.raises(UserError, match=r"loss\.temperature: 5\.0 is outside the temperature range \[1, 4\]"):
        lazy.check_temperature(5.0)
    lazy.close()


def test_truncated_incomplete_and_corrupt_files_are_refused(tiny_pipeline, tmp_path):
    src = tiny_pipeline / "data/teacher_logits/validation.h5"
    truncated = tmp_path / "truncated.h5"
    data = src.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(
        UserError,
        match=rf"{truncated}: not a readable HDF5 file .*truncated or corrupt.*"
        r"delete it and re-run `dvc repro teacher_logits`",
    ):
        TeacherLogitCache(truncated)

    incomplete = tmp_path / "incomplete.h5"
    shutil.copy(src, incomplete)
    with h5py.File(incomplete, "r+") as f:
        del f.attrs["complete"]
    with pytest.raises(
        UserError,
        match=rf"{incomplete}: incomplete teacher-logit cache.*re-run "
        r"`dvc repro teacher_logits`.*to resume it",
    ):
        TeacherLogitCache(incomplete)

    corrupt = tmp_path / "corrupt.h5"
    shutil.copy(src, corrupt)
    damage_chunk(corrupt, "topk_logits", 3)
    with pytest.raises(UserError, match=rf"{corrupt}: cannot read sequences .*fletcher32.*kdsweep cache verify"):
        TeacherLogitCache(corrupt).read([3])
    with pytest.raises(UserError, match=r"verify failed:\n  checksums: sequences .* cannot be read.*\nfix: delete"):
        verify_cache(corrupt, report=lambda *_: None)


def test_cli_verify_exits_2_naming_the_file_and_the_fix(tiny_pipeline, tmp_path):
    bad = tmp_path / "train.h5"
    bad.write_bytes((tiny_pipeline / "data/teacher_logits/validation.h5").read_bytes()[:5000])
    proc = kdsweep_cli("cache", "verify", bad, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "re-run `dvc repro teacher_logits`" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def drop_dataset(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["topk_logits"]


def flip_byte_1247(path: Path) -> None:
    """In the tiny pipeline's validation cache, byte 1247 is in the root group's symbol table:
    the name offset of a link, which then points outside the group's name heap."""
    raw = bytearray(path.read_bytes())
    raw[1247] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [drop_dataset, flip_byte_1247])
def test_cli_verify_exits_2_on_a_missing_dataset_or_damaged_metadata(tiny_pipeline, tmp_path, damage):
    bad = tmp_path / "validation.h5"
    shutil.copy(tiny_pipeline / "data/teacher_logits/validation.h5", bad)
    damage(bad)
    proc = kdsweep_cli("cache", "verify", bad, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    message = proc.stderr.strip()
    assert message.startswith(f"error: {bad}: ") and "topk_logits" in message and len(message.splitlines()) == 1
    assert "delete it and re-run `dvc repro teacher_logits`" in message


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: f.attrs.__delitem__("top_k"), "attribute top_k"),
        (lambda f: f.attrs.__setitem__("fingerprint", "{not json"), "attribute fingerprint"),
        (lambda f: f.attrs.__setitem__("betas", "1.0"), "attribute betas"),
    ],
)
def test_damaged_attributes_are_refused_naming_the_file_and_the_fix(tiny_pipeline, tmp_path, damage, named):
    bad = tmp_path / "validation.h5"
    shutil.copy(tiny_pipeline / "data/teacher_logits/validation.h5", bad)
    with h5py.File(bad, "r+") as f:
        damage(f)
    with pytest.raises(UserError, match=rf"^{bad}: .*{named}.*delete it and re-run `dvc repro teacher_logits`"):
        inspect_cache(bad)


def test_verify_gives_the_fix_instead_of_running_verify_again(tiny_pipeline, tmp_path):
    """A file verify cannot open, and a bad chunk in a sequence the top-1 check re-runs."""
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes((tiny_pipeline / "data/teacher_logits/validation.h5").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"delete it and re-run `dvc repro teacher_logits`") as refused:
        verify_cache(truncated, report=lambda *_: None)
    assert "kdsweep cache verify" not in str(refused.value)
    corrupt = tmp_path / "corrupt.h5"
    shutil.copy(tiny_pipeline / "data/teacher_logits/validation.h5", corrupt)
    damage_chunk(corrupt, "topk_logits", 0)  # the top-1 sample always includes sequence 0
    lines = []
    with pytest.raises(UserError, match=r"verify failed:\n  checksums: .*\nfix: delete") as failed:
        verify_cache(corrupt, teacher=str(tiny_pipeline / "models/teacher"), report=lines.append)
    assert "kdsweep cache verify" not in str(failed.value)
    assert any("top-1 agreement" in line and "ok" in line for line in lines)


def test_one_bad_chunk_is_reported_by_its_sequence(tiny_pipeline, tmp_path):
    corrupt = tmp_path / "validation.h5"
    shutil.copy(tiny_pipeline / "data/teacher_logits/validation.h5", corrupt)
    damage_chunk(corrupt, "tail_log_normalizer_residual", 11)
    lines = []
    with pytest.raises(UserError) as failed:
        verify_cache(corrupt, report=lines.append)
    problems = str(failed.value).splitlines()[1:-1]
    assert problems == [
        "  checksums: sequences that cannot be read, a chunk failing its fletcher32 checksum or decompression: "
        "11 (tail_log_normalizer_residual)"
    ]
    assert any("sanity: top-k ids < vocab_size and strictly ascending: ok" in line for line in lines)
    with pytest.raises(
        UserError,
        match=r"cannot read sequences \[10, 11, 12\]: the tail_log_normalizer_residual "
        r"chunk of sequence 11 fails its fletcher32 checksum",
    ):
        TeacherLogitCache(corrupt).read([10, 11, 12])


# --------------------------------------------------------------------------- resume after SIGKILL
def _generation_job(model, seqs, path, layout, partial_dir, delay):
    """Runs in a forked child: the real writer, each batch slowed down so the parent can kill it mid-run."""
    import kdsweep.cache.writer as cache

    torch.set_num_threads(1)
    summary = cache.teacher_batch_summary

    def slow(*args, **kwargs):
        time.sleep(delay)
        return summary(*args, **kwargs)

    cache.teacher_batch_summary = slow
    cache.generate(model, seqs, path, layout, batch_size=2, device=torch.device("cpu"), partial_dir=partial_dir)


def test_generation_killed_three_times_resumes_bit_identical(tiny_pipeline, tmp_path):
    """SIGKILL at three random points (after some batch files exist, sometimes mid-batch),
    re-run to completion: every dataset equals an uninterrupted run's bit for bit, and verify passes."""
    model, seqs, layout = tiny_layout(tiny_pipeline)
    reference = generate(
        model, seqs, tmp_path / "ref/validation.h5", layout, batch_size=2, device=torch.device("cpu"), desc="reference"
    )
    path, partial = tmp_path / "run/validation.h5", tmp_path / "run.partial/validation.h5"
    path.parent.mkdir()
    n_batches = -(-len(seqs) // 2)
    rng = random.Random(1234)
    ctx = multiprocessing.get_context("fork")
    done = 0
    for kill_at in sorted(rng.sample(range(2, n_batches - 1), 3)):
        child = ctx.Process(target=_generation_job, args=(model, seqs, path, layout, partial, 0.03))
        child.start()
        deadline = time.monotonic() + 30
        while len(list(partial.glob("batch-?????????.npz"))) < max(kill_at, done + 1):
            assert child.is_alive() and time.monotonic() < deadline, "generation ended before it was killed"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # sometimes mid-batch, sometimes mid-write
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        assert not path.exists()  # nothing is visible before the end
        done = len(list(partial.glob("batch-?????????.npz")))
        assert 0 < done < n_batches
    # A batch file damaged on disk is named, removed and recomputed by the next run.
    damaged = sorted(partial.glob("batch-?????????.npz"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"{damaged}: damaged batch file .*run the same command again"):
        generate(model, seqs, path, layout, batch_size=2, device=torch.device("cpu"), partial_dir=partial)
    assert not damaged.exists() and not path.exists()
    child = ctx.Process(target=_generation_job, args=(model, seqs, path, layout, partial, 0.0))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert not partial.exists()
    assert_same_arrays(stored(path), stored(reference))
    with h5py.File(path) as a, h5py.File(reference) as b:
        assert dict(a.attrs).keys() == dict(b.attrs).keys()
        assert a.attrs["log_normalizer_max_error"] == b.attrs["log_normalizer_max_error"]
    lines = []
    verify_cache(path, teacher=str(tiny_pipeline / "models/teacher"), report=lines.append)
    assert lines[-1] == f"{path}: ok"
    assert any("top-1 agreement" in line and "ok" in line for line in lines)


@pytest.mark.slow
def test_cli_generate_killed_three_times_resumes_bit_identical(tmp_path):
    """The same through `kdsweep cache generate --output-dir` in real subprocesses (standalone mode)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    out = tmp_path / "cache"
    cmd = [
        sys.executable,
        "-c",
        "from kdsweep.cli import main; main()",
        "cache",
        "generate",
        "--params",
        str(params),
        "--dataset",
        "builtin",
        "--max-samples",
        "24",
        "--batch-size",
        "2",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    partial = tmp_path / "cache.partial/train.h5"
    rng = random.Random(7)
    for kill_at in sorted(rng.sample(range(50, 900), 3)):
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(partial.glob("batch-?????????.npz"))) < kill_at:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "train.h5").exists()
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True)
    resumed = {split: stored(out / f"{split}.h5") for split in ("train", "validation")}
    for split in ("train", "validation"):
        (out / f"{split}.h5").unlink()
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True)  # uninterrupted, same teacher
    for split in ("train", "validation"):
        assert_same_arrays(resumed[split], stored(out / f"{split}.h5"))
    verify_cache(out / "train.h5", report=lambda *_: None)


def test_a_grid_too_coarse_for_the_bound_is_said_at_generation(pipeline_copy, capsys):
    """The stage writes the file (the measured bound is stored) and says that verify will fail it, and the fix."""
    from kdsweep.stages import teacher_logits

    params = validate(tiny_params_dict(teacher={"temperature_grid": 2, "temperature_range": [0.1, 10.0]}))
    shutil.rmtree(pipeline_copy / "data" / "teacher_logits")
    with chdir(pipeline_copy):
        metrics = teacher_logits.main(params)
    err = capsys.readouterr().err
    assert metrics["train"]["log_normalizer_max_error"] > 1e-3
    assert "interpolation error" in err and "kdsweep cache verify" in err
    assert "raise teacher.temperature_grid (now 2) or narrow teacher.temperature_range (now [0.1, 10.0])" in err


# --------------------------------------------------------------------------- fingerprint
def test_training_refuses_a_cache_made_with_another_tokenizer(pipeline_copy):
    from kdsweep.stages import distill, prepare

    params = validate(tiny_params_dict(tokenizer={"vocab_size": 300}))
    with chdir(pipeline_copy):
        prepare.main(params)
        with pytest.raises(
            UserError,
            match=r"made from different inputs:(.|\n)*tokenizer_sha256: cache has .*"
            r"(.|\n)*vocab_size: cache has 320, config has 300",
        ):
            distill.main(params, run_dir=pipeline_copy / "runs/distill")


# --------------------------------------------------------------------------- padded vocabulary
def _padded_teacher(tmp_path: Path, pad: int):
    """A local Hugging Face teacher whose LM head has ``pad`` rows more than its tokenizer has
    tokens, the padding rows rigged to win every argmax if they were not dropped."""

    from kdsweep.config import TokenizerConfig
    from kdsweep.data import builtin_documents, train_bpe_tokenizer

    tok = train_bpe_tokenizer(builtin_documents()[:12], TokenizerConfig(vocab_size=300), 32)
    model = tiny_qwen3_moe(len(tok) + pad, tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    with torch.no_grad():  # +-w: one of each pair points along (almost) every normalised hidden state
        signs = torch.tensor([1.0, -1.0]).repeat(pad // 2)[:, None]
        model.lm_head.weight[len(tok) :] = 20 * model.model.norm.weight * signs
    model.save_pretrained(tmp_path / "teacher_model")
    tok.save_pretrained(tmp_path / "teacher_model")
    return tmp_path / "teacher_model", len(tok)


def test_standalone_generate_with_a_padded_vocabulary_teacher(tmp_path):
    """`cache generate` with the reference script's options on a local teacher whose LM head
    is padded: padding rows are dropped, probabilities are over the tokenizer's tokens, and
    verify (finding the teacher through the fingerprint) passes."""
    teacher_dir, vocab = _padded_teacher(tmp_path, pad=24)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    out = tmp_path / "out"
    argv = ["generate", "--params", str(params), "--teacher-model", str(teacher_dir), "--dataset", "builtin"]
    argv += ["--max-samples", "8", "--top-k", "8", "--batch-size", "4", "--output-dir", str(out)]
    result = CliRunner().invoke(cache_app, argv)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "padding rows are dropped" in result.output
    for name in (
        "prepared/meta.json",
        "teacher/teacher.json",
        "train.h5",
        "validation.h5",
        "metrics/teacher_logits.json",
    ):
        assert (out / name).exists(), name
    cache = TeacherLogitCache(out / "validation.h5")
    assert cache.vocab_size == vocab and cache.top_k == 8
    assert cache.fingerprint["teacher"] == {"model": str(teacher_dir), "revision": None}
    batch = cache.read([0, 1])
    assert batch["topk_ids"].max() < vocab
    model = load_causal_lm(teacher_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long)).logits
    assert logits.shape[-1] == vocab + 24 and (logits.argmax(-1) >= vocab).float().mean() > 0.9  # rigged rows win...
    for t in (1.0, 3.0):
        p_true = torch.softmax(logits[..., :vocab].double() / t, -1)  # ...but the cache never saw them
        p_cache, tail = teacher_topk_probs(batch, cache.betas, t)
        ids = torch.as_tensor(batch["topk_ids"], dtype=torch.long)
        assert (p_cache.double() - p_true.gather(-1, ids)).abs().max() < 1e-3
        assert (tail.double() - (1 - p_true.gather(-1, ids).sum(-1))).abs().max() < 1e-3
    lines = []
    verify_cache(out / "validation.h5", report=lines.append)
    assert any(f"top-1 agreement with a fresh forward of {teacher_dir}" in line and "100.00%" in line for line in lines)
    # Run again: prepared data and teacher are reused, the caches are up to date.
    again = CliRunner().invoke(cache_app, argv)
    assert again.exit_code == 0 and "up to date" in again.output


# --------------------------------------------------------------------------- shards
def test_two_shards_merged_read_back_identical_to_one_run(tiny_pipeline, tmp_path):
    model, seqs, layout = tiny_layout(tiny_pipeline)
    whole = generate(model, seqs, tmp_path / "whole/validation.h5", layout, batch_size=4, device=torch.device("cpu"))
    shard_dir = tmp_path / "a/sharded"
    for i in (1, 0):  # separately, in any order
        generate(
            model, seqs, shard_dir / "validation.h5", layout, batch_size=4, device=torch.device("cpu"), shard=(i, 2)
        )
    with pytest.raises(UserError, match="validation.h5: no shard files"):
        merge_shards(tmp_path / "whole/validation.h5")
    result = CliRunner().invoke(cache_app, ["merge", str(shard_dir)])
    assert result.exit_code == 0, result.output

    reference = TeacherLogitCache(whole)
    idx = list(range(reference.num_sequences))
    expected = reference.read(idx)
    # Moved as a directory and read from another working directory.
    moved = tmp_path / "b/moved"
    moved.parent.mkdir()
    shard_dir.rename(moved)
    with chdir(tmp_path / "b"):
        merged = TeacherLogitCache(Path("moved/validation.h5"))
        assert merged.shards == ["validation.shard-0-of-2.h5", "validation.shard-1-of-2.h5"]
        assert_same_arrays(merged.read(idx), expected)
        assert_same_arrays(TeacherLogitCache(Path("moved/validation.h5"), in_memory=True).read(idx), expected)
        assert merged.fingerprint == reference.fingerprint
        assert merged.attrs["log_normalizer_max_error"] == reference.attrs["log_normalizer_max_error"]
        verify_cache(Path("moved/validation.h5"), teacher=str(tiny_pipeline / "models/teacher"), report=lambda *_: None)
        assert "2 shards" in inspect_cache(Path("moved/validation.h5"))
        merged.close()
    # Plain h5py reads the merged file too.
    with h5py.File(moved / "validation.h5", "r") as f:
        assert np.array_equal(f["input_ids"][...], expected["input_ids"])
    (moved / "validation.shard-1-of-2.h5").unlink()
    with pytest.raises(UserError, match=r"merged cache, but its shard .*validation.shard-1-of-2.h5 is missing"):
        TeacherLogitCache(moved / "validation.h5")


# --------------------------------------------------------------------------- CLI reports
def test_verify_and_inspect_report_every_check(tiny_pipeline):
    path = tiny_pipeline / "data/teacher_logits/train.h5"
    lines = []
    with chdir(tiny_pipeline):
        verify_cache(Path("data/teacher_logits/train.h5"), params_path=Path("params.yaml"), report=lines.append)
    text = "\n".join(lines)
    for expected in (
        "completeness: ok",
        "fletcher32 verified",
        "strictly ascending: ok",
        "tail below the top-k",
        "sum to <= 1 + 0.002 at T = 1, 4: ok",
        "interpolation error bound",
        "fingerprint vs params.yaml",
        "input_ids vs data/prepared/train.npy: ok (aligned)",
        "top-1 agreement",
        "train.h5: ok",
    ):
        assert expected in text, expected
    report = inspect_cache(path)
    for expected in (
        "bytes per token",
        "bytes per logit",
        "topk_id_deltas",
        "gzip(4)+shuffle+fletcher32",
        "top-16 probability mass at T=1",
        "temperature range [1, 4]",
        "error bound",
        "tokenizer_sha256",
    ):
        assert expected in report, expected
    assert len(re.findall(r"^  \[0\.\d, [01]\.\d[)\]]", report, flags=re.M)) == 10  # the histogram


def test_verify_against_params_names_the_differing_field(tiny_pipeline, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(teacher={"top_k": 8})))
    with (
        chdir(tiny_pipeline),
        pytest.raises(
            UserError,
            match=r"fingerprint: differs from .*top_k: cache has 16, "
            r"config has 8(.|\n)*fix: delete",
        ),
    ):
        verify_cache(Path("data/teacher_logits/validation.h5"), params_path=params, report=lambda *_: None)


# --------------------------------------------------------------------------- the documented reader
def docs_reader() -> dict:
    """The namespace of the docs' plain-h5py reader (``read_sequence``)."""
    doc = (REPO / "docs/cache-format.md").read_text()
    code = re.search(r"## Reading with plain h5py.*?```python\n(.*?)```", doc, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/cache-format.md", "exec"), namespace)
    return namespace


def assert_docs_reader_agrees(path: Path) -> None:
    """The docs' reader and TeacherLogitCache give the same ids, probabilities and tail at three temperatures."""
    read_sequence = docs_reader()["read_sequence"]
    cache = TeacherLogitCache(path)
    for n, temperature in ((0, 1.0), (7, 2.5), (cache.num_sequences - 1, 4.0)):
        input_ids, ids, probs, tail, counts = read_sequence(str(path), n, temperature)
        batch = cache.read([n])
        p, t = teacher_topk_probs(batch, cache.betas, temperature)
        assert np.array_equal(input_ids, batch["input_ids"][0]) and np.array_equal(ids, batch["topk_ids"][0])
        assert (counts is None) == (cache.mode == "topk")
        if counts is not None:
            assert np.array_equal(counts, batch["sample_counts"][0])
        np.testing.assert_allclose(probs, p[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(tail, t[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(probs.sum(-1) + tail, 1.0, atol=1e-6)
    cache.close()


def test_plain_h5py_example_in_the_docs_reads_the_cache(tiny_pipeline):
    assert_docs_reader_agrees(tiny_pipeline / "data/teacher_logits/validation.h5")
