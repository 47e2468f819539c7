"""Writing caches: run the teacher over sequences, save each batch, assemble the HDF5 file; merge shards.

    generate(model, input_ids, path, layout):
        for each batch of the file's sequences not yet in <path>.partial/:
            run the teacher, summarize its logits (format.summarize_logits)
            save the batch as batch-<start>.npz (atomically: a kill loses at most this batch)
        assemble <path> from the batches, set "complete" last, rename it into place
    merge_shards(path):
        check that the shard files next to path fit together (fingerprint, grid, no gaps)
        write path as HDF5 virtual datasets over them (it stores no data itself)

The format itself (datasets, attributes, coding) is in :mod:`kdsweep.cache.format`.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
from tqdm import tqdm

from kdsweep.cache.fingerprint import diff_fingerprints
from kdsweep.cache.format import (
    GZIP_LEVEL,
    LOG_NORMALIZER_QUANTUM,
    METADATA_CHECKSUMS,
    CacheLayout,
    ids_dtype,
    ids_to_deltas,
    seal_metadata,
    stored_dtypes,
    summarize_log_probs,
    summarize_logits,
)
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.errors import UserError
from kdsweep.fsio import atomic_path, write_json

# Virtual (merged) datasets read these where a shard is missing, so a silent gap cannot
# look like data: ids out of range, NaN logits.
_VDS_FILL = {
    "input_ids": -1,
    "topk_id_deltas": None,
    "topk_logits": np.nan,
    "topk_logit_codes": None,
    "topk_logit_min": np.nan,
    "sample_id_deltas": None,
    "sample_counts": None,
    "sample_logits": np.nan,
    "sample_logit_codes": None,
    "sample_logit_min": np.nan,
    "sample_log_probs": np.nan,
    "sample_log_prob_codes": None,
    "sample_log_prob_min": np.nan,
    "tail_log_normalizer_residual": np.iinfo(np.int32).min,
    "tail_log_normalizer_slope": np.nan,
}


class Span(NamedTuple):
    """The sequences [start, stop) of ``total`` that one file holds; ``shard`` is (i, n) or None."""

    start: int
    stop: int
    total: int
    shard: tuple[int, int] | None


class ShardFile(NamedTuple):
    """One shard file of a merge, opened, with the first sequence it holds."""

    offset: int
    cache: TeacherLogitCache


# --------------------------------------------------------------------------- teacher
def teacher_logits_chunks(model, input_ids: torch.Tensor, vocab_size: int, chunk_tokens: int):
    """Teacher logits (T_chunk, V) for the flattened batch, a chunk of positions at a time.

    Only the decoder runs on the whole batch; the LM head runs per chunk, so no
    (B, L, V) tensor is ever built. Rows of a padded LM head beyond ``vocab_size`` are dropped.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    head = model.get_output_embeddings()
    for start in range(0, hidden.shape[0], chunk_tokens):
        yield head(hidden[start : start + chunk_tokens])[:, :vocab_size]


# Stored dataset -> the key of format.summarize_logits that holds it (the prefix is the layout's).
_SUMMARY_KEYS = {
    "id_deltas": "topk_ids",
    "counts": "sample_counts",
    "logits": "topk_logits",
    "logit_codes": "topk_logit_codes",
    "logit_min": "topk_logit_min",
    "log_probs": "sample_log_probs",
    "log_prob_codes": "sample_log_prob_codes",
    "log_prob_min": "sample_log_prob_min",
    "tail_log_normalizer_residual": "tail_log_normalizer_residual",
    "tail_log_normalizer_slope": "log_normalizer_slope",
}
SAMPLE_SEED = 0x5EED  # sampled caches: batch i draws from a generator seeded (SAMPLE_SEED, first sequence)


def _summary_key(stored: str) -> str:
    return _SUMMARY_KEYS[stored.removeprefix("topk_").removeprefix("sample_")]


