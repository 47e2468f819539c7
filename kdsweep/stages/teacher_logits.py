"""Stage ``teacher_logits``: run the teacher once over every split and cache its top-k.

Writes ``data/teacher_logits/{train,validation,test}.h5`` (format: ``docs/cache-format.md``).
Every trial of a sweep reads these files instead of running the teacher.

Unfinished work is kept in ``data/teacher_logits.partial/``, outside the stage's output
(``dvc repro`` deletes an output before it runs the stage), so re-running an interrupted
stage resumes it. :mod:`kdsweep.cache.standalone` is the same run outside DVC (``kdsweep cache
generate --output-dir ...``): it prepares the data and the teacher pointer under the output directory.

On several devices (``teacher.cache_devices: N`` or ``--devices N``), :func:`on_devices`::

    start N processes of the same command with --shard i/N, process i on GPU i (CUDA_VISIBLE_DEVICES)
        (on a CPU machine: N processes sharing the cores); each logs to <out>.partial/logs/ (kept)
    a process fails -> stop the others, fail with its log's tail (re-running resumes every shard)
    merge each split's shards into <split>.h5 (virtual datasets, kdsweep.cache.writer.merge_shards)
    metrics over the merged caches
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kdsweep.cache.fingerprint import expected_fingerprint
from kdsweep.cache.format import GZIP_LEVEL, MAX_INTERPOLATION_ERROR, CacheLayout, temperature_grid
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.writer import generate, merge_shards, shard_files, shard_path
from kdsweep.config import Params, TeacherConfig
from kdsweep.data import SPLITS, Prepared, load_prepared
from kdsweep.errors import UserError
from kdsweep.fsio import write_json
from kdsweep.gpus import visible_gpus
from kdsweep.models import default_device, load_teacher, output_vocab_size


def layout_for(prepared: Prepared, teacher_dir: Path, params: Params, split: str) -> CacheLayout:
    """What the cache of ``split`` holds: top-k, temperature grid, vocabulary, sequence length, fingerprint."""
    cfg = params.teacher
    lo, hi = cfg.temperature_range
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    if cfg.top_k > vocab and cfg.cache_mode == "topk":
        raise UserError(f"teacher.top_k: {cfg.top_k} exceeds the vocabulary size {vocab}")
    sampled = cfg.cache_mode == "sampled"
    self_normalized = sampled and cfg.sample_weights == "self_normalized"
    return CacheLayout(
        cfg.sample_draws if sampled else cfg.top_k,
        np.empty(0) if self_normalized else temperature_grid(lo, hi, cfg.temperature_grid),
        vocab,
        prepared.split(split).shape[1],
        expected_fingerprint(prepared, teacher_dir, params, split),
        cfg.cache_mode,
        cfg.cache_values,
        cfg.sample_draws if sampled else 0,
        cfg.sample_temperature,
        "self_normalized" if self_normalized else "exact",
    )


def main(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    teacher_dir: Path = Path("models/teacher"),
    out: Path = Path("data/teacher_logits"),
    metrics_path: Path = Path("metrics/teacher_logits.json"),
    shard: tuple[int, int] | None = None,
) -> dict:
    """Generate (or resume) the cache for every split (``SPLITS``) in this process; return its metrics.

    The metrics are written to ``metrics_path`` for a whole cache; a shard only prints its own, since
    the shards of one cache run at the same time (the merge writes the metrics, :func:`on_devices`).
    """
    cfg = params.teacher
    prepared = load_prepared(prepared_dir)
    device = default_device()
    teacher = load_teacher(teacher_dir, cfg, device)
    vocab = prepared.meta["tokenizer"]["vocab_size"]
    rows = output_vocab_size(teacher)
    if rows < vocab:
        raise UserError(
            f"teacher: its LM head has {rows} rows but the tokenizer has {vocab} tokens; "
            "use the teacher's own tokenizer"
        )
    if rows > vocab:
        print(
            f"teacher_logits: LM head has {rows} rows for {vocab} tokens (padded vocabulary); "
            f"the {rows - vocab} padding rows are dropped"
        )
    out.mkdir(parents=True, exist_ok=True)
    partial_root = _partial_root(out)
    metrics = {}
    for split in SPLITS:
        layout = layout_for(prepared, teacher_dir, params, split)
        target = out / f"{split}.h5"
        name = shard_path(target, shard).name if shard else target.name
        path = generate(
            teacher,
            prepared.split(split),
            target,
            layout,
            batch_size=cfg.cache_batch_size,
            device=device,
            shard=shard,
            desc=f"teacher logits ({split})",
            partial_dir=partial_root / name,
            compression=GZIP_LEVEL if cfg.cache_compression == "gzip" else 0,
        )
        metrics[split] = split_metrics(path)
        if "log_normalizer_max_error" in metrics[split]:  # a self-normalised cache has no grid
            _warn_coarse_grid(path, metrics[split]["log_normalizer_max_error"], cfg)
        if shard is None:
            _drop_shards(path)
    if partial_root.is_dir() and not any(partial_root.iterdir()):
        partial_root.rmdir()
    if shard is None:
        write_json(metrics_path, metrics)
    print("teacher_logits:", json.dumps(metrics))
    return metrics


def _partial_root(out: Path) -> Path:
    """``data/teacher_logits`` -> ``data/teacher_logits.partial``: unfinished work, outside the stage's output."""
    work = out.absolute()
    return work.parent / f"{work.name}.partial"


