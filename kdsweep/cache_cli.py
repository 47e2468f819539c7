"""``kdsweep cache ...``: create, check, describe and merge teacher-logit caches.

``generate`` without options is the DVC stage ``teacher_logits`` (params.yaml, default
paths); with any of the reference script's options it runs standalone into ``--output-dir``.
``verify`` and ``inspect`` read any cache file, merged or not, and need no params.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from kdsweep.errors import UserError

cache_app = typer.Typer(help="Create, check, describe and merge teacher-logit caches (HDF5).", no_args_is_help=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file (validated before anything runs).")]
TOP1_TIE = 0.05  # logits this close to the max count as a tie for the top-1 agreement check
MIN_TOP1_AGREEMENT = 0.99
MASS_TOLERANCE = 2e-3  # top-k mass may exceed 1 by this much (float16 logits, interpolation)
MAX_INTERPOLATION_ERROR = 1e-3  # the stated bound; a cache above it needs a finer temperature grid


def _params(path: Path):
    from kdsweep.config import load_params

    return load_params(path)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"--shard: expected I/N such as 0/4, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard: need 0 <= I < N, got {value!r}")
    return i, n


# --------------------------------------------------------------------------- generate
def standalone_params(
    params_path: Path,
    *,
    teacher_model: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    top_k: int | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
):
    """params.yaml (when present) with the reference script's options on top, validated."""
    from kdsweep.config import read_yaml, validate

    data = (read_yaml(params_path) if params_path.is_file() else None) or {}
    teacher, ds = data.setdefault("teacher", {}), data.setdefault("dataset", {})
    if teacher_model is not None:
        teacher["model"] = teacher_model
    if dataset is not None:
        if dataset == "builtin":
            ds["source"] = "builtin"
        else:
            ds.update(source="hf", name=dataset)
    if dataset_config is not None:
        ds["config_name"] = dataset_config
    if top_k is not None:
        teacher["top_k"] = top_k
    if batch_size is not None:
        teacher["cache_batch_size"] = batch_size
    if max_samples is not None:
        ds["max_samples"] = max_samples
    return validate(data, source=f"{params_path} with the command-line options")


@cache_app.command("generate")
def cache_generate(
    params: ParamsOpt = Path("params.yaml"),
    teacher_model: Annotated[
        str | None,
        typer.Option(help="Teacher: Hugging Face id or local directory (sets teacher.model). Standalone mode."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Dataset: Hugging Face id or local save_to_disk directory, or 'builtin' (sets dataset.name / "
            "dataset.source). Standalone mode."
        ),
    ] = None,
    dataset_config: Annotated[
        str | None,
        typer.Option(help="Dataset configuration, e.g. wikitext-2-raw-v1 (sets dataset.config_name). Standalone mode."),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the standalone run writes prepared/, teacher/, metrics/ and {train,validation}.h5 "
            "(unfinished batches go to <output-dir>.partial/). Default: teacher_logits. Standalone mode."
        ),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Teacher logits kept per position (sets teacher.top_k). Standalone mode.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Sequences per teacher forward (sets teacher.cache_batch_size). Standalone mode."),
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="Use at most this many documents (sets dataset.max_samples). Standalone mode.")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="Write only shard I of N, as I/N; run every shard (anywhere), then `kdsweep cache merge`."),
    ] = None,
) -> None:
    """Run the teacher over both splits and write the top-k cache.

    Without the standalone options: the DVC stage `teacher_logits` (params.yaml, data/prepared, models/teacher).

    With any of them: params.yaml (if present) overridden by the options, everything written under --output-dir.

    An interrupted run resumes where it stopped when run again.
    """
    from kdsweep.stages import teacher_logits as stage

    options = dict(
        teacher_model=teacher_model,
        dataset=dataset,
        dataset_config=dataset_config,
        top_k=top_k,
        batch_size=batch_size,
        max_samples=max_samples,
    )
    if output_dir is None and all(v is None for v in options.values()):
        stage.main(_params(params), shard=_parse_shard(shard))
        return
    p = standalone_params(params, **options)
    stage.standalone(p, output_dir or Path("teacher_logits"), shard=_parse_shard(shard))