def summary_chunk_tokens(vocab_size: int, device_type: str) -> int:
    """Positions per chunk of the LM head and the summary: bounded memory at any vocabulary.

    ~16M logits per chunk on a CPU. On a GPU the summary's ~1,300 small kernels per chunk are
    bound by their launches below about a thousand positions (``bench/gpu_profile.py`` on an
    H200, V = 151,936: 110 positions per chunk took 11x the time of 1,024), so a chunk there
    holds ~134M logits (883 positions at V = 151,936, 0.5 GB per float32 copy).
    """
    budget = 2**27 if device_type == "cuda" else 2**24
    return max(1, min(4096, budget // vocab_size))


@torch.no_grad()
def teacher_batch_summary(
    model, input_ids: torch.Tensor, layout: CacheLayout, chunk_tokens: int | None = None, first_sequence: int = 0
) -> dict:
    """Run the teacher on (B, L) ``input_ids`` and return the stored arrays (numpy) plus ``max_error``
    and ``value_max_error``. A sampled cache draws from a generator seeded by ``first_sequence``, so a
    batch's draws do not depend on sharding or resuming."""
    if chunk_tokens is None:
        chunk_tokens = summary_chunk_tokens(layout.vocab_size, input_ids.device.type)
    sampling = None
    if layout.mode == "sampled":
        generator = torch.Generator(device=input_ids.device).manual_seed(SAMPLE_SEED * 2**32 + first_sequence)
        sampling = (layout.sample_draws, layout.sample_temperature, generator)
    chunks = teacher_logits_chunks(model, input_ids, layout.vocab_size, chunk_tokens)
    if layout.self_normalized:
        parts = [summarize_log_probs(lg, layout.values, sampling) for lg in chunks]
    else:
        parts = [summarize_logits(lg, layout.top_k, layout.betas, layout.values, sampling) for lg in chunks]
    b, length = input_ids.shape

    def cat(key):
        return torch.cat([p[key] for p in parts]).reshape(b, length, -1).cpu().numpy()

    out = {}
    for name in layout.stored[1:]:
        arr = cat(_summary_key(name))
        if name.endswith("_id_deltas"):
            arr = ids_to_deltas(arr.astype(ids_dtype(layout.vocab_size)))
        elif name == "sample_counts":
            arr = arr.astype(np.uint8)  # draws <= 255 (teacher.sample_draws)
        elif name.endswith("_min"):
            arr = arr[..., 0]
        out[name] = arr
    return out | {key: float(max(p[key] for p in parts)) for key in ("max_error", "value_max_error")}


# --------------------------------------------------------------------------- shards
def shard_range(num_sequences: int, shard: tuple[int, int] | None, batch_size: int) -> tuple[int, int]:
    """Sequences [start, stop) of shard i of n; boundaries fall on whole batches so that
    sharded and unsharded runs put the same sequences in the same batches (bit-identical output)."""
    if shard is None:
        return 0, num_sequences
    i, n = shard
    batches = -(-num_sequences // batch_size)
    start = min(num_sequences, (batches * i // n) * batch_size)
    stop = min(num_sequences, (batches * (i + 1) // n) * batch_size)
    return start, stop


def shard_path(path: Path, shard: tuple[int, int]) -> Path:
    """``train.h5`` -> ``train.shard-0-of-4.h5``."""
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


def shard_files(path: str | Path) -> list[Path]:
    """The shard files ``<stem>.shard-I-of-N<suffix>`` next to ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))


# --------------------------------------------------------------------------- generate
def _is_finished(path: Path, layout: CacheLayout, compression: int) -> bool:
    """An existing complete file made from the same inputs, layout and compression (nothing to do)."""
    try:
        with h5py.File(path, "r") as f:
            return (
                bool(f.attrs.get("complete", False))
                and int(f.attrs.get("format_version", -1)) == layout.version
                and json.loads(f.attrs["fingerprint"]) == layout.fingerprint
                and np.array_equal(f.attrs.get("betas", np.empty(0)), layout.betas)
                and int(f.attrs["top_k"]) == layout.top_k
                and (f[layout.stored[1]].compression_opts or 0) == compression
            )
    except (OSError, KeyError, ValueError):
        return False


def generate(
    model,
    input_ids: np.ndarray,
    path: str | Path,
    layout: CacheLayout,
    *,
    batch_size: int,
    device: torch.device,
    shard: tuple[int, int] | None = None,
    desc: str = "teacher logits",
    partial_dir: str | Path | None = None,
    compression: int = GZIP_LEVEL,
) -> Path:
    """Write the cache for ``input_ids`` (N, L) to ``path``; resumable, atomic at the end.

    Each finished batch is saved as its own small file under ``partial_dir`` (default
    ``<path>.partial/``; written to a temporary name, then renamed), so a run killed at any
    moment loses at most the batch in flight; re-running skips the finished batches. Only
    when every batch is done is the HDF5 file assembled under a temporary name, marked
    complete and renamed into place, so a reader never sees a half-written cache. A
    complete file made from the same inputs is left as it is.

    ``compression`` is the gzip level, 0 for none (see :func:`dataset_options`). Returns the
    path written (the shard's own name with ``shard``).
    """
    path = Path(path)
    if shard is not None:
        path = shard_path(path, shard)
    if _is_finished(path, layout, compression):
        print(f"{path}: complete and up to date")
        return path
    span = Span(*shard_range(len(input_ids), shard, batch_size), len(input_ids), shard)
    partial = Path(partial_dir) if partial_dir is not None else path.with_name(path.name + ".partial")
    meta = {
        "fingerprint": layout.fingerprint,
        "batch_size": batch_size,
        "range": [span.start, span.stop],
        "betas": layout.betas.tolist(),
        "top_k": layout.top_k,
        "format_version": layout.version,
    }
    _open_partial(partial, meta)
    batch_starts = list(range(span.start, span.stop, batch_size))
    todo = [s for s in batch_starts if not _batch_file(partial, s).exists()]
    if len(todo) < len(batch_starts):
        print(f"{path.name}: resuming, {len(batch_starts) - len(todo)} of {len(batch_starts)} batches already done")
    for s in tqdm(todo, desc=desc, unit="batch", dynamic_ncols=True):
        ids = torch.as_tensor(input_ids[s : min(s + batch_size, span.stop)], dtype=torch.long, device=device)
        summary = teacher_batch_summary(model, ids, layout, first_sequence=s)
        errors = {key: np.float32(summary.pop(key)) for key in ("max_error", "value_max_error")}
        with atomic_path(_batch_file(partial, s)) as tmp, open(tmp, "wb") as out:
            np.savez(out, **errors, **summary)

    dtype = next(p.dtype for p in model.parameters()) if hasattr(model, "parameters") else None
    info = {"teacher_dtype": str(dtype).removeprefix("torch."), "device": device.type}
    _assemble(path, partial, input_ids[span.start : span.stop], span, batch_starts, layout, compression, info)
    shutil.rmtree(partial)
    return path


def _batch_file(partial: Path, start: int) -> Path:
    return partial / f"batch-{start:09d}.npz"


def _open_partial(partial: Path, meta: dict) -> None:
    """The work directory of a run with these settings: kept when it has them, emptied otherwise."""
    meta_file = partial / "meta.json"
    if partial.exists():
        try:
            same = json.loads(meta_file.read_text()) == meta
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"{partial}: left by a run with other settings; starting over")
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(meta_file, meta)


def dataset_options(compression: int) -> dict:
    """Filters of every dataset: shuffle + gzip at level ``compression`` (readable by any HDF5
    build; 0 = neither: files 1.8x larger, lazy reads 2-3x faster, inflating being most of the
    cost of a read), and a fletcher32 checksum per chunk. Chunks are one sequence each (the callers)."""
    if compression == 0:  # shuffling only helps a compressor
        return {"fletcher32": True}
    return {"shuffle": True, "compression": "gzip", "compression_opts": compression, "fletcher32": True}


def _create_datasets(f: h5py.File, n: int, layout: CacheLayout, compression: int) -> None:
    length, opts = layout.seq_len, dataset_options(compression)
    shapes = stored_dtypes(
        layout.mode, layout.values, layout.vocab_size, layout.top_k, len(layout.betas), layout.sample_weights
    )
    for name, (dtype, last) in shapes.items():
        row = (length,) if last is None else (length, last)
        f.create_dataset(name, (n, *row), dtype, chunks=(1, *row), **opts)


def _write_attrs(f: h5py.File, layout: CacheLayout, **extra) -> None:
    f.attrs["format_version"] = layout.version
    if layout.version >= 3:
        f.attrs["cache_mode"] = layout.mode
        f.attrs["cache_values"] = layout.values
    if layout.mode == "sampled":
        f.attrs["sample_draws"] = layout.sample_draws
        f.attrs["sample_temperature"] = layout.sample_temperature
    if layout.self_normalized:  # only then: an exact sampled cache's attributes stay as they were
        f.attrs["sample_weights"] = layout.sample_weights
    f.attrs["top_k"] = layout.top_k
    f.attrs["vocab_size"] = layout.vocab_size
    if not layout.self_normalized:  # it stores no grid: any KD temperature
        f.attrs["betas"] = layout.betas.astype(np.float64)
        f.attrs["temperature_range"] = np.array([1.0 / layout.betas[-1], 1.0 / layout.betas[0]])
        f.attrs["log_normalizer_quantum"] = LOG_NORMALIZER_QUANTUM
    f.attrs["fingerprint"] = json.dumps(layout.fingerprint, sort_keys=True)
    for key, value in extra.items():
        f.attrs[key] = value


def _load_batch(batch_file: Path, stored: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A finished batch's arrays; a damaged file is removed, so the next run recomputes it."""
    try:
        with np.load(batch_file) as part:
            arrays = {key: part[key] for key in (*stored[1:], "max_error")}
            # Batches of version-2 runs before q8 existed have no value error (their files store none).
            return arrays | {"value_max_error": part.get("value_max_error", 0.0)}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        batch_file.unlink(missing_ok=True)
        raise UserError(
            f"{batch_file}: damaged batch file ({e}); it was removed: run the same command again "
            "to recompute that batch and finish the cache"
        ) from None


def _assemble(
    path: Path,
    partial: Path,
    input_ids: np.ndarray,
    span: Span,
    batch_starts: list[int],
    layout: CacheLayout,
    compression: int,
    info: dict,
) -> None:
    """The HDF5 file from the saved batches, marked complete and renamed into place."""
    max_error = value_error = 0.0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _create_datasets(f, len(input_ids), layout, compression)
        f["input_ids"][...] = input_ids
        for s in batch_starts:
            arrays = _load_batch(_batch_file(partial, s), layout.stored)
            rows = slice(s - span.start, s - span.start + len(arrays[layout.stored[1]]))
            for key in layout.stored[1:]:
                f[key][rows] = arrays[key]
            max_error = max(max_error, float(arrays["max_error"]))
            value_error = max(value_error, float(arrays["value_max_error"]))
        if layout.version >= 3:  # version 2 files stay as they were
            info["value_max_error"] = value_error
        # max_error is the normaliser's interpolation error, or (self-normalised) the stored log q_tau's.
        bound = {"log_prob_max_error" if layout.self_normalized else "log_normalizer_max_error": max_error}
        _write_attrs(
            f,
            layout,
            **bound,
            sequence_offset=span.start,
            total_sequences=span.total,
            shard=np.array(span.shard if span.shard else (0, 1)),
            **info,
        )
        f.attrs["complete"] = True  # a file without it was never finished
        seal_metadata(f)  # last: checksums of every attribute above and of the datasets


# --------------------------------------------------------------------------- merge
def merge(path: Path) -> list[Path]:
    """Merge the shards of ``path`` (the file to write), or, for a directory, of every cache
    whose shards are in it; return the files written."""
    if not path.is_dir():
        return [merge_shards(path)]
    stems = sorted({p.name.split(".shard-")[0] for p in path.glob("*.shard-*-of-*.h5")})
    if not stems:
        raise UserError(f"{path}: no shard files *.shard-I-of-N.h5 in it")
    return [merge_shards(path / f"{stem}.h5") for stem in stems]


def merge_shards(path: str | Path) -> Path:
    """Write ``path`` as an HDF5 file of virtual datasets over its shard files, so that the
    shards read as one cache (with kdsweep or plain h5py). The shards stay where they are;
    the virtual file names them relative to its own directory, so the directory can move."""
    path = Path(path)
    files = shard_files(path)
    if not files:
        raise UserError(
            f"{path}: no shard files {path.stem}.shard-I-of-N{path.suffix} next to it; "
            "generate them with `kdsweep cache generate --shard I/N`"
        )
    opened = (ShardFile(int(c.attrs["sequence_offset"]), c) for c in map(TeacherLogitCache, files))
    shards = sorted(opened, key=lambda s: s.offset)
    try:
        _check_shards(path, shards)
        _write_virtual(path, shards)
    finally:
        for s in shards:
            s.cache.close()
    return path


def _check_shards(path: Path, shards: list[ShardFile]) -> None:
    """All shards present, made from the same inputs and grid, and covering every sequence once."""
    first = shards[0].cache
    n_shards, total = int(first.attrs["shard"][1]), int(first.attrs["total_sequences"])
    if len(shards) != n_shards:
        have = sorted(int(s.cache.attrs["shard"][0]) for s in shards)
        missing = sorted(set(range(n_shards)) - set(have))
        raise UserError(
            f"{path}: found {len(shards)} of {n_shards} shards (missing {missing}); generate them with "
            f"`kdsweep cache generate --shard I/{n_shards}`"
        )
    for _, c in shards:
        if c.fingerprint != first.fingerprint:
            raise UserError(
                f"{c.path}: fingerprint differs from {first.path}: "
                + "; ".join(diff_fingerprints(c.fingerprint, first.fingerprint))
            )
        if not np.array_equal(c.betas, first.betas) or int(c.attrs["shard"][1]) != n_shards:
            raise UserError(f"{c.path}: temperature grid or shard count differs from {first.path}; regenerate it")
    expected = 0
    for off, c in shards:
        if off != expected:
            raise UserError(
                f"{c.path}: starts at sequence {off}, expected {expected}; shards overlap or one is missing"
            )
        expected += c.num_sequences
    if expected != total:
        raise UserError(f"{path}: shards cover {expected} of {total} sequences")


def _write_virtual(path: Path, shards: list[ShardFile]) -> None:
    first = shards[0].cache
    total = int(first.attrs["total_sequences"])
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver="latest") as f:
        for key in first.datasets():
            src = first.file[key]
            layout = h5py.VirtualLayout(shape=(total,) + src.shape[1:], dtype=src.dtype)
            for off, c in shards:
                n = c.num_sequences
                # Relative to the virtual file's directory (the reader sets that as the prefix).
                layout[off : off + n] = h5py.VirtualSource(c.path.name, key, shape=(n,) + src.shape[1:])
            fill = _VDS_FILL[key]
            f.create_virtual_dataset(key, layout, fillvalue=np.iinfo(src.dtype).max if fill is None else fill)
        for attr, value in first.file.attrs.items():
            if attr not in ("complete", METADATA_CHECKSUMS):
                f.attrs[attr] = value
        f.attrs["shard"] = np.array((0, 1))
        f.attrs["sequence_offset"] = 0
        for attr in ("log_normalizer_max_error", "log_prob_max_error", "value_max_error"):
            if attr in first.attrs:
                f.attrs[attr] = max(float(s.cache.attrs[attr]) for s in shards)
        f.attrs["shards"] = json.dumps([s.cache.path.name for s in shards])
        f.attrs["complete"] = True
        seal_metadata(f)
