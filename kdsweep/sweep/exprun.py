"""Run one trial's ``dvc exp run`` and supervise it: log, heartbeat, stop, retry on lock errors.

A trial runs as::

    dvc exp run --temp --force --single-item -n <study>-<number> \\
        -S 'params.yaml:++loss.alpha=0.5' -S 'params.yaml:++parameter_lr_multipliers=[{...}]' ... distill

- ``--temp``: in a temporary copy of the repository, so several trials run at once and the
  workspace is untouched;
- ``--single-item distill``: only the stages a trial runs; upstream stages (prepare,
  teacher, teacher_logits, student) are checked out from the cache, never reproduced;
- ``--force``: always train, even when DVC's run-cache holds a run with the same params (a
  restored run would report nothing to the pruner and write no TensorBoard events);
- ``-C <path>``: copy a file git does not track (an uncommitted ``dvc.lock``) into the copy;
- ``-S`` values are written in Hydra's override grammar (:func:`kdsweep.sweep.dvcexp.set_param_args`).

Supervision, per attempt::

    start the command in its own process group (so a stop reaches DVC and the stage it runs)
    every line it prints -> studies/<study>/logs/<number>.log, timestamped, flushed per line
    stopping()? -> SIGINT the group (DVC removes its temporary copy), then SIGKILL
    a lock error between concurrent `dvc exp run`s -> remove the attempt's leftovers, retry

The command's timing (:func:`timings`) comes from what ``kdsweep distill`` writes into
``metrics/distill.json`` (``started_at``, ``seconds``, ``train_seconds``), never from its console.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kdsweep.sweep import dvcexp
from kdsweep.sweep.dvcexp import TRANSIENT


def exp_run_command(name: str, overrides: dict[str, Any], stages: list[str], copy_paths: list[str]) -> list[str]:
    """The ``dvc exp run`` of one trial (see the module docstring for each flag)."""
    cmd = ["dvc", "exp", "run", "--temp", "--force", "--single-item", "-n", name]
    for path in copy_paths:
        cmd += ["-C", path]
    return cmd + dvcexp.set_param_args(overrides) + list(stages)


# --------------------------------------------------------------------------- processes
def process_identity(pid: int | None = None) -> dict[str, Any]:
    """``{"host", "pid", "started"}`` of a process (default: this one); ``started`` tells a reused pid apart."""
    import psutil

    pid = os.getpid() if pid is None else pid
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None
    return {"host": socket.gethostname(), "pid": pid, "started": started}


def kill_group(pid: int, proc: subprocess.Popen | None = None, grace: float = 10.0) -> None:
    """SIGINT a trial's process group (DVC then removes its temporary copy), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our child: a zombie still counts as a member of the group
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def tail(output: str, lines: int = 12, chars: int = 1500) -> str:
    """The informative end of a failed run's output: progress bars and repeats dropped."""
    keep = []
    for line in output.replace("\r", "\n").splitlines():
        s = line.strip()
        if not s or "it/s]" in s or "step/s" in s or "batch/s" in s or s.startswith(("Loading weights", "Writing")):
            continue
        keep.append(s)
    return "\n".join(list(dict.fromkeys(keep))[-lines:])[-chars:]


# --------------------------------------------------------------------------- one experiment
@dataclass
class TrialRun:
    """One attempt of ``dvc exp run``: exit status, console output, wall time, launch time."""

    rc: int
    output: str
    wall: float
    launched_at: float  # unix time `dvc exp run` started, on the clock of distill's own `started_at`


@dataclass
class Watch:
    """How the runner hears from a supervised attempt and stops it.

    ``started(child)`` gets the child's :func:`process_identity` once it runs; ``stopping()`` true
    makes the supervisor stop the attempt's processes. (The trial's heartbeats come from the
    runner's own thread, :class:`kdsweep.sweep.budget.Heartbeats`, for as long as it owns the trial.)
    """

    started: Callable[[dict[str, Any]], None]
    stopping: Callable[[], bool]


def run_experiment(
    cmd: list[str], *, root: Path, env: dict[str, str], log: Path, name: str, retries: int, watch: Watch
) -> TrialRun:
    """Run ``cmd`` (a trial's ``dvc exp run`` for experiment ``name``), retrying lock errors ``retries`` times.

    Stops at the first attempt that succeeded, recorded the experiment, failed for its own
    reasons, or was stopped (``watch.stopping()``).
    """
    for attempt in range(retries + 1):
        run = _attempt(cmd, root, env, log, attempt, watch)
        if watch.stopping() or run.rc == 0 or name in dvcexp.exp_refs(root):
            break
        if not TRANSIENT.search(run.output) or attempt == retries:
            break
        dvcexp.clean_tempdirs(root, name)
        tqdm.write(f"{name}: transient git/DVC lock error; retrying ({attempt + 1})")
        time.sleep(1.0 + attempt * 2.0)
    return run


def _attempt(cmd: list[str], root: Path, env: dict[str, str], log_path: Path, attempt: int, watch: Watch) -> TrialRun:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered: a SIGKILLed runner leaves every line the trial printed so far.
    with log_path.open("a", buffering=1) as log:
        log.write(f"# attempt {attempt + 1}: {' '.join(cmd)}\n")
        launched_at, t0 = time.time(), time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        child = process_identity(proc.pid)
        watch.started(child)
        # The child's start on the clock distill's own `started_at` comes from (psutil's; it can be
        # a second off time.time()), so that their difference is DVC's share alone.
        launched_at = child["started"] or launched_at
        chunks: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                chunks.append(line)
                log.write(f"{time.monotonic() - t0:8.2f} {line}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        rc = _supervise(proc, watch)
        reader.join(timeout=10)
        wall = time.monotonic() - t0
        log.write(f"# exit {rc} after {wall:.1f} s\n")
    return TrialRun(rc, "".join(chunks), wall, launched_at)


def _supervise(proc: subprocess.Popen, watch: Watch) -> int:
    """Wait for ``proc``; stop its process group when told to."""
    while proc.poll() is None:
        if watch.stopping():
            kill_group(proc.pid, proc)
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # returns the moment the trial ends: no poll interval added to it
    return proc.wait()


def timings(run: TrialRun, metrics: dict) -> dict[str, float]:
    """Where a trial's time went, from ``metrics/distill.json``; ``overhead`` is all but the training loop.

    ``dvc_setup_seconds``: launch to the distill process's start (DVC's temporary copy,
    checkout); ``distill_import_seconds``: that process's start to its training loop (imports,
    params, Optuna, loading the cache and the student); ``distill_save_seconds``: writing the
    student and the final checkpoint.
    """
    train = float(metrics.get("train_seconds") or 0.0)
    out = {"wall_seconds": round(run.wall, 2), "train_seconds": train, "overhead_seconds": round(run.wall - train, 2)}
    started_at = metrics.get("started_at")
    if isinstance(started_at, (int, float)):
        out["dvc_setup_seconds"] = round(started_at - run.launched_at, 2)
    seconds = metrics.get("seconds") or {}
    for key, name in (("startup", "distill_import_seconds"), ("save", "distill_save_seconds")):
        if isinstance(seconds.get(key), (int, float)):
            out[name] = round(float(seconds[key]), 2)
    return out