# --------------------------------------------------------------------------- merge
@cache_app.command("merge")
def cache_merge(
    path: Annotated[
        Path,
        typer.Argument(
            help="The merged file to write (e.g. data/teacher_logits/train.h5, "
            "next to its shards), or a directory: merge every set of shards in it."
        ),
    ],
) -> None:
    """Write one file that reads the shard files (`generate --shard I/N`) as one cache (HDF5 virtual datasets)."""
    from kdsweep.cache import merge_shards

    targets = [path]
    if path.is_dir():
        stems = sorted({p.name.split(".shard-")[0] for p in path.glob("*.shard-*-of-*.h5")})
        if not stems:
            raise UserError(f"{path}: no shard files *.shard-I-of-N.h5 in it")
        targets = [path / f"{stem}.h5" for stem in stems]
    for target in targets:
        merge_shards(target)
        print(f"{target}: merged {target.stem}.shard-*.h5")


# --------------------------------------------------------------------------- inspect
def _file_bytes(cache) -> int:
    return cache.path.stat().st_size + sum((cache.path.parent / s).stat().st_size for s in cache.shards)


def _filters(ds) -> str:
    parts = []
    if ds.compression:
        parts.append(f"{ds.compression}({ds.compression_opts})")
    if ds.shuffle:
        parts.append("shuffle")
    if ds.fletcher32:
        parts.append("fletcher32")
    return "+".join(parts) or "none"


def _sample_indices(n: int, count: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, count)).round().astype(int).tolist()))


def _histogram(values: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()), 1)
    return [
        f"  [{lo:.1f}, {hi:.1f}{']' if i == bins - 1 else ')'} {'#' * round(width * c / top):<{width}} "
        f"{c / len(values):6.1%}"
        for i, (lo, hi, c) in enumerate(zip(edges[:-1], edges[1:], counts))
    ]


def _fingerprint_lines(fingerprint: dict) -> list[str]:
    return [f"    {key}: {json.dumps(value, sort_keys=True)}" for key, value in sorted(fingerprint.items())]


def inspect_cache(path: Path, sample: int = 256) -> str:
    """The report of ``kdsweep cache inspect``."""
    import h5py

    from kdsweep.cache import TeacherLogitCache, teacher_topk_probs

    c = TeacherLogitCache(path)
    n, length, k = c.num_sequences, c.seq_len, c.top_k
    tokens = n * length
    size = _file_bytes(c)
    lines = [
        f"{path}: teacher-logit cache, format version {c.attrs['format_version']}, complete",
        f"  {n} sequences x {length} tokens = {tokens:,} tokens; top-{k} of {c.vocab_size:,} tokens; "
        f"{len(c.betas)} temperature grid points",
    ]
    if c.shards:
        lines.append(f"  merged (virtual datasets) over {len(c.shards)} shards: {', '.join(c.shards)}")
    lines += [
        f"  file size {size:,} bytes: {size / tokens:.1f} bytes per token, {size / tokens / k:.3f} bytes per "
        "stored logit (ids, values and per-token extras all counted)",
        "",
        f"  {'dataset':<30}{'shape':<17}{'dtype':<9}{'chunks':<15}{'filters':<28}bytes/token",
    ]
    shards = [h5py.File(c.path.parent / name, "r") for name in c.shards]
    for key, ds in c.datasets().items():
        # A merged file's datasets are virtual: their bytes are in the shards.
        stored = sum(sh[key].id.get_storage_size() for sh in shards) if ds.is_virtual else ds.id.get_storage_size()
        src = shards[0][key] if ds.is_virtual else ds
        lines.append(
            f"  {key:<30}{str(ds.shape):<17}{ds.dtype.name:<9}{str(src.chunks):<15}{_filters(src):<28}"
            f"{stored / tokens:.1f}"
        )
    for sh in shards:
        sh.close()
    lo, hi = c.temperature_range
    t_hist = 1.0 if lo <= 1.0 <= hi else lo
    idx = _sample_indices(n, sample)
    mass = teacher_topk_probs(c.read(idx), c.betas, t_hist)[0].sum(-1).reshape(-1).numpy()
    lines += [
        "",
        f"  top-{k} probability mass at T={t_hist:g} ({len(idx)} sequences, {mass.size:,} positions): "
        f"mean {mass.mean():.3f}, median {np.median(mass):.3f}, min {mass.min():.3f}",
        *_histogram(mass),
        "",
        f"  temperature range [{lo:g}, {hi:g}] (b = 1/T on a uniform grid of {len(c.betas)} points)",
        f"  log-normaliser interpolation error bound (measured by the writer, log space): "
        f"{float(c.attrs['log_normalizer_max_error']):.2e}; "
        f"quantum {float(c.attrs['log_normalizer_quantum']):.2e}",
        f"  teacher ran in {c.attrs.get('teacher_dtype', '?')} on {c.attrs.get('device', '?')}",
        "",
        "  fingerprint:",
        *_fingerprint_lines(c.fingerprint),
    ]
    c.close()
    return "\n".join(lines)


