"""``kdsweep run experiments/<study>.yaml --slurm N``: the study's runners as one Slurm job array.

    check the spec as --check does (params.yaml, dvc.yaml, the student, the storage)   (preflight.py)
    script = #SBATCH lines (array 0..N-1, the spec's execution.slurm) + `exec kdsweep run <spec>`
    --dry-run: print the script; else write studies/<study>/slurm/<study>.sbatch and `sbatch` it
    each array task is one runner (runner.py) with its own workers: it claims trials until the
    study's budget, shared by every runner through the storage's lock, is met  (budget.py)

There is no batch barrier: a task whose trial ends takes the next one at once, and a task that
starts late (the queue was full) joins the study then. Tasks run in this clone (``--chdir``),
which must be on a filesystem the nodes mount; with ``execution.push`` every trial's experiment
also goes to the git remote and its outputs to the DVC remote. The storage is the spec's: a
database server for tasks on several nodes, a journal file only when they share one node.

The script holds no secret: it names the spec, not the storage URL, and a database password
comes from the environment the job inherits (``--export=ALL``: ``PGPASSWORD``) or from
``~/.pgpass``. A task that Slurm cancels or preempts gets SIGTERM: its runner fails the running
trial as interrupted and enqueues it again (not counted toward the budget); if it is killed
before that, the trial's heartbeats stop and another runner retries it (outcome.py).

Each runner records its Slurm job and array task in its identity (:func:`task_identity`), which
``kdsweep status`` shows beside each running trial.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from kdsweep.errors import UserError
from kdsweep.fsio import write_text
from kdsweep.optuna_io import check_storage, display
from kdsweep.sweep import dvcexp
from kdsweep.sweep.preflight import Workspace, preflight
from kdsweep.sweep.spec import StudySpec, load_spec
from kdsweep.sweep.study import storage_url

# The variables Slurm sets in a task, under the names the runner identity stores them.
TASK_ENV = {"job": "SLURM_JOB_ID", "array_job": "SLURM_ARRAY_JOB_ID", "task": "SLURM_ARRAY_TASK_ID"}


def task_identity(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{"slurm": {"job", "array_job", "task"}}`` inside a Slurm job (the keys it sets), else ``{}``."""
    found = {key: environ[var] for key, var in TASK_ENV.items() if environ.get(var)}
    return {"slurm": found} if "job" in found else {}


def describe_task(owner: Mapping) -> str:
    """How ``kdsweep status`` names the Slurm task of a runner identity: ``slurm 41_1 (job 42)``; '' outside Slurm."""
    s = owner.get("slurm") or {}
    if not s:
        return ""
    if "array_job" in s and "task" in s:
        return f"slurm {s['array_job']}_{s['task']} (job {s['job']})"
    return f"slurm job {s['job']}"


def gres_count(spec: StudySpec) -> int | None:
    """GPUs each task asks for: ``devices_per_trial`` x ``workers``; None for a CPU-only spec (``gres: null``)."""
    if spec.execution.slurm.gres is None:
        return None
    return spec.execution.devices_per_trial * spec.workers


def render_script(spec: StudySpec, spec_arg: str, root: Path, tasks: int, task_args: list[str], kdsweep: str) -> str:
    """The sbatch script of ``tasks`` runners of ``spec`` (read from ``spec_arg``, relative to ``root``).

    ``task_args`` are the options each runner gets after ``kdsweep run <spec>``; ``kdsweep`` is
    the command that runs it. Pure: the same inputs give the same text.
    """
    sl = spec.execution.slurm
    logs = root / "studies" / spec.study / "slurm"
    gpus = gres_count(spec)
    options = [
        f"--job-name=kdsweep-{spec.study}",
        f"--array=0-{tasks - 1}",
        "--ntasks=1",  # one runner per task; its workers are threads and their trials' processes
        f"--chdir={root}",
        f"--output={logs}/%A_%a.log",
        "--open-mode=append",  # a requeued task adds to its log
        "--export=ALL",  # the submitting shell's environment: PATH, PGPASSWORD, credentials of the remotes
    ]
    options += [f"--gres={sl.gres}:{gpus}"] if gpus else []
    options += [f"--{key}={value}" for key in ("partition", "time", "account") if (value := getattr(sl, key))]
    command = shlex.join([kdsweep, "run", spec_arg, *task_args])
    return "\n".join(
        [
            "#!/bin/bash",
            f"# {tasks} runner(s) of study {spec.study}: each claims trials until the study's budget is met.",
            f"# Written by `kdsweep run {spec_arg} --slurm {tasks}`; `kdsweep status {spec.study}` follows them.",
            *(f"#SBATCH {o}" for o in options + list(sl.extra)),
            "",
            f"exec {command}",
            "",
        ]
    )


