"""``kdsweep cache ...``: create, check, describe and merge teacher-logit caches.

``generate`` without options is the DVC stage ``teacher_logits`` (params.yaml, default
paths); with any of the reference script's options it runs standalone into ``--output-dir``.
``verify`` and ``inspect`` read any cache file, merged or not, and need no params.
The work is done elsewhere (the stage, :mod:`kdsweep.cache.writer`, :mod:`kdsweep.cache.verify`),
imported inside the commands so that ``kdsweep --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kdsweep.errors import UserError

cache_app = typer.Typer(help="Create, check, describe and merge teacher-logit caches (HDF5).", no_args_is_help=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file (validated before anything runs).")]


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
    devices: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run N shard processes at once, one per GPU (on a CPU machine: N processes), and merge them "
            "(default: teacher.cache_devices).",
        ),
    ] = None,
) -> None:
    """Run the teacher over both splits and write the top-k cache.

    Without the standalone options: the DVC stage `teacher_logits` (params.yaml, data/prepared, models/teacher).

    With any of them: params.yaml (if present) overridden by the options, everything written under --output-dir.

    An interrupted run resumes where it stopped when run again (with --devices: every shard).
    """
    options = dict(
        teacher_model=teacher_model,
        dataset=dataset,
        dataset_config=dataset_config,
        top_k=top_k,
        batch_size=batch_size,
        max_samples=max_samples,
    )
    if shard is not None and devices not in (None, 1):
        raise UserError("--shard and --devices: a shard is one process; give one of them")
    if output_dir is not None or any(v is not None for v in options.values()):
        _generate_standalone(params, output_dir or Path("teacher_logits"), options, _parse_shard(shard), devices)
        return
    # The DVC stage `teacher_logits`: its dvc.yaml deps are the import closure of this path.
    from kdsweep.config import load_params
    from kdsweep.stages import teacher_logits as stage

    p = load_params(params)
    n = 1 if shard is not None else devices or p.teacher.cache_devices
    if n > 1:
        stage.on_devices(_shard_command(["--params", str(params)]), n)
    else:
        stage.main(p, shard=_parse_shard(shard))


def _shard_command(args: list[str]) -> list[str]:
    """``kdsweep cache generate <args>`` as a shard process runs it (it adds ``--shard i/N``)."""
    return [sys.executable, "-m", "kdsweep.cli", "cache", "generate", *args]


def _generate_standalone(
    params: Path, output_dir: Path, options: dict, shard: tuple[int, int] | None, devices: int | None
) -> None:
    """Standalone mode (outside DVC): prepare, teacher and cache under ``output_dir``."""
    from kdsweep.cache.standalone import standalone, standalone_params

    p = standalone_params(params, **options)
    n = 1 if shard is not None else devices or p.teacher.cache_devices
    given = {f"--{key.replace('_', '-')}": value for key, value in options.items() if value is not None}
    args = ["--params", str(params), "--output-dir", str(output_dir)]
    args += [x for key, value in given.items() for x in (key, str(value))]
    standalone(p, output_dir, shard=shard, devices=n, shard_command=_shard_command(args))


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
    from kdsweep.cache.writer import merge

    for target in merge(path):
        print(f"{target}: merged {target.stem}.shard-*.h5")


@cache_app.command("inspect")
def cache_inspect(
    path: Annotated[Path, typer.Argument(help="A cache file (e.g. data/teacher_logits/train.h5).")],
    sample: Annotated[int, typer.Option(help="Sequences sampled for the top-k mass histogram.")] = 256,
) -> None:
    """Shapes, dtypes, size, bytes per token and per logit, top-k mass histogram, error bound, fingerprint."""
    from kdsweep.cache.verify import inspect_cache

    print(inspect_cache(path, sample))


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
    from kdsweep.cache.verify import verify_cache

    verify_cache(path, params_path=params, teacher=teacher, prepared_dir=prepared, sample=sample)
