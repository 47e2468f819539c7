"""``kdsweep cache ...``: create, check and describe teacher-logit caches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdsweep.errors import UserError

cache_app = typer.Typer(help="Create, check and describe teacher-logit caches (HDF5).", no_args_is_help=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file (validated before anything runs).")]


def _params(path: Path):
    from kdsweep.config import load_params

    return load_params(path)


@cache_app.command("generate")
def cache_generate(
    params: ParamsOpt = Path("params.yaml"),
    shard: Annotated[Optional[str], typer.Option(help="Write only shard I of N, as I/N (merge with `cache merge`).")] = None,
) -> None:
    """Run the teacher over both splits and write the top-k cache (the `teacher_logits` stage)."""
    from kdsweep.stages import teacher_logits as stage

    stage.main(_params(params), shard=_parse_shard(shard))


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
