"""The ``kdsweep`` command. Each pipeline stage of ``dvc.yaml`` is one subcommand.

Stage modules are imported inside the commands, so ``kdsweep --help`` stays fast.
A :class:`~kdsweep.errors.UserError` anywhere ends the process with its message and exit
status 2, without a traceback.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdsweep.cache.cli import cache_app
from kdsweep.errors import UserError
from kdsweep.sweep.cli import sweep_app

TRIAL_ENV = "KDSWEEP_TRIAL"  # the sweep trial's context (kdsweep.trial_hook.ENV), storage password included

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
            envvar=TRIAL_ENV,
            help="The sweep trial this run belongs to (JSON, set by `kdsweep run`): each evaluation is "
            "reported to it, and its pruner can stop the run.",
        ),
    ] = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="KDSWEEP_NPROC_PER_NODE",
            help="Processes (one per device) to train with: > 1 runs this same command under "
            "`torchrun --standalone --nproc_per_node N` (a sweep sets it from execution.devices_per_trial).",
        ),
    ] = 1,
) -> None:
    """Train the student on the teacher (sections `loss`, `training`, `parameter_lr_multipliers`, `stages`).

    `dvc exp run` cannot pass arguments to a stage, so the sweep sets the options above through
    their environment variables; they are ordinary options everywhere else.
    """
    if not _under_torchrun():
        from kdsweep import warm

        # In a sweep trial, hand the process over to the runner's warm process (torch already
        # imported there); without one, or if it is gone, run here as always.
        status = warm.delegate()
        if status is not None:
            raise typer.Exit(status)
        _print_devices(nproc_per_node)
        if nproc_per_node > 1:
            options = {"--params": params, "--run-dir": run_dir, "--checkpoint-dir": checkpoint_dir}
            options |= {"--hparam-keys": hparam_keys}
            # The trial context names the study's storage, password included: it goes to the ranks
            # through their environment (torchrun passes it on), never on a command line.
            secrets = {TRIAL_ENV: trial} if trial else {}
            _exec_torchrun(nproc_per_node, ["distill", "--resume" if resume else "--no-resume"], options, secrets)
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


def _under_torchrun() -> bool:
    """True in a process torchrun started (it sets these for every rank)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def _print_devices(nproc: int) -> None:
    """Say which devices this run holds, so that a sweep trial's log shows them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None or nproc > 1:
        shown = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
        print(f"distill: {shown}; {nproc} process{'es' * (nproc > 1)}", flush=True)


def _exec_torchrun(nproc: int, argv: list[str], options: dict, env: dict[str, str] | None = None) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node <nproc> -m kdsweep.cli <argv> <options>``.

    Replacing it (rather than waiting on a child) keeps the process id DVC and the sweep stop, and
    makes torchrun's exit status this command's. ``env`` is added to the environment the ranks
    inherit: what must not appear in the process table or the printed command.
    """
    args = [*argv] + [x for key, value in options.items() if value is not None for x in (key, str(value))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "kdsweep.cli", *args]
    print(f"distill: running under torchrun: {shlex.join(cmd[1:])}", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, cmd, {**os.environ, **(env or {})})


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validation CE, perplexity, KL to the teacher and top-1 agreement, before and after distillation."""
    from kdsweep.stages import evaluate as stage

    stage.main(_params(params))


# Every command module has its own typer app; they are joined here, one way for all.
app.add_typer(cache_app, name="cache")  # kdsweep cache generate | merge | inspect | verify
app.add_typer(sweep_app)  # kdsweep run | best | report | status | dashboard


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


if __name__ == "__main__":  # `python -m kdsweep.cli`: torchrun's ranks (`torchrun ... -m kdsweep.cli distill`), shards
    main()