def _kdsweep_command() -> str:
    """This installation's ``kdsweep`` (the script beside the running Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("kdsweep")
    return str(beside) if beside.is_file() else "kdsweep"


def _spec_arg(spec_path: Path, root: Path) -> str:
    """The spec as a task names it: relative to the repository root (each task runs there)."""
    path = spec_path.resolve()
    if root.resolve() not in path.parents:
        raise UserError(f"{spec_path}: the study spec must be inside the repository {root} (the tasks run there)")
    return str(path.relative_to(root.resolve()))


def submit(script: Path, root: Path) -> str:
    """``sbatch --parsable`` the script; returns the job id. A missing or refusing sbatch is a :class:`UserError`."""
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script)], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: run --slurm on a machine of the Slurm cluster (a login node)") from None
    if r.returncode != 0:
        raise UserError(f"sbatch {script} refused the job: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]


def launch(spec_path: Path, tasks: int, *, workers: int | None, n_trials: int | None, dry_run: bool) -> int:
    """``kdsweep run --slurm N``: see the module docstring."""
    if tasks < 1:
        raise UserError(f"--slurm {tasks}: the number of array tasks (runners) must be >= 1")
    root = dvcexp.repo_root(Path.cwd())
    spec, _ = load_spec(spec_path)
    spec = spec.model_copy(update={"workers": workers or spec.workers})
    if n_trials is not None:
        spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"n_trials": n_trials})})
    if spec.execution.slurm.gres is not None and spec.execution.devices != "auto":
        raise UserError(
            f"execution.devices: {spec.execution.devices} names one machine's GPUs; a Slurm task uses the GPUs "
            f"Slurm gives it: set devices: auto (or execution.slurm.gres: null for CPU-only tasks)"
        )
    # With --dry-run stdout is the script alone (`> job.sbatch`); the checks' notes go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if dry_run else contextlib.nullcontext():
        plan, _ = preflight(spec, spec_path, Workspace.read(root), check_only=True)
        print(plan.summary())
    url = storage_url(spec, root)
    if problems := check_storage(url):
        raise UserError("\n".join(problems))
    task_args = ["--workers", str(spec.workers)] + (["--n-trials", str(n_trials)] if n_trials is not None else [])
    text = render_script(spec, _spec_arg(spec_path, root), root, tasks, task_args, _kdsweep_command())
    if dry_run:
        print(text, end="")
        return 0
    if not url.startswith(("postgresql", "mysql")):
        print(f"note: storage {display(url, root)} is a file: every task must run on one node (use PostgreSQL)")
    logs = root / "studies" / spec.study / "slurm"
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    script = logs / f"{spec.study}.sbatch"
    write_text(script, text)
    job = submit(script, root)
    print(
        f"submitted Slurm job {job}: {tasks} runner(s) of study {spec.study} ({display(url, root)}), tasks "
        f"{job}_0..{job}_{tasks - 1}; logs {logs.relative_to(root)}/{job}_<task>.log\n"
        f"follow: kdsweep status {spec.study}; squeue -j {job}; stop: scancel {job} (running trials are retried)"
    )
    return 0
