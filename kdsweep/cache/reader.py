"""Reading caches: random access by sequence, decoded to the arrays training uses.

TeacherLogitCache(path):
    open the file and check its attributes and datasets; refuse it (a UserError naming
    the file and the fix) when it is missing, unreadable, incomplete, of another format
    version, missing a dataset or an attribute, or merged over missing or foreign shards
read(indices):
    per stored dataset, one chunk (= one sequence) per index into a preallocated buffer
    decode: ids = cumsum of the gaps, t = format.decode_log_normalizer(residuals, slopes)
        (a self-normalised sampled cache: log q_tau at the sampled ids, no t)
    return the arrays of format.DATASETS
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from kdsweep.cache.fingerprint import diff_fingerprints
from kdsweep.cache.format import (
    PADDING_LOGIT,
    READABLE_VERSIONS,
    SELF_NORMALIZED_VERSION,
    decode_log_normalizer,
    decode_q8,
    deltas_to_ids,
    metadata_changes,
    stored_names,
)
from kdsweep.errors import UserError


class Header(NamedTuple):
    """The file attributes a reader relies on, parsed and checked."""

    attrs: dict
    top_k: int
    vocab_size: int
    betas: np.ndarray  # (G,) ascending inverse temperatures
    fingerprint: dict
    shards: list[str]  # merged files: the shard file names, relative to the merged file
    mode: str  # topk | sampled (version 2: topk)
    values: str  # fp16 | q8 (version 2: fp16)
    sample_weights: str  # exact | self_normalized (version 4; no grid: betas is empty)


class StoredDataset(NamedTuple):
    """One stored dataset with everything a one-row read needs, built once per process
    (h5py recomputes shapes and types on every access otherwise)."""

    dataset: h5py.Dataset
    row_shape: tuple[int, ...]
    dtype: np.dtype
    memory_space: h5py.h5s.SpaceID  # one row
    file_space: h5py.h5s.SpaceID
    memory_type: h5py.h5t.TypeID


def _refuse(path: Path, problem: str, *, check: bool = False) -> UserError:
    """A damaged file: name it, the problem and the fix (``check``: point at ``cache verify``,
    which lists every damaged sequence, when only part of the file failed)."""
    verify = f"check which sequences are damaged with `kdsweep cache verify {path}`, then " if check else ""
    return UserError(
        f"{path}: {problem}; {verify}delete it and re-run `dvc repro teacher_logits` "
        "(or `kdsweep cache generate` with the same options)"
    )


def _grid(value) -> np.ndarray:
    betas = np.asarray(value, dtype=np.float64)
    if betas.ndim != 1 or len(betas) < 2 or not (np.diff(betas) > 0).all():
        raise ValueError("not an ascending grid of at least two points")
    return betas


def _json(kind: type) -> Callable:
    def parse(value):
        out = json.loads(value)
        if not isinstance(out, kind):
            raise ValueError(f"not a JSON {kind.__name__}")
        return out

    return parse


# The attributes _read_header parses (all required but ``shards``, which only merged files have;
# a self-normalised sampled cache has no grid and its own bound, _SELF_NORMALIZED_ATTRS).
_ATTRS = {
    "top_k": int,
    "vocab_size": int,
    "betas": _grid,
    "fingerprint": _json(dict),
    "log_normalizer_max_error": float,
    "log_normalizer_quantum": float,
    "shards": _json(list),
}
_GRID_ATTRS = ("betas", "log_normalizer_max_error", "log_normalizer_quantum")
_SELF_NORMALIZED_ATTRS = {name: parse for name, parse in _ATTRS.items() if name not in _GRID_ATTRS} | {
    "log_prob_max_error": float
}


def _read_header(f: h5py.File, path: Path) -> Header:
    """The attributes of an open cache file; refuses an incomplete, other-version or damaged file."""
    try:
        attrs = dict(f.attrs)
    except (OSError, KeyError, RuntimeError) as e:
        raise _refuse(path, f"its attributes cannot be read ({e}): the file is damaged") from None
    if not attrs.get("complete", False):
        raise UserError(
            f"{path}: incomplete teacher-logit cache (generation did not finish); "
            "re-run `dvc repro teacher_logits` (or `kdsweep cache generate` with the same options) to resume it"
        )
    try:
        version = int(attrs.get("format_version", -1))
    except (TypeError, ValueError):
        version = -1
    if version not in READABLE_VERSIONS:
        raise UserError(
            f"{path}: cache format version {version}, this kdsweep reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; regenerate it with `dvc repro teacher_logits`"
        )
    _check_metadata(f, path)
    mode, values = str(attrs.get("cache_mode", "topk")), str(attrs.get("cache_values", "fp16"))
    weights = str(attrs.get("sample_weights", "exact"))
    if mode not in ("topk", "sampled") or values not in ("fp16", "q8"):
        raise _refuse(path, f"attributes cache_mode {mode!r} / cache_values {values!r} are damaged")
    if (weights == "self_normalized") != (version == SELF_NORMALIZED_VERSION) or weights not in (
        "exact",
        "self_normalized",
    ):
        raise _refuse(path, f"attribute sample_weights {weights!r} does not fit format version {version}")
    self_normalized = weights == "self_normalized"
    code, values = values, {"betas": np.empty(0)}
    for name, parse in (_SELF_NORMALIZED_ATTRS if self_normalized else _ATTRS).items():
        if name not in attrs and name != "shards":
            raise _refuse(path, f"attribute {name} is missing: the file is damaged or was not written by kdsweep")
        try:
            values[name] = parse(attrs.get(name, "[]"))
        except (TypeError, ValueError) as e:
            raise _refuse(path, f"attribute {name} is damaged ({attrs[name]!r:.60}: {e})") from None
    return Header(
        attrs,
        values["top_k"],
        values["vocab_size"],
        values["betas"],
        values["fingerprint"],
        values["shards"],
        mode,
        code,
        weights,
    )


def _check_metadata(f: h5py.File, path: Path) -> None:
    """Refuse a file whose attributes or dataset descriptions changed since the writer sealed them."""
    try:
        changed = metadata_changes(f)
    except (OSError, KeyError, RuntimeError, ValueError):
        return  # a dataset cannot even be opened: _open_datasets names it
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise _refuse(path, f"metadata checksum mismatch ({shown} changed since the file was written)")


def _open_datasets(f: h5py.File, path: Path, names: tuple[str, ...]) -> dict[str, StoredDataset]:
    """The stored datasets ``names`` (:func:`~kdsweep.cache.format.stored_names`), opened with the
    file's own directory as the prefix of virtual sources (merged files), whatever the working
    directory; refuses a file where one is missing or cannot be opened (damaged metadata)."""
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_virtual_prefix(str(path.resolve().parent).encode() + b"/")
    out, broken = {}, {}
    for key in names:
        try:
            ds = h5py.Dataset(h5py.h5d.open(f.id, key.encode(), dapl=dapl))
            row = tuple(ds.shape[1:])
            mspace, fspace = h5py.h5s.create_simple((1,) + row), ds.id.get_space()
            out[key] = StoredDataset(ds, row, ds.dtype, mspace, fspace, h5py.h5t.py_create(ds.dtype))
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            broken[key] = e
    if broken:
        first = next(iter(broken.values()))
        why = first.args[0] if isinstance(first, KeyError) and first.args else first  # KeyError quotes its text
        raise _refuse(
            path,
            f"dataset{'s' if len(broken) > 1 else ''} {', '.join(broken)} missing or unreadable ({why}): "
            "the file is damaged or was not written by kdsweep",
        )
    return out


def _check_shapes(path: Path, sources: dict[str, StoredDataset], header: Header) -> None:
    n, length = (sources["input_ids"].dataset.shape + (0, 0))[:2]
    k, g = header.top_k, len(header.betas)
    expected = dict.fromkeys(sources, (n, length, k))
    expected |= {key: (n, length) for key in sources if key == "input_ids" or key.endswith("_min")}
    expected |= {key: (n, length, g) for key in sources if key.startswith("tail_log_normalizer")}
    for key, shape in expected.items():
        if sources[key].dataset.shape != shape:
            raise _refuse(
                path,
                f"dataset {key} has shape {sources[key].dataset.shape}, expected {shape} (top_k {k}, "
                f"{g} grid points): the file is damaged",
            )


def _check_shard(merged: Path, shard: Path, fingerprint: dict) -> None:
    """A shard of a merged file: present, complete and made from the same inputs."""
    if not shard.is_file():
        raise UserError(
            f"{merged}: merged cache, but its shard {shard} is missing; copy the shard files "
            "next to it (they are read from there) or re-run `kdsweep cache merge`"
        )
    try:
        with h5py.File(shard, "r") as s:
            complete, fp = bool(s.attrs.get("complete", False)), json.loads(s.attrs.get("fingerprint", "{}"))
    except (OSError, KeyError, ValueError) as e:
        raise _refuse(shard, f"shard of {merged.name} is not a readable HDF5 file ({e})") from None
    if not complete:
        raise UserError(
            f"{shard}: shard of {merged.name} is incomplete; resume it with "
            "`kdsweep cache generate --shard I/N`, then run `kdsweep cache merge` again"
        )
    if fp != fingerprint:
        raise UserError(
            f"{shard}: shard made from other inputs than {merged.name}: "
            + "; ".join(diff_fingerprints(fp, fingerprint))
            + "; regenerate it and merge again"
        )


class TeacherLogitCache:
    """Random access to a finished cache by sequence, decoded to the arrays of :data:`DATASETS`.

    Reads one chunk (= one sequence) per dataset with HDF5's low-level read into
    preallocated buffers: per-item fancy indexing is ~10x slower, and h5py's high-level
    ``read_direct`` spends more time building selections than decompressing.
    ``in_memory=True`` decodes the whole file once at open. The file is opened lazily
    again in each process, so the object can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path, in_memory: bool = False):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._dsets: dict[str, StoredDataset] | None = None
        header = _read_header(self.file, self.path)
        self.attrs = header.attrs
        self.top_k, self.vocab_size, self.betas = header.top_k, header.vocab_size, header.betas
        self.fingerprint, self.shards = header.fingerprint, header.shards
        self.mode, self.values = header.mode, header.values
        self.sample_weights = header.sample_weights
        # Proposal log-probabilities and no normaliser grid: importance weights are self-normalised.
        self.self_normalized = header.sample_weights == "self_normalized"
        self.stored = stored_names(self.mode, self.values, self.sample_weights)
        # A sampled cache's proposal temperature (the one its ids were drawn at); None for top-k.
        self.sample_temperature = float(self.attrs["sample_temperature"]) if self.mode == "sampled" else None
        for name in self.shards:
            _check_shard(self.path, self.path.parent / name, self.fingerprint)
        sources = self._sources()
        _check_shapes(self.path, sources, header)
        self.num_sequences, self.seq_len = sources["input_ids"].dataset.shape
        self._arrays = self.decode(self._read_all()) if in_memory else None

    @property
    def file(self) -> h5py.File:
        """The open HDF5 file (reopened in each process)."""
        if self._file is None or self._pid != os.getpid():  # reopen in each DataLoader worker
            try:
                self._file = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise UserError(
                    f"{self.path}: teacher-logit cache not found; run `dvc repro teacher_logits` "
                    "(or `kdsweep cache generate`)"
                ) from None
            except OSError as e:
                raise _refuse(self.path, f"not a readable HDF5 file ({e}): it is truncated or corrupt") from None
            self._pid = os.getpid()
            self._dsets = None
        return self._file

    def _sources(self) -> dict[str, StoredDataset]:
        f = self.file
        if self._dsets is None:
            self._dsets = _open_datasets(f, self.path, self.stored)
        return self._dsets

    def datasets(self) -> dict[str, h5py.Dataset]:
        """The stored datasets (:attr:`stored`) as h5py objects, merged files included."""
        return {key: src.dataset for key, src in self._sources().items()}

    @property
    def temperature_range(self) -> tuple[float, float]:
        """The KD temperatures [low, high] the cache is exact for; (0, inf) for a self-normalised
        sampled cache, which serves every T (exactly at the proposal temperature, docs/cache-format.md)."""
        if self.self_normalized:
            return 0.0, float("inf")
        return 1.0 / self.betas[-1], 1.0 / self.betas[0]

    def check_temperature(self, temperature: float, key: str = "loss.temperature") -> None:
        """Refuse a KD temperature outside :attr:`temperature_range`, naming the config ``key``."""
        lo, hi = self.temperature_range
        if not lo - 1e-9 <= temperature <= hi + 1e-9:
            raise UserError(
                f"{key}: {temperature} is outside the temperature range [{lo:g}, {hi:g}] of {self.path}; "
                "pick a temperature in range or widen teacher.temperature_range and regenerate the cache"
            )

    def check_fingerprint(self, expected: dict) -> None:
        """Refuse a cache made from other inputs than ``expected``, naming every differing field."""
        diffs = diff_fingerprints(self.fingerprint, expected)
        if diffs:
            raise UserError(
                f"{self.path}: teacher-logit cache was made from different inputs:\n  "
                + "\n  ".join(diffs)
                + "\nregenerate it with `dvc repro teacher_logits`"
            )

    def read_stored(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The stored (coded) arrays of the given sequences, (B, L, ...) each, as in :attr:`stored`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise IndexError(f"{self.path}: sequence index out of range [0, {self.num_sequences})")
        out = {}
        rows = idx.tolist()
        for key, src in self._sources().items():
            buf = np.empty((len(rows),) + src.row_shape, dtype=src.dtype)
            rest, count = (0,) * len(src.row_shape), (1,) + src.row_shape
            read = src.dataset.id.read
            for r, i in enumerate(rows):
                src.file_space.select_hyperslab((i,) + rest, count)
                try:
                    read(src.memory_space, src.file_space, buf[r : r + 1], src.memory_type)
                except OSError as e:
                    raise _refuse(
                        self.path,
                        f"cannot read sequences {idx[:8].tolist()}: the {key} chunk of sequence {i} fails "
                        f"its fletcher32 checksum or decompression ({e})",
                        check=True,
                    ) from None
            out[key] = buf
        return out

    def _read_all(self) -> dict[str, np.ndarray]:
        """Every stored array, whole (``in_memory``)."""
        try:
            return {key: ds[...] for key, ds in self.datasets().items()}
        except OSError as e:
            raise _refuse(self.path, f"cannot read ({e})", check=True) from None

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays of :meth:`read` but ``log_normalizer`` (t alone under ``tail_log_normalizer``).

        A sampled cache's kept ids go under ``topk_ids`` / ``topk_logits`` too (the maths of both
        modes is the same given the ids), with ``sample_counts``; padding slots (count 0) read as
        logit -1e4, so they hold no probability. A self-normalised sampled cache gives
        ``input_ids``, ``topk_ids``, ``sample_counts`` and ``sample_log_probs`` (float32 log q_tau,
        -1e4 in padding slots) only."""
        if self.self_normalized:
            return self._decode_self_normalized(stored)
        prefix = "topk" if self.mode == "topk" else "sample"
        if self.values == "q8":
            codes, low = stored[f"{prefix}_logit_codes"], stored[f"{prefix}_logit_min"]
            logits = decode_q8(torch.from_numpy(codes), torch.from_numpy(low)).numpy()
        else:
            logits = stored[f"{prefix}_logits"]
        out = {
            "input_ids": stored["input_ids"],
            "topk_ids": deltas_to_ids(stored[f"{prefix}_id_deltas"]),
            "topk_logits": logits,
            "tail_log_normalizer": decode_log_normalizer(
                stored["tail_log_normalizer_residual"], stored["tail_log_normalizer_slope"], self.betas
            ),
            "log_normalizer_slope": stored["tail_log_normalizer_slope"],
        }
        if self.mode == "sampled":
            out["sample_counts"] = stored["sample_counts"]
            out["topk_logits"] = np.where(stored["sample_counts"] > 0, logits, logits.dtype.type(PADDING_LOGIT))
        return out

    def _decode_self_normalized(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.values == "q8":
            codes, low = stored["sample_log_prob_codes"], stored["sample_log_prob_min"]
            log_q = decode_q8(torch.from_numpy(codes), torch.from_numpy(low)).numpy()
        else:
            log_q = stored["sample_log_probs"].astype(np.float32)
        counts = stored["sample_counts"]
        return {
            "input_ids": stored["input_ids"],
            "topk_ids": deltas_to_ids(stored["sample_id_deltas"]),
            "sample_counts": counts,
            "sample_log_probs": np.where(counts > 0, log_q, np.float32(PADDING_LOGIT)),
        }

    @staticmethod
    def _pack(decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """t and the top-k logits side by side, as :func:`log_normalizer` takes them (torch
        converts float16 ~5x faster than numpy)."""
        if "tail_log_normalizer" not in decoded:  # self-normalised: nothing to pack
            return dict(decoded)
        out = dict(decoded)
        tail, logits = torch.from_numpy(out.pop("tail_log_normalizer")), torch.from_numpy(out["topk_logits"])
        out["log_normalizer"] = torch.cat([tail, logits.float()], dim=-1).numpy()
        return out

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The arrays of :data:`DATASETS` for the given sequences, stacked: (B, L, ...) each.

        ``input_ids`` int32 (B, L); ``topk_ids`` int32 (B, L, k), ascending per position;
        ``topk_logits`` (B, L, k) float16 (fp16) or float32 (q8, decoded), <= 0; ``log_normalizer``
        float32 (B, L, G + k) and
        ``log_normalizer_slope`` float16 (B, L, G): pass them to :func:`log_normalizer` for
        f(1/T). (``log_normalizer[..., :G]`` is the tail's t at the grid :attr:`betas`,
        ``log_normalizer_slope`` its slope, ``log_normalizer[..., G:]`` the top-k logits.)
        A sampled cache (:attr:`mode`) keeps its sampled ids there instead, and adds
        ``sample_counts`` uint8 (B, L, k) (0 in padding slots) and ``sample_temperature`` float32
        (B,), the proposal temperature the ids were drawn at. A self-normalised one
        (:attr:`self_normalized`) has ``sample_log_probs`` float32 (B, L, k), log q_tau at its ids,
        in place of ``topk_logits``, ``log_normalizer`` and ``log_normalizer_slope``.
        """
        if self._arrays is not None:
            idx = np.asarray(indices)
            out = self._pack({key: arr[idx] for key, arr in self._arrays.items()})
        else:
            out = self._pack(self.decode(self.read_stored(indices)))
        if self.mode == "sampled":  # per sequence, so it travels with the batch to the loss
            out["sample_temperature"] = np.full(len(out["input_ids"]), self.sample_temperature, dtype=np.float32)
        return out

    def close(self) -> None:
        """Close the file (it reopens on the next read)."""
        self._dsets = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # picklable for DataLoader workers: reopen there
        state = self.__dict__.copy()
        state["_file"] = None
        state["_dsets"] = None
        return state
