"""The sweep runner's supervision of a trial's process: what a killed runner leaves behind.

The repository fixtures come from conftest.py (a git + DVC repository whose upstream stages ran once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil
import pytest
from sweeprepo import start_long_study


def _kill_groups(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_sigkilled_runner_leaves_the_trial_log_written_so_far(sweep_repo):
    spec, runner = start_long_study(
        sweep_repo, "logged", 1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    run_dir = sweep_repo / "runs" / "logged" / "0"
    trials: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # distill opens its TensorBoard directory after the trial hook printed its first line
        while not list(run_dir.glob("events.out.tfevents*")):
            assert runner.poll() is None and time.monotonic() < deadline, "trial 0 never started distill"
            trials = [p.pid for p in psutil.Process(runner.pid).children()]  # each `dvc exp run` leads its group
            time.sleep(0.1)
        time.sleep(1.0)  # the runner's reader thread has the line well within this
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
    finally:
        _kill_groups([runner.pid, *trials])
    text = (sweep_repo / "studies" / "logged" / "logs" / "0.log").read_text()
    assert "Running stage 'distill'" in text
    assert "kdsweep: trial 0 of study 'logged' reports val_loss at every evaluation" in text


def test_trial_timings_come_from_the_metrics_file_not_the_console():
    from kdsweep.sweep.exprun import TrialRun, timings

    run = TrialRun(rc=0, output="Running stage 'distill'\n", wall=20.0, launched_at=1000.0)
    metrics = {"train_seconds": 12.5, "started_at": 1003.25, "seconds": {"startup": 2.5, "train": 12.5, "save": 0.4}}
    assert timings(run, metrics) == {
        "wall_seconds": 20.0,
        "train_seconds": 12.5,
        "overhead_seconds": 7.5,
        "dvc_setup_seconds": 3.25,
        "distill_import_seconds": 2.5,
        "distill_save_seconds": 0.4,
    }
    assert "dvc_setup_seconds" not in timings(run, {"train_seconds": 12.5})  # an older metrics file