def split_metrics(path: Path) -> dict:
    """Size and error bound of one split's cache file (a merged file counts its shards' bytes)."""
    c = TeacherLogitCache(path)
    try:
        tokens = c.num_sequences * c.seq_len
        size = sum((path.parent / name).stat().st_size for name in c.shards) if c.shards else path.stat().st_size
        return {
            "sequences": c.num_sequences,
            "bytes_per_token": round(size / tokens, 1),
            "bytes_per_logit": round(size / tokens / c.top_k, 3),
            **{
                key: float(c.attrs[key]) for key in ("log_normalizer_max_error", "log_prob_max_error") if key in c.attrs
            },
        }
    finally:
        c.close()


def _warn_coarse_grid(path: Path, bound: float, cfg: TeacherConfig) -> None:
    """Say so when the measured interpolation error exceeds the stated bound: `kdsweep cache verify` fails the file."""
    if bound > MAX_INTERPOLATION_ERROR:
        print(
            f"teacher_logits: warning: {path}: the log-normaliser interpolation error {bound:.2e} exceeds "
            f"{MAX_INTERPOLATION_ERROR:g}, so `kdsweep cache verify` fails this file; raise teacher.temperature_grid "
            f"(now {cfg.temperature_grid}) or narrow teacher.temperature_range (now {list(cfg.temperature_range)}) "
            "and regenerate",
            file=sys.stderr,
        )


def _drop_shards(path: Path) -> None:
    """Remove the shard files next to a whole (unmerged) cache file: an earlier run on several devices left them."""
    c = TeacherLogitCache(path)
    merged = bool(c.shards)
    c.close()
    for stale in [] if merged else shard_files(path):
        print(f"teacher_logits: removing {stale}: {path.name} is whole and does not read it")
        stale.unlink()


# --------------------------------------------------------------------------- several devices
def on_devices(
    command: list[str],
    n: int,
    out: Path = Path("data/teacher_logits"),
    metrics_path: Path = Path("metrics/teacher_logits.json"),
) -> dict:
    """Generate the cache as ``n`` shard processes, one per device, then merge them; return the metrics.

    ``command`` runs ``kdsweep cache generate`` with this run's options; process i adds ``--shard i/n``.
    """
    gpus = visible_gpus()
    if gpus and n > len(gpus):
        raise UserError(
            f"teacher.cache_devices (or --devices): {n} shard processes, one per GPU, but {len(gpus)} GPU(s) "
            f"are visible ({','.join(gpus)}); use at most {len(gpus)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob("*.shard-*-of-*.h5")):
        if not stale.name.endswith(f"-of-{n}.h5"):  # another shard count's files would not merge with these
            print(f"teacher_logits: removing {stale}, a shard of another shard count")
            stale.unlink()
    logs = _partial_root(out) / "logs"
    _run_shards(command, n, gpus[:n], logs)
    metrics = {split: split_metrics(merge_shards(out / f"{split}.h5")) for split in SPLITS}
    write_json(metrics_path, metrics)
    print(f"teacher_logits: merged {n} shards:", json.dumps(metrics))
    return metrics


def _run_shards(command: list[str], n: int, gpus: list[str], logs: Path) -> None:
    """Run ``command --shard i/n`` for every i at once, process i on ``gpus[i]`` (none: the CPU); fail on a failure."""
    logs.mkdir(parents=True, exist_ok=True)
    # On the CPU the processes share the cores rather than each starting a thread per core.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i in range(n):
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {"OMP_NUM_THREADS": threads})}
            log = logs / f"shard-{i}-of-{n}.log"
            with log.open("w") as f:
                procs.append((subprocess.Popen([*command, "--shard", f"{i}/{n}"], stdout=f, stderr=f, env=env), log))
        where = f"GPUs {','.join(gpus)}" if gpus else f"the CPU ({threads} thread(s) each)"
        print(f"teacher_logits: {n} shard processes on {where}; logs in {logs}/", flush=True)
        t0 = time.monotonic()
        while (codes := [p.poll() for p, _ in procs]) != [0] * n:
            failed = next((i for i, rc in enumerate(codes) if rc not in (None, 0)), None)
            if failed is not None:
                log = procs[failed][1]
                raise UserError(
                    f"teacher_logits: shard {failed}/{n} failed (exit {codes[failed]}); the end of its log {log}:\n"
                    f"{_log_tail(log)}\nRun the same command again: every shard resumes where it stopped."
                )
            time.sleep(0.5)
        print(f"teacher_logits: {n} shards done in {time.monotonic() - t0:.1f} s")
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.terminate()  # the finished batches stay; a re-run resumes from them
        for p, _ in procs:
            p.wait()


def _log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of a shard's log as a terminal shows them: of a progress bar's redraws, the last."""
    shown = [
        next((part for part in reversed(line.split("\r")) if part.strip()), "")
        for line in log.read_bytes().decode(errors="replace").split("\n")
    ]
    return "\n".join([line for line in shown if line.strip()][-lines:])