@cache_app.command("inspect")
def cache_inspect(
    path: Annotated[Path, typer.Argument(help="A cache file (e.g. data/teacher_logits/train.h5).")],
    sample: Annotated[int, typer.Option(help="Sequences sampled for the top-k mass histogram.")] = 256,
) -> None:
    """Shapes, dtypes, size, bytes per token and per logit, top-k mass histogram, error bound, fingerprint."""
    print(inspect_cache(path, sample))


# --------------------------------------------------------------------------- verify
def _regenerate(path: Path) -> str:
    return (
        f"delete {path} (and its shards) and regenerate it: `dvc repro teacher_logits`, or "
        "`kdsweep cache generate` with the options that made it"
    )


SANITY = (
    "input_ids in [0, vocab_size)",
    "top-k ids < vocab_size and strictly ascending",
    "top-k logits finite and <= 0, the largest exactly 0 (logits minus the max)",
    "tail log-normaliser and slopes finite",
    "tail below the top-k (t(b) <= log(V - k) + b * min top-k logit; t' <= min top-k logit)",
)


def _scan(c, report) -> list[str]:
    """Read every chunk (HDF5 checks each chunk's fletcher32 on read) and check every position."""
    import torch

    from kdsweep.cache import TAIL_FLOOR, decode_log_normalizer, log_normalizer

    problems: list[str] = []
    dsets = c.datasets()
    bad: dict[str, int] = {}
    v, k, betas = c.vocab_size, c.top_k, c.betas
    t_checks = sorted({float(betas[0]), float(betas[-1])} | ({1.0} if betas[0] <= 1.0 <= betas[-1] else set()))
    mass_check = f"top-k probabilities sum to <= 1 + {MASS_TOLERANCE:g} at T = " + ", ".join(
        f"{1 / b:g}" for b in reversed(t_checks)
    )
    block = max(1, 8192 // c.seq_len)
    chunks = 0
    for a in range(0, c.num_sequences, block):
        b = min(a + block, c.num_sequences)
        try:
            st = {key: ds[a:b] for key, ds in dsets.items()}
        except OSError as e:
            problems.append(
                f"checksums: sequences {a}..{b - 1} cannot be read: a chunk fails its fletcher32 checksum "
                f"or decompression ({e})"
            )
            continue
        chunks += len(dsets) * (b - a)
        d = st["topk_id_deltas"].astype(np.int64)
        ids = np.cumsum(d, axis=-1)
        s = st["topk_logits"].astype(np.float32)
        slope = st["tail_log_normalizer_slope"].astype(np.float32)
        t = decode_log_normalizer(st["tail_log_normalizer_residual"], st["tail_log_normalizer_slope"], betas)
        s_min = s.min(-1, keepdims=True)
        live = t > TAIL_FLOOR  # a floored (negligible or empty) tail has nothing to check
        slack = np.abs(s_min) * 2.0**-10 + 1e-3  # float16 rounding of the smallest top-k logit
        with np.errstate(invalid="ignore"):
            checks = {
                SANITY[0]: (st["input_ids"] < 0) | (st["input_ids"] >= v),
                SANITY[1]: (ids[..., 0] < 0) | (ids[..., -1] >= v) | (d[..., 1:] < 1).any(-1),
                SANITY[2]: ~np.isfinite(s).all(-1) | (s > 0).any(-1) | (s.max(-1) != 0),
                SANITY[3]: ~np.isfinite(t).all(-1) | ~np.isfinite(slope).all(-1),
                SANITY[4]: (live & ((t > np.log(max(v - k, 1)) + betas * s_min + slack) | (slope > s_min + slack))).any(
                    -1
                ),
            }
        values = torch.from_numpy(np.concatenate([t, np.nan_to_num(s)], -1))
        over = np.zeros(s.shape[:-1], dtype=bool)
        for beta in t_checks:
            lse = log_normalizer(values, torch.from_numpy(slope), betas, beta)
            over |= (
                torch.exp(torch.logsumexp(values[..., len(betas) :] * beta, -1) - lse) > 1 + MASS_TOLERANCE
            ).numpy()
        checks[mass_check] = over
        for name, mask in checks.items():
            if mask.any():
                bad[name] = bad.get(name, 0) + int(mask.sum())
    failed_read = any(p.startswith("checksums") for p in problems)
    report(f"  checksums: {chunks:,} chunks read, fletcher32 verified" if not failed_read else "  checksums: FAILED")
    positions = c.num_sequences * c.seq_len
    for name in (*SANITY, mass_check):
        report(f"  sanity: {name}: " + (f"FAILED at {bad[name]:,} of {positions:,} positions" if name in bad else "ok"))
    return problems + [f"sanity: {name}: fails at {count:,} of {positions:,} positions" for name, count in bad.items()]


def _teacher_candidates(c, teacher: str | None) -> list[tuple[str, bool]]:
    """(where to load the teacher from, whether its identity must match the fingerprint first)."""
    if teacher is not None:
        return [(teacher, False)]
    ident = c.fingerprint.get("teacher", {})
    if ident.get("model") != "embedded":
        return [(ident["model"], False)] if ident.get("model") else []
    return [(str(p), True) for p in (c.path.parent / "teacher", Path("models/teacher")) if p.is_dir()]


def _load_teacher_for(c, teacher: str | None, report):
    """The teacher that made the cache (on the default device, bf16 on a capable GPU), or None
    with the reason reported."""
    from kdsweep.models import POINTER, default_device, load_causal_lm, resolve_dtype, teacher_identity, teacher_source

    device = default_device()
    dtype = resolve_dtype("auto", device)

    for cand, check in _teacher_candidates(c, teacher):
        p = Path(cand)
        try:
            if check and teacher_identity(p) != c.fingerprint.get("teacher"):
                report(f"  teacher: {p} holds another teacher than the fingerprint names; skipped")
                continue
            if p.is_dir() and (p / POINTER).is_file():  # a teacher stage's pointer to a hub/local model
                src = teacher_source(p)
                model = load_causal_lm(src["model"], revision=src.get("revision"), dtype=dtype)
            else:
                revision = None if teacher is not None else c.fingerprint.get("teacher", {}).get("revision")
                model = load_causal_lm(cand, revision=revision, dtype=dtype)
            return model.to(device).eval(), cand
        except UserError as e:
            report(f"  teacher: {cand} not available ({str(e).splitlines()[0][:160]})")
    return None, None


def _top1_agreement(c, model, sample: int) -> tuple[float, float, int]:
    """Fraction of sampled positions whose stored top-1 is the fresh forward's top-1 (ties within
    TOP1_TIE count), the largest |p_cache - p_fresh| over the top-k at the first checked T, and
    the positions checked."""
    import torch

    from kdsweep.cache import teacher_topk_probs

    idx = _sample_indices(c.num_sequences, sample)
    batch = c.read(idx)
    lo, hi = c.temperature_range
    t = 1.0 if lo <= 1.0 <= hi else lo
    with torch.no_grad():
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[..., : c.vocab_size].float().cpu()
    top_ids = torch.as_tensor(batch["topk_ids"].astype(np.int64))
    vals = torch.as_tensor(batch["topk_logits"]).float()
    stored_top1 = top_ids.gather(-1, vals.argmax(-1, keepdim=True))
    fresh_max = logits.max(-1).values
    agree = logits.gather(-1, stored_top1).squeeze(-1) >= fresh_max - TOP1_TIE
    p_cache, _ = teacher_topk_probs(batch, c.betas, t)
    p_fresh = torch.softmax(logits / t, -1).gather(-1, top_ids)
    return float(agree.float().mean()), float((p_cache - p_fresh).abs().max()), int(agree.numel())


def verify_cache(
    path: Path,
    *,
    params_path: Path | None = None,
    teacher: str | None = None,
    prepared_dir: Path | None = None,
    sample: int = 8,
    report=print,
) -> None:
    """``kdsweep cache verify``: report each check; raise a UserError listing every failed one."""
    from kdsweep.cache import TeacherLogitCache

    c = TeacherLogitCache(path)  # refuses missing, truncated, incomplete, other-version files and missing shards
    report(f"{path}: {c.num_sequences} sequences x {c.seq_len} tokens, top-{c.top_k} of {c.vocab_size}")
    report(
        "  completeness: ok (complete, format version %d%s)"
        % (int(c.attrs["format_version"]), f", {len(c.shards)} shards complete" if c.shards else "")
    )
    problems = _scan(c, report)
    bound = float(c.attrs["log_normalizer_max_error"])
    if bound > MAX_INTERPOLATION_ERROR:
        problems.append(
            f"interpolation: stored log-normaliser error bound {bound:.2e} exceeds "
            f"{MAX_INTERPOLATION_ERROR:g}; raise teacher.temperature_grid (or narrow "
            "teacher.temperature_range) and regenerate"
        )
    ok = bound <= MAX_INTERPOLATION_ERROR
    report(f"  interpolation error bound: {bound:.2e} (log space) " + ("ok" if ok else "FAILED"))
    report("  fingerprint:")
    for line in _fingerprint_lines(c.fingerprint):
        report(line)

    if params_path is not None:
        problems += _check_against_params(c, params_path, teacher, prepared_dir, report)

    model, source = _load_teacher_for(c, teacher, report)
    if model is None:
        report("  top-1 agreement: skipped (teacher not available; pass --teacher DIR_OR_ID)")
    else:
        agreement, max_dp, n = _top1_agreement(c, model, sample)
        ok = agreement >= MIN_TOP1_AGREEMENT
        report(
            f"  top-1 agreement with a fresh forward of {source}: {agreement:.2%} of {n:,} positions "
            f"(max |p_cache - p_fresh| {max_dp:.1e}) " + ("ok" if ok else "FAILED")
        )
        if not ok:
            problems.append(
                f"top-1 agreement: {agreement:.2%} < {MIN_TOP1_AGREEMENT:.0%} with a fresh forward of "
                f"{source}; the cache was not made by this teacher (or is corrupt)"
            )
    c.close()
    if problems:
        raise UserError(f"{path}: verify failed:\n  " + "\n  ".join(problems) + f"\nfix: {_regenerate(path)}")
    report(f"{path}: ok")


def _check_against_params(c, params_path: Path, teacher: str | None, prepared_dir: Path | None, report) -> list[str]:
    """Fingerprint against the config (and prepared data), and the stored inputs against the prepared split."""
    from kdsweep.cache import diff_fingerprints
    from kdsweep.data import load_prepared
    from kdsweep.stages.teacher_logits import expected_fingerprint

    params = _params(params_path)
    split = c.fingerprint.get("split", "train")
    cands = [prepared_dir] if prepared_dir else [c.path.parent / "prepared", Path("data/prepared")]
    prep_dir = next((p for p in cands if (p / "meta.json").is_file()), None)
    if prep_dir is None:
        report(
            f"  fingerprint vs {params_path}: skipped (no prepared data in {', '.join(map(str, cands))}; "
            "pass --prepared)"
        )
        return []
    prepared = load_prepared(prep_dir)
    teacher_dir = next(
        (
            p
            for p in ([Path(teacher)] if teacher else [c.path.parent / "teacher", Path("models/teacher")])
            if p.is_dir()
        ),
        None,
    )
    if teacher_dir is None:
        report("  fingerprint: no teacher directory found; the teacher's identity is not compared")
    expected = expected_fingerprint(prepared, teacher_dir, params, split)
    diffs = diff_fingerprints(c.fingerprint, expected)
    problems = [f"fingerprint: differs from {params_path} + {prep_dir}: " + "; ".join(diffs)] if diffs else []
    report(f"  fingerprint vs {params_path} + {prep_dir}: " + ("ok" if not diffs else "FAILED: " + "; ".join(diffs)))
    off = int(c.attrs.get("sequence_offset", 0))
    data = prepared.split(split)[off : off + c.num_sequences]
    same = data.shape == (c.num_sequences, c.seq_len) and all(
        np.array_equal(c.read(list(range(a, min(a + 256, c.num_sequences))))["input_ids"], data[a : a + 256])
        for a in range(0, c.num_sequences, 256)
    )
    report(f"  input_ids vs {prep_dir}/{split}.npy: " + ("ok (aligned)" if same else "FAILED"))
    if not same:
        problems.append(f"alignment: stored input_ids differ from {prep_dir}/{split}.npy")
    return problems


@cache_app.command("verify")
def cache_verify(
    path: Annotated[Path, typer.Argument(help="A cache file (e.g. data/teacher_logits/train.h5), merged or not.")],
    params: Annotated[
        Path | None,
        typer.Option(
            "--params",
            "-p",
            help="Also compare the fingerprint (and stored input ids) with this params file and its prepared data.",
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher directory or Hugging Face id for the top-1 check; default: the one the fingerprint names "
            "(models/teacher or <cache dir>/teacher for the embedded teacher)."
        ),
    ] = None,
    prepared: Annotated[
        Path | None,
        typer.Option(help="Prepared data directory for --params; default <cache dir>/prepared, then data/prepared."),
    ] = None,
    sample: Annotated[int, typer.Option(help="Sequences the teacher re-runs for the top-1 agreement check.")] = 8,
) -> None:
    """Check a cache: completeness, every chunk's checksum, sanity of every position, fingerprint, top-1 agreement.

    The top-1 check re-runs the teacher on a sample of sequences when it is available.

    Exit status 0 when every check passes, 2 (listing the failed checks and the fix) otherwise.
    """
    verify_cache(path, params_path=params, teacher=teacher, prepared_dir=prepared, sample=sample)
