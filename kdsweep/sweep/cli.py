"""The sweep's commands: ``kdsweep run`` (here, or ``--slurm N`` as a job array), ``best``, ``report``,
``status``, ``dashboard``.

Each imports its module inside the command, so ``kdsweep --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

sweep_app = typer.Typer()  # joined into `kdsweep` at the top level (no group name)

StudyArg = Annotated[str, typer.Argument(help="A study name (storage studies/<name>.journal) or its spec file.")]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage: a .journal path or an RDB URL (default: the spec's, or studies/<name>.journal).",
    ),
]


@sweep_app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="The study spec, e.g. experiments/demo.yaml (see docs/study-spec.md).")],
    workers: Annotated[
        int | None, typer.Option(help="Trials run in parallel (overrides the spec's `workers`).")
    ] = None,
    n_trials: Annotated[int | None, typer.Option(help="Overrides the spec's budget.n_trials.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate the spec and print the plan; run nothing.")] = False,
    slurm: Annotated[
        int | None,
        typer.Option(
            help="Submit N runners as a Slurm job array (`sbatch`, options from execution.slurm); they share the "
            "study's budget. See docs/scale-out.md."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --slurm: print the sbatch script; submit nothing.")
    ] = False,
) -> None:
    """Run an Optuna study: every trial is a DVC experiment <study>-<number>; re-run to resume."""
    from kdsweep.errors import UserError

    if slurm is None and dry_run:
        raise UserError("--dry-run goes with --slurm N (it prints the sbatch script); --check validates a spec")
    if slurm is not None:
        if check:
            raise UserError("--check and --slurm: use --slurm N --dry-run to validate and print the script")
        from kdsweep.sweep.slurm import launch

        launch(spec, slurm, workers=workers, n_trials=n_trials, dry_run=dry_run)
        return
    from kdsweep.sweep.runner import run as run_study

    _at_least_one("--workers", workers, "workers")
    _at_least_one("--n-trials", n_trials, "budget.n_trials")
    run_study(spec, workers=workers, n_trials=n_trials, check=check)


def _at_least_one(option: str, value: int | None, key: str) -> None:
    """An option that overrides a spec key is checked as the spec checks that key (>= 1)."""
    from kdsweep.errors import UserError

    if value is not None and value < 1:
        raise UserError(
            f"{option}: must be >= 1, got {value} (it overrides the spec's {key}); omit it to use the spec's"
        )


@sweep_app.command()
def best(
    study: StudyArg,
    storage: StorageOpt = None,
    top: Annotated[int, typer.Option(help="Rows to show.")] = 20,
    apply: Annotated[
        bool, typer.Option("--apply", help="`dvc exp apply` the best complete trial to the workspace.")
    ] = False,
    branch: Annotated[str | None, typer.Option(help="Make a git branch of the best trial (`dvc exp branch`).")] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="--apply even though params.yaml has uncommitted changes (those the trial does not set stay).",
        ),
    ] = False,
) -> None:
    """Trials ranked by the objective (complete first, then pruned by last value), then their test metrics."""
    from kdsweep.sweep.results import best as show_best

    if top < 1:
        from kdsweep.errors import UserError

        raise UserError(f"--top: must be >= 1, got {top} (the number of ranked trials to show)")

    show_best(study, storage, top=top, apply=apply, branch=branch, force=force)


@sweep_app.command()
def report(
    study: StudyArg,
    storage: StorageOpt = None,
    out: Annotated[Path | None, typer.Option(help="Directory of the report (default reports/<study>).")] = None,
) -> None:
    """Markdown report: PNG plots (history, all trials' curves, importances, parallel coordinates, alpha x T),
    test metrics of the best trials, the best against the baseline, and dvc exp show."""
    from kdsweep.sweep.results import report as write_report

    write_report(study, storage, out)


@sweep_app.command()
def status(study: StudyArg, storage: StorageOpt = None) -> None:
    """Progress of a study: finished, running and waiting trials, the best so far, time left."""
    from kdsweep.sweep.results import status as show_status

    show_status(study, storage)


@sweep_app.command()
def dashboard(
    study: StudyArg,
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8080,
) -> None:
    """optuna-dashboard over the study's storage (live while it runs): history, importances, every trial."""
    from kdsweep.sweep.dashboard import serve

    serve(study, storage, host, port)
