"""The teacher-logit cache: top-k teacher logits in HDF5, exact at any KD temperature in a declared range.

The full format is documented in ``docs/cache-format.md``. In short, per split one
HDF5 file with, for N sequences of L tokens and the teacher's top k:

==========================  ==============  ===========  =====================================
dataset                     shape           dtype        meaning
==========================  ==============  ===========  =====================================
``input_ids``               (N, L)          int32        the tokens the teacher read
``topk_ids``                (N, L, k)       uint16/32    the k most likely next tokens, ascending id
``topk_logits``             (N, L, k)       float16      their logits minus the position's max logit
``log_normalizer``          (N, L, G)       float32      f(b) = logsumexp_v(b * s_v) at the G grid b's
``log_normalizer_slope``    (N, L, G)       float16      f'(b) = E_{softmax(b s)}[s]
==========================  ==============  ===========  =====================================

Position t holds the teacher's prediction for token t + 1 (the Hugging Face convention).

Why the log-normaliser: top-k logits alone cannot give the teacher's probabilities at a
temperature T != 1, because the normaliser over the full vocabulary is lost. With
s = z - max(z) and b = 1/T, ``log p_i(T) = b * s_i - f(b)``. f is stored exactly at a grid
of b's spanning the declared temperature range and interpolated between grid points with
a cubic Hermite spline through the stored values and slopes. f is smooth and convex, so the
interpolation error is tiny; the writer measures it at every interval's midpoint and stores
the maximum as the attribute ``log_normalizer_max_error`` (the stated bound: a log-space
error e changes each probability by a factor of at most exp(e)).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from kdsweep.errors import UserError

FORMAT_VERSION = 1
DATASETS = ("input_ids", "topk_ids", "topk_logits", "log_normalizer", "log_normalizer_slope")
FP16_MIN = float(np.finfo(np.float16).min)


# --------------------------------------------------------------------------- pure math
def temperature_grid(t_low: float, t_high: float, points: int) -> np.ndarray:
    """Inverse temperatures b = 1/T, evenly spaced from 1/t_high to 1/t_low (ascending)."""
    if t_low == t_high:
        return np.array([1.0 / t_low, 1.0 / t_low + 1e-3])
    return np.linspace(1.0 / t_high, 1.0 / t_low, points)


def log_normalizer(values: torch.Tensor, slopes: torch.Tensor, betas: Sequence[float], beta: float) -> torch.Tensor:
    """Cubic Hermite interpolation of f(b) = logsumexp(b * s) at ``beta``.

    Args:
        values: (..., G) f at the grid points ``betas``.
        slopes: (..., G) f' at the grid points.
        betas: (G,) ascending grid.
        beta: where to evaluate; must lie within the grid.
    Returns:
        (...,) f(beta); exact at grid points.
    """
    g = len(betas)
    j = int(np.clip(np.searchsorted(betas, beta, side="right") - 1, 0, g - 2))
    b0, b1 = float(betas[j]), float(betas[j + 1])
    h = b1 - b0
    t = (beta - b0) / h
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    v0, v1 = values[..., j].float(), values[..., j + 1].float()
    d0, d1 = slopes[..., j].float(), slopes[..., j + 1].float()
    return h00 * v0 + h10 * h * d0 + h01 * v1 + h11 * h * d1


def summarize_logits(logits: torch.Tensor, k: int, betas: np.ndarray) -> dict[str, torch.Tensor]:
    """What the cache stores for each position, computed on the logits' device.

    Args:
        logits: (N, V) teacher logits, any float dtype (computed in float32).
        k: how many to keep.
        betas: (G,) inverse-temperature grid.
    Returns:
        ``topk_ids`` (N, k) ascending ids, ``topk_logits`` (N, k) shifted logits,
        ``log_normalizer`` and ``log_normalizer_slope`` (N, G), and ``max_error`` (scalar):
        the interpolation error measured at the midpoints of the grid intervals.
    """
    s = logits.float()
    s = s - s.max(dim=-1, keepdim=True).values
    vals, ids = s.topk(k, dim=-1)
    ids, order = ids.sort(dim=-1)  # ascending ids compress better (FACTS: 165 -> 131 bytes/token)
    vals = vals.gather(-1, order)
    lse, slope = [], []
    for b in betas:
        z = s * float(b)
        lse_b = torch.logsumexp(z, dim=-1)
        lse.append(lse_b)
        slope.append((torch.softmax(z, dim=-1) * s).sum(-1))
    values, slopes = torch.stack(lse, -1), torch.stack(slope, -1)
    # Store the slopes as they will be read back (float16), and measure the bound with them.
    slopes_stored = slopes.clamp(min=FP16_MIN).half()
    max_error = torch.zeros((), device=s.device)
    for b0, b1 in zip(betas[:-1], betas[1:]):
        mid = 0.5 * (b0 + b1)
        exact = torch.logsumexp(s * mid, dim=-1)
        approx = log_normalizer(values, slopes_stored, betas, mid)
        max_error = torch.maximum(max_error, (exact - approx).abs().max())
    return {
        "topk_ids": ids,
        "topk_logits": vals.clamp(min=FP16_MIN).half(),
        "log_normalizer": values,
        "log_normalizer_slope": slopes_stored,
        "max_error": max_error,
    }


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- fingerprint
def diff_fingerprints(cached: dict, expected: dict) -> list[str]:
    """Fields whose values differ, as ``key: cache has X, config has Y`` lines."""
    out = []
    for key in sorted(set(cached) | set(expected)):
        if key in expected and cached.get(key) != expected.get(key):
            out.append(f"{key}: cache has {cached.get(key)!r}, config has {expected.get(key)!r}")
    return out


# --------------------------------------------------------------------------- writer
@dataclass
class CacheLayout:
    """Everything fixed before the first sequence is written."""

    top_k: int
    betas: np.ndarray
    vocab_size: int  # tokenizer's vocabulary; padded LM-head rows beyond it are dropped
    seq_len: int
    fingerprint: dict


def _teacher_logits_chunks(model, input_ids: torch.Tensor, vocab_size: int, chunk_tokens: int):
    """Teacher logits (T_chunk, V) for the flattened batch, a chunk of positions at a time.

    Only the decoder runs on the whole batch; the LM head runs per chunk, so no
    (B, L, V) tensor is ever built.
    """
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    head = model.get_output_embeddings()
    for start in range(0, hidden.shape[0], chunk_tokens):
        yield head(hidden[start : start + chunk_tokens])[:, :vocab_size]


@torch.no_grad()
def teacher_batch_summary(model, input_ids: torch.Tensor, layout: CacheLayout, chunk_tokens: int = 4096) -> dict:
    """Run the teacher on (B, L) ``input_ids`` and summarise every position (arrays on the CPU)."""
    parts = [summarize_logits(lg, layout.top_k, layout.betas) for lg in
             _teacher_logits_chunks(model, input_ids, layout.vocab_size, chunk_tokens)]
    b, length = input_ids.shape
    out = {}
    for key in ("topk_ids", "topk_logits", "log_normalizer", "log_normalizer_slope"):
        out[key] = torch.cat([p[key] for p in parts]).reshape(b, length, -1).cpu().numpy()
    out["topk_ids"] = out["topk_ids"].astype(ids_dtype(layout.vocab_size))
    out["max_error"] = float(max(p["max_error"] for p in parts))
    return out


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
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


def generate(model, input_ids: np.ndarray, path: str | Path, layout: CacheLayout, *, batch_size: int,
             device: torch.device, shard: tuple[int, int] | None = None, desc: str = "teacher logits") -> Path:
    """Write the cache for ``input_ids`` (N, L) to ``path``; resumable, atomic at the end.

    Each finished batch is saved as its own small file under ``<path>.partial/`` (written
    to a temporary name, then renamed), so a run killed at any moment loses at most the
    batch in flight; re-running skips the finished batches. Only when every batch is done
    is the HDF5 file assembled under a temporary name, marked complete and renamed into
    place, so a reader never sees a half-written cache.
    """
    path = Path(path)
    if shard is not None:
        path = shard_path(path, shard)
    start, stop = shard_range(len(input_ids), shard, batch_size)
    partial = path.with_name(path.name + ".partial")
    meta = {"fingerprint": layout.fingerprint, "batch_size": batch_size, "range": [start, stop],
            "betas": layout.betas.tolist(), "top_k": layout.top_k}
    meta_file = partial / "meta.json"
    if partial.exists() and (not meta_file.exists() or json.loads(meta_file.read_text()) != meta):
        print(f"{partial}: left by a run with other settings; starting over")
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta))

    batch_starts = list(range(start, stop, batch_size))
    todo = [s for s in batch_starts if not (partial / f"batch-{s:09d}.npz").exists()]
    if len(todo) < len(batch_starts):
        print(f"{path.name}: resuming, {len(batch_starts) - len(todo)} of {len(batch_starts)} batches already done")
    for s in tqdm(todo, desc=desc, unit="batch", dynamic_ncols=True):
        ids = torch.as_tensor(input_ids[s : min(s + batch_size, stop)], dtype=torch.long, device=device)
        summary = teacher_batch_summary(model, ids, layout)
        tmp = partial / f"batch-{s:09d}.tmp.npz"
        np.savez(tmp, max_error=np.float32(summary.pop("max_error")), **summary)
        os.replace(tmp, partial / f"batch-{s:09d}.npz")

    _assemble(path, partial, input_ids[start:stop], batch_starts, layout, shard, start, len(input_ids))
    shutil.rmtree(partial)
    return path


def _create_datasets(f: h5py.File, n: int, layout: CacheLayout) -> None:
    k, g, length = layout.top_k, len(layout.betas), layout.seq_len
    # One chunk per sequence: random access by sequence reads exactly one chunk per dataset.
    opts = dict(compression="gzip", compression_opts=4, shuffle=True, fletcher32=True)
    f.create_dataset("input_ids", (n, length), np.int32, chunks=(1, length), **opts)
    f.create_dataset("topk_ids", (n, length, k), ids_dtype(layout.vocab_size), chunks=(1, length, k), **opts)
    f.create_dataset("topk_logits", (n, length, k), np.float16, chunks=(1, length, k), **opts)
    f.create_dataset("log_normalizer", (n, length, g), np.float32, chunks=(1, length, g), **opts)
    f.create_dataset("log_normalizer_slope", (n, length, g), np.float16, chunks=(1, length, g), **opts)


def _write_attrs(f: h5py.File, layout: CacheLayout, **extra) -> None:
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["top_k"] = layout.top_k
    f.attrs["vocab_size"] = layout.vocab_size
    f.attrs["betas"] = layout.betas.astype(np.float64)
    f.attrs["temperature_range"] = np.array([1.0 / layout.betas[-1], 1.0 / layout.betas[0]])
    f.attrs["fingerprint"] = json.dumps(layout.fingerprint, sort_keys=True)
    for key, value in extra.items():
        f.attrs[key] = value


def _assemble(path: Path, partial: Path, input_ids: np.ndarray, batch_starts: list[int], layout: CacheLayout,
              shard: tuple[int, int] | None, offset: int, total: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    max_error = 0.0
    with h5py.File(tmp, "w") as f:
        _create_datasets(f, len(input_ids), layout)
        f["input_ids"][...] = input_ids
        for s in batch_starts:
            with np.load(partial / f"batch-{s:09d}.npz") as part:
                sl = slice(s - offset, s - offset + len(part["topk_ids"]))
                for key in DATASETS[1:]:
                    f[key][sl] = part[key]
                max_error = max(max_error, float(part["max_error"]))
        _write_attrs(
            f, layout, log_normalizer_max_error=max_error, sequence_offset=offset, total_sequences=total,
            shard=np.array(shard if shard else (0, 1)),
        )
        f.attrs["complete"] = True  # set last: a file without it was never finished
    os.replace(tmp, path)


def merge_shards(path: str | Path) -> Path:
    """Write ``path`` as an HDF5 file of virtual datasets over its shard files, so that
    the shards read as one cache (with kdsweep or plain h5py)."""
    path = Path(path)
    shards = sorted(path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"))
    if not shards:
        raise UserError(f"{path}: no shard files {path.stem}.shard-I-of-N{path.suffix} next to it")
    heads = []
    for s in shards:
        c = TeacherLogitCache(s)
        heads.append((int(c.attrs["sequence_offset"]), c))
    heads.sort(key=lambda t: t[0])
    n_shards = int(heads[0][1].attrs["shard"][1])
    total = int(heads[0][1].attrs["total_sequences"])
    if len(heads) != n_shards:
        raise UserError(f"{path}: found {len(heads)} of {n_shards} shards; generate the missing ones with --shard I/{n_shards}")
    fp = heads[0][1].fingerprint
    for _, c in heads:
        if c.fingerprint != fp:
            raise UserError(f"{c.path}: fingerprint differs from {heads[0][1].path}: " +
                            "; ".join(diff_fingerprints(c.fingerprint, fp)))
    expected = 0
    for off, c in heads:
        if off != expected:
            raise UserError(f"{c.path}: starts at sequence {off}, expected {expected}; shards overlap or one is missing")
        expected += c.num_sequences
    if expected != total:
        raise UserError(f"{path}: shards cover {expected} of {total} sequences")
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        for key in DATASETS:
            first = heads[0][1].file[key]
            layout = h5py.VirtualLayout(shape=(total,) + first.shape[1:], dtype=first.dtype)
            for off, c in heads:
                n = c.num_sequences
                # Relative file names resolve next to the virtual file, so the directory can move.
                layout[off : off + n] = h5py.VirtualSource(c.path.name, key, shape=(n,) + first.shape[1:])
            f.create_virtual_dataset(key, layout)
        for attr, value in heads[0][1].file.attrs.items():
            f.attrs[attr] = value
        f.attrs["shard"] = np.array((0, 1))
        f.attrs["sequence_offset"] = 0
        f.attrs["log_normalizer_max_error"] = max(float(c.attrs["log_normalizer_max_error"]) for _, c in heads)
        f.attrs["shards"] = json.dumps([c.path.name for _, c in heads])
    for _, c in heads:
        c.close()
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- reader
class TeacherLogitCache:
    """Random access to a finished cache by sequence.

    Reads one sequence at a time with ``read_direct`` into preallocated buffers (per-item
    fancy indexing is ~10x slower, see FACTS.md). ``in_memory=True`` loads the arrays once.
    The file is opened lazily so the object can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid = None
        f = self.file
        if not f.attrs.get("complete", False):
            raise UserError(
                f"{self.path}: incomplete teacher-logit cache (generation did not finish); "
                "re-run `dvc repro teacher_logits` (or `kdsweep cache generate` with the same output) to resume it"
            )
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise UserError(f"{self.path}: cache format version {version}, this kdsweep reads {FORMAT_VERSION}; regenerate it")
        self.attrs = dict(f.attrs)
        self.top_k = int(f.attrs["top_k"])
        self.vocab_size = int(f.attrs["vocab_size"])
        self.betas = np.asarray(f.attrs["betas"], dtype=np.float64)
        self.fingerprint = json.loads(f.attrs["fingerprint"])
        self.num_sequences, self.seq_len = f["input_ids"].shape
        self._arrays = {key: f[key][...] for key in DATASETS} if in_memory else None

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():  # reopen in each DataLoader worker
            try:
                self._file = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise UserError(f"{self.path}: teacher-logit cache not found; run `dvc repro teacher_logits`") from None
            except OSError as e:
                raise UserError(
                    f"{self.path}: not a readable HDF5 file ({e}); it is truncated or corrupt: "
                    "delete it and re-run `dvc repro teacher_logits`"
                ) from None
            self._pid = os.getpid()
        return self._file

    @property
    def temperature_range(self) -> tuple[float, float]:
        return 1.0 / self.betas[-1], 1.0 / self.betas[0]

    def check_temperature(self, temperature: float, key: str = "loss.temperature") -> None:
        lo, hi = self.temperature_range
        if not lo - 1e-9 <= temperature <= hi + 1e-9:
            raise UserError(
                f"{key}: {temperature} is outside the temperature range [{lo:g}, {hi:g}] of {self.path}; "
                "pick a temperature in range or widen teacher.temperature_range and regenerate the cache"
            )

    def check_fingerprint(self, expected: dict) -> None:
        diffs = diff_fingerprints(self.fingerprint, expected)
        if diffs:
            raise UserError(
                f"{self.path}: teacher-logit cache was made from different inputs:\n  " + "\n  ".join(diffs)
                + "\nregenerate it with `dvc repro teacher_logits`"
            )

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The arrays of the given sequences, stacked: (B, L, ...) each."""
        if self._arrays is not None:
            idx = np.asarray(indices)
            return {key: arr[idx] for key, arr in self._arrays.items()}
        f = self.file
        out = {}
        for key in DATASETS:
            ds = f[key]
            buf = np.empty((len(indices),) + ds.shape[1:], dtype=ds.dtype)
            for row, i in enumerate(indices):
                ds.read_direct(buf, np.s_[i], np.s_[row])
            out[key] = buf
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # picklable for DataLoader workers: reopen there
        state = self.__dict__.copy()
        state["_file"] = None
        return state


def reconstruct_full(batch: dict[str, np.ndarray | torch.Tensor], betas: Sequence[float], temperature: float,
                     vocab_size: int) -> torch.Tensor:
    """Full-vocabulary teacher probabilities (..., V) from cached top-k arrays at ``temperature``.

    The top-k entries get their exact probabilities; the tail mass 1 - sum(top-k) is spread
    uniformly over the other V - k tokens (the cache does not know how it is distributed).
    Memory is (..., V): use it for inspection, not for training at large vocabularies.
    """
    ids = torch.as_tensor(np.asarray(batch["topk_ids"], dtype=np.int64))
    s = torch.as_tensor(batch["topk_logits"]).float()
    lse = log_normalizer(torch.as_tensor(batch["log_normalizer"]), torch.as_tensor(batch["log_normalizer_slope"]),
                         betas, 1.0 / temperature)
    p_top = torch.exp(s / temperature - lse.unsqueeze(-1))
    tail = (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)
    k = ids.shape[-1]
    full = (tail / max(vocab_size - k, 1)).expand(*ids.shape[:-1], vocab_size).clone()
    full.scatter_(-1, ids, p_top)
    return full
