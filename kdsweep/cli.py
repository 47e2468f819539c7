"""The ``kdsweep`` command. Each pipeline stage of ``dvc.yaml`` is one subcommand.

Stage modules are imported inside the commands, so ``kdsweep --help`` stays fast.
A :class:`~kdsweep.errors.UserError` anywhere ends the process with its message and exit
status 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kdsweep.cache.cli import cache_app
from kdsweep.errors import UserError
from kdsweep.sweep.cli import sweep_app

app = typer.Typer(
    help="Declarative experiment sweeps for knowledge distillation of language models (DVC + Optuna).\n\n"
    "The pipeline stages (run by `dvc repro`, see dvc.yaml): prepare -> teacher -> teacher_logits "
    "(`cache generate`) -> student -> distill -> evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file (validated before anything runs).")]


def _params(path: Path):
    from kdsweep.config import load_params

    return load_params(path)


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Tokenizer plus packed train/validation sequences (section `dataset`, `tokenizer`)."""
    from kdsweep.stages import prepare as stage

    stage.main(_params(params))


@app.command()
def teacher(params: ParamsOpt = Path("params.yaml")) -> None:
    """Point at the hub/local teacher, or train the embedded Qwen3-MoE teacher (section `teacher`)."""
    from kdsweep.stages import teacher as stage

    stage.main(_params(params))


@app.command()
def student(params: ParamsOpt = Path("params.yaml")) -> None:
    """Derive the student from the teacher: shared expert core + per-expert wrappers (section `student`)."""
    from kdsweep.stages import student as stage

    stage.main(_params(params))


@app.command()
def distill(
    params: ParamsOpt = Path("params.yaml"),
    resume: Annotated[bool, typer.Option(help="Continue from <checkpoint-dir>/last.")] = False,
    run_dir: Annotated[
        Path, typer.Option(envvar="KDSWEEP_RUN_DIR", help="TensorBoard run directory (a sweep sets one per trial).")
    ] = Path("runs/distill"),
    checkpoint_dir: Annotated[
        Path,
        typer.Option(envvar="KDSWEEP_CHECKPOINT_DIR", help="Checkpoint directory (a sweep sets one per trial)."),
    ] = Path("checkpoints/distill"),
    hparam_keys: Annotated[
        str,
        typer.Option(
            envvar="KDSWEEP_HPARAM_KEYS",
            help="Comma-separated dotted params keys added to TensorBoard's HParams tab "
            "(a sweep passes the keys it samples).",
        ),
    ] = "",
    trial: Annotated[
        str | None,
        typer.Option(
            envvar="KDSWEEP_TRIAL",
            help="The sweep trial this run belongs to (JSON, set by `kdsweep run`): each evaluation is "
            "reported to it, and its pruner can stop the run.",
        ),
    ] = None,
) -> None:
    """Train the student on the teacher (sections `loss`, `training`, `parameter_lr_multipliers`, `stages`).

    `dvc exp run` cannot pass arguments to a stage, so the sweep sets the options above through
    their environment variables; they are ordinary options everywhere else.
    """
    from kdsweep.stages import distill as stage
    from kdsweep.trial_hook import eval_hook

    p = _params(params)
    stage.main(
        p,
        resume=resume,
        run_dir=run_dir,
        checkpoint_dir=checkpoint_dir,
        hparam_keys=hparam_keys.split(","),
        eval_hook=eval_hook(trial, p),
    )


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validation CE, perplexity, KL to the teacher and top-1 agreement, before and after distillation."""
    from kdsweep.stages import evaluate as stage

    stage.main(_params(params))


# Every command module has its own typer app; they are joined here, one way for all.
app.add_typer(cache_app, name="cache")  # kdsweep cache generate | merge | inspect | verify
app.add_typer(sweep_app)  # kdsweep run | best | report | status


def main() -> None:
    """Console entry point: user errors become a message and exit status 2."""
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # `python -m kdsweep.cli`, as torchrun launches it: `torchrun ... -m kdsweep.cli distill`
    main()
