"""Infrastructure faults during real sweeps: each case ends with an exact budget, no trial lost, and
the cause recorded.

Everything is real: the tiny pipeline in a git + DVC repository, ``kdsweep run`` as a subprocess,
a PostgreSQL server (``tests/pgserver.py``) stopped for 30 s and started again, a small tmpfs
mounted by the test (CI runs as root) and filled up, a runner killed with SIGKILL, and Ctrl-C.

    fault                               budget   trials spent / interrupted   cause recorded
    database down 30 s mid-trial        2        2 / 0                        (ridden out)
    journal's disk full 8 s mid-trial   1        1 / 0                        (ridden out)
    outputs' disk full, stays full      1        0 / 2, runner exits 2        disk_full: No space left on device
      ... space freed, run again        1        1 / 2                        the retry completes
    runner SIGKILLed mid-trial, resume  3        3 / 1                        runner
    Ctrl-C mid-trial, resume            2        2 / 1                        runner

``docs/scale-out.md`` keeps this table with the numbers of a run.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from helpers import fill_disk, small_disk
from pgserver import PostgresServer, postgres_server, server_bin_dir
from sweeprepo import BIN, ENV, SPEC, TS, experiments, kdsweep, start_long_study, study, write_spec

from kdsweep.optuna_io import open_storage
from kdsweep.sweep.budget import spent
from kdsweep.sweep.record import records

pytestmark = pytest.mark.slow


def _wait_for(log: Path, text: str, runner: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the trial log ``log`` holds ``text`` (the trial is training), while the runner runs."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        assert runner.poll() is None, f"the runner ended before {log.name} showed {text!r}"
        assert time.monotonic() < deadline, f"{log} never showed {text!r}"
        time.sleep(0.1)


def _start(repo: Path, spec: str) -> subprocess.Popen:
    """``kdsweep run spec`` in the background, its console into ``<repo>/runner.out`` (a pipe could fill up)."""
    out = (repo / "runner.out").open("w")
    return subprocess.Popen(
        [str(BIN / "kdsweep"), "run", spec], cwd=repo, env=ENV, stdout=out, stderr=subprocess.STDOUT
    )


def _finish(runner: subprocess.Popen, repo: Path, timeout: float) -> str:
    """Wait for a runner :func:`_start` started; returns its console output."""
    runner.wait(timeout=timeout)
    return (repo / "runner.out").read_text()


def _summary(fault: str, budget: int, trials: list) -> str:
    """One row of the fault table in docs/scale-out.md, from the study as the test left it."""
    causes = sorted({f"{t.cause_kind}: {t.cause}" for t in trials if t.ended == "interrupted"})
    return (
        f"FAULT | {fault} | budget {budget} | spent {spent(trials)} | trials {len(trials)} | "
        f"interrupted {sum(t.ended == 'interrupted' for t in trials)} | {'; '.join(causes) or '-'}"
    )


def _pg_ctl(pg: PostgresServer, *args: str) -> None:
    """``pg_ctl`` on the test cluster, as the user that owns it (the server refuses to run as root)."""
    owner = pwd.getpwuid(pg.socket_dir.stat().st_uid).pw_name
    as_owner = ["runuser", "-u", owner, "--"] if owner != pwd.getpwuid(os.getuid()).pw_name else []
    cmd = [*as_owner, str(server_bin_dir() / "pg_ctl"), "-D", str(pg.socket_dir / "data"), *args]
    subprocess.run(cmd, cwd=pg.socket_dir, check=True, capture_output=True, timeout=120)


def test_a_database_down_for_30_s_mid_trial_loses_no_trial_and_spends_no_budget(sweep_repo):
    with postgres_server() as pg:
        spec = write_spec(
            sweep_repo,
            "pgdown",
            storage=pg.url,
            baselines=[],
            budget={"n_trials": 2},
            retention={"keep_best": None},
            fixed={**SPEC["fixed"], "training.max_steps": 60},
            execution={"heartbeat_interval": 5, "grace_period": 90},
        )
        runner = _start(sweep_repo, spec)
        _wait_for(sweep_repo / "studies" / "pgdown" / "logs" / "0.log", "Step 3: Val Loss", runner)
        options = f"-p {pg.port} -k {pg.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        _pg_ctl(pg, "-m", "fast", "-w", "stop")
        time.sleep(30)
        _pg_ctl(pg, "-o", options, "-l", str(pg.log), "-w", "start")
        out = _finish(runner, sweep_repo, 900)
        assert runner.returncode == 0, out[-3000:]
        trials = records(optuna.load_study(study_name="pgdown", storage=open_storage(pg.url)))
    assert [(t.number, t.ended) for t in trials] == [(0, "complete"), (1, "complete")]
    assert spent(trials) == 2  # the budget, exactly; nothing interrupted, nothing failed
    log = (sweep_repo / "studies" / "pgdown" / "logs" / "0.log").read_text()
    assert "connection lost (" in log and "while reporting (trial 0); retrying" in log  # the trial rode it out
    assert pg.password not in log + out
    print(_summary("database down 30 s", 2, trials))


def test_a_journal_on_a_disk_full_for_8_s_mid_trial_loses_no_trial_and_spends_no_budget(sweep_repo, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        spec = write_spec(
            sweep_repo,
            "jfull",
            storage=str(disk / "jfull.journal"),
            baselines=[],
            budget={"n_trials": 1},
            retention={"keep_best": None},
            fixed={**SPEC["fixed"], "training.max_steps": 30},
        )
        runner = _start(sweep_repo, spec)
        _wait_for(sweep_repo / "studies" / "jfull" / "logs" / "0.log", "Step 3: Val Loss", runner)
        filler = fill_disk(disk)
        time.sleep(8)
        filler.unlink()
        out = _finish(runner, sweep_repo, 600)
        assert runner.returncode == 0 and "Traceback" not in out, out[-3000:]
        trials = records(optuna.load_study(study_name="jfull", storage=open_storage(f"journal:{disk}/jfull.journal")))
    assert [(t.number, t.ended) for t in trials] == [(0, "complete")] and spent(trials) == 1
    log = (sweep_repo / "studies" / "jfull" / "logs" / "0.log").read_text()
    assert "No space left on device (errno ENOSPC) while reporting (trial 0); retrying" in log
    print(_summary("journal disk full 8 s", 1, trials))


def test_outputs_on_a_full_disk_interrupt_without_spending_the_budget_then_resume(sweep_repo, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        (sweep_repo / "checkpoints").symlink_to(disk)  # each trial's checkpoints/<study>/<number>
        filler = fill_disk(disk)
        spec = write_spec(
            sweep_repo,
            "full",
            baselines=[],
            budget={"n_trials": 1},
            retention={"keep_best": None},
            fixed={**SPEC["fixed"], "training.save_steps": 3},
            execution={"infra_retries": 1},
        )
        proc = kdsweep(sweep_repo, "run", spec, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("error: study full stopped: trial 1 (full-1) was interrupted by the infrastructure")
        assert "after 1 retry (execution.infra_retries)" in error and "No space left on device" in error
        s = study(sweep_repo, "full")
        trials = records(s)
        assert [(t.number, t.ended, t.cause_kind) for t in trials] == [
            (0, "interrupted", "disk_full"),
            (1, "interrupted", "disk_full"),
        ]
        assert trials[1].retry_of == 0 and trials[1].params == trials[0].params
        assert spent(trials) == 0  # the budget is untouched
        status = kdsweep(sweep_repo, "status", "full").stdout
        assert "0 of 1 finished" in status and "2 interrupted (spent no budget)" in status
        assert "interrupted (disk_full, spent no budget): trial 0 (full-0): " in status
        assert "No space left on device" in status.split("trial 0 (full-0): ")[1].splitlines()[0]
        print(_summary("outputs disk full", 1, trials), "|", error)

        filler.unlink()  # space is freed: the same params run again, and the budget is spent once
        out = kdsweep(sweep_repo, "run", spec).stdout
    assert "resume: trial 1 (full-1) was interrupted (" in out
    trials = records(study(sweep_repo, "full"))
    assert [(t.number, t.ended) for t in trials] == [(0, "interrupted"), (1, "interrupted"), (2, "complete")]
    assert trials[2].params == trials[0].params and spent(trials) == 1
    assert "full-2" in experiments(sweep_repo)
    print(_summary("outputs disk freed, resumed", 1, trials))


def test_a_sigkilled_runner_is_resumed_and_its_trial_rerun_within_the_budget(sweep_repo):
    import psutil

    spec, runner = start_long_study(sweep_repo, "kill", 3, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(sweep_repo / "studies" / "kill" / "logs" / "1.log", "Step 3: Val Loss", runner)
    runner.send_signal(signal.SIGKILL)
    runner.wait()

    def orphans():
        return [p for p in psutil.process_iter(["cmdline"]) if "kill-1" in " ".join(p.info["cmdline"] or [])]

    deadline = time.monotonic() + 60
    while orphans() and time.monotonic() < deadline:  # the trial notices its runner is gone and stops
        time.sleep(0.5)
    assert not orphans()
    assert study(sweep_repo, "kill").trials[1].state == TS.RUNNING  # what SIGKILL leaves behind

    out = kdsweep(sweep_repo, "run", spec).stdout
    assert "resume: trial 1 (kill-1) was interrupted (" in out
    trials = records(study(sweep_repo, "kill"))
    assert [t.number for t in trials] == [0, 1, 2, 3]  # no number twice
    assert [(t.number, t.cause_kind) for t in trials if t.ended == "interrupted"] == [(1, "runner")]
    retry = next(t for t in trials if t.retry_of == 1)
    assert retry.params == trials[1].params and retry.ended == "complete"
    assert spent(trials) == 3  # n_trials, exactly
    names = [t.experiment for t in trials]
    assert len(set(names)) == len(names)
    exps = experiments(sweep_repo)
    assert {f"kill-{t.number}" for t in trials if t.number != 1} <= exps.keys() and "kill-1" not in exps
    assert not list((sweep_repo / ".dvc" / "tmp" / "exps" / "standalone").glob("tmp*"))  # no temp copy left
    print(_summary("runner SIGKILLed, resumed", 3, trials))


def test_ctrl_c_stops_the_running_trial_and_resume_reruns_it_within_the_budget(sweep_repo):
    import psutil

    spec, runner = start_long_study(sweep_repo, "int", 2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(sweep_repo / "studies" / "int" / "logs" / "0.log", "Step 3: Val Loss", runner)
    runner.send_signal(signal.SIGINT)
    out = runner.communicate(timeout=120)[0]
    assert runner.returncode == 130 and "interrupted: stopping the running trials" in out, out[-6000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if "int-0" in " ".join(p.info["cmdline"] or [])]
    t0, waiting = records(study(sweep_repo, "int"))
    assert (t0.ended, t0.cause_kind) == ("interrupted", "runner")  # recorded by the runner itself, at once
    assert (waiting.state, waiting.retry_of) == (TS.WAITING, 0)  # its retry, enqueued at once
    assert spent([t0, waiting]) == 0

    kdsweep(sweep_repo, "run", spec)
    trials = records(study(sweep_repo, "int"))
    assert [t.ended for t in trials] == ["interrupted", "complete", "complete"]
    assert trials[1].retry_of == 0 and trials[1].params == t0.params and spent(trials) == 2
    print(_summary("Ctrl-C, resumed", 2, trials))
    assert not list((sweep_repo / ".dvc" / "tmp" / "exps" / "standalone").glob("tmp*"))
