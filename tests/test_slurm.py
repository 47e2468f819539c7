"""``kdsweep run <spec> --slurm N``: the study's runners as a Slurm job array, on a real Slurm.

The fast tests check the script ``--dry-run`` prints and the spec's ``execution.slurm`` block.
The slow one submits a 2-task array to a real cluster (``slurmcluster``: munged, slurmctld and
slurmd on this machine) with a real PostgreSQL study (``pgserver``) and a bare git remote plus a
DVC remote shared as in ``test_scaleout.py``, then ``scancel``s one task mid-trial.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from pgserver import PostgresServer, postgres_server
from slurmcluster import SlurmCluster, slurm_cluster
from sweeprepo import BIN, ENV, TS, experiments, sh, write_spec

from kdsweep.sweep.budget import spent
from kdsweep.sweep.record import TrialRecord, retried
from kdsweep.sweep.slurm import describe_task, task_identity


def _kdsweep(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kdsweep"), *args], cwd=repo, env=env or ENV, capture_output=True, text=True, timeout=300
    )


# --------------------------------------------------------------------------- the script
GPU_SLURM = {
    "partition": "gpu",
    "time": "1-00:00:00",
    "account": "kd-lab",
    "gres": "gpu:a100",
    "extra": ["--mem=64G", "--qos=high"],
}


def test_dry_run_prints_the_script_and_submits_nothing(sweep_repo):
    spec = write_spec(
        sweep_repo, "cluster", workers=2, execution={"devices_per_trial": 2, "push": "origin", "slurm": GPU_SLURM}
    )
    r = _kdsweep(sweep_repo, "run", spec, "--slurm", "3", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert sbatch == [
        "--job-name=kdsweep-cluster",
        "--array=0-2",
        "--ntasks=1",
        f"--chdir={sweep_repo}",
        f"--output={sweep_repo}/studies/cluster/slurm/%A_%a.log",
        "--open-mode=append",
        "--export=ALL",
        "--gres=gpu:a100:4",  # devices_per_trial 2 x workers 2
        "--partition=gpu",
        "--time=1-00:00:00",
        "--account=kd-lab",
        "--mem=64G",
        "--qos=high",
    ]
    assert lines[-1] == f"exec {BIN / 'kdsweep'} run experiments/cluster.yaml --workers 2"
    assert "study cluster: minimize val_loss" in r.stderr  # the plan goes to stderr: stdout is the script alone
    assert not (sweep_repo / "studies" / "cluster").exists()


def test_a_cpu_only_spec_asks_for_no_gpu(sweep_repo):
    spec = write_spec(sweep_repo, "cpu", execution={"slurm": {"gres": None}})
    r = _kdsweep(sweep_repo, "run", spec, "--slurm", "2", "--dry-run", "--n-trials", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--gres" not in r.stdout
    assert r.stdout.splitlines()[-1].endswith("run experiments/cpu.yaml --workers 1 --n-trials 8")


@pytest.mark.parametrize(
    ("slurm", "args", "expected"),
    [
        ({"time": "2h"}, ["--slurm", "2", "--dry-run"], "execution.slurm.time: '2h': use minutes"),
        ({"extra": ["--array=0-9"]}, ["--slurm", "2"], "execution.slurm.extra.0: --array is written by kdsweep"),
        ({"partiton": "gpu"}, ["--slurm", "2"], "execution.slurm.partiton: unknown key; did you mean `partition`?"),
        ({}, ["--dry-run"], "--dry-run goes with --slurm N"),
        ({}, ["--slurm", "0"], "--slurm 0: the number of array tasks (runners) must be >= 1"),
    ],
)
def test_bad_slurm_input_is_one_line_exit_2(sweep_repo, slurm, args, expected):
    spec = write_spec(sweep_repo, "bad", execution={"slurm": slurm})
    r = _kdsweep(sweep_repo, "run", spec, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert not (sweep_repo / "studies" / "bad").exists()


def test_listed_devices_are_refused_under_slurm(sweep_repo):
    spec = write_spec(sweep_repo, "listed", execution={"devices": [0, 1]})
    r = _kdsweep(sweep_repo, "run", spec, "--slurm", "2", "--dry-run")
    assert r.returncode == 2
    assert "execution.devices: [0, 1] names one machine's GPUs" in r.stderr


def test_a_runner_names_its_slurm_task():
    env = {"SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1"}
    me = task_identity(env)
    assert me == {"slurm": {"job": "42", "array_job": "41", "task": "1"}}
    assert describe_task(me) == "slurm 41_1 (job 42)"
    assert describe_task(task_identity({"SLURM_JOB_ID": "7"})) == "slurm job 7"
    assert task_identity({}) == {} and describe_task({"host": "a", "pid": 1}) == ""


# --------------------------------------------------------------------------- a real Slurm
@pytest.fixture(scope="module")
def slurm() -> SlurmCluster:
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg() -> PostgresServer:
    with postgres_server() as server:
        yield server


def _shared_clone(template: Path, top: Path, name: str, spec_changes: dict) -> tuple[Path, str]:
    """A clone whose upstream outputs are on a DVC remote and whose commit is on a bare git remote
    (the first machine of docs/scale-out.md); returns it and the path of study ``name``'s spec."""
    repo, origin = top / "login" / "kdsweep", top / "origin.git"
    shutil.copytree(template, repo, symlinks=True)
    spec = write_spec(repo, name, **spec_changes)
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(top / "dvc-remote"))
    sh(repo, "git", "add", "dvc.lock", "metrics", ".dvc/config", spec)
    sh(repo, "git", "commit", "-q", "-m", f"upstream outputs; study {name}")
    sh(repo, "dvc", "push")
    sh(top, "git", "init", "-q", "--bare", str(origin))
    sh(repo, "git", "remote", "add", "origin", str(origin))
    sh(repo, "git", "push", "-q", "origin", "HEAD")
    return repo, spec


def _running_in_task(storage: str, name: str, job: str, task: str, timeout: float = 300):
    """The first trial of study ``name`` that array task ``job_task`` runs, once its `dvc exp run` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).trials
        except KeyError:  # no runner has created the study yet
            trials = []
        for t in trials:
            s = (t.user_attrs.get("runner") or {}).get("slurm") or {}
            if t.state == TS.RUNNING and (s.get("array_job"), s.get("task")) == (job, task) and "child" in t.user_attrs:
                return t
        time.sleep(0.5)
    raise AssertionError(f"task {job}_{task} ran no trial within {timeout} s")


def _wait_for_job(slurm: SlurmCluster, job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(
            ["squeue", "--noheader", "--jobs", job], env=slurm.env, capture_output=True, text=True, timeout=30
        )
        if not queue.stdout.strip():
            return
        time.sleep(1.0)
    raise AssertionError(f"job {job} still queued or running after {timeout} s:\n{slurm.logs()}")


def _end_task(slurm: SlurmCluster, job: str, trial, ending: str) -> None:
    """End array task ``job``_1 while it runs ``trial``: ``scancel`` it (SIGTERM, as a preemption or the time
    limit does: its runner requeues the trial itself), or SIGKILL its runner and the trial's processes at
    once, as when its node dies (the runner records nothing more; the trial's heartbeats stop)."""
    if ending == "scancel":
        subprocess.run(["scancel", f"{job}_1"], env=slurm.env, check=True, timeout=30)
        return
    os.kill(trial.user_attrs["runner"]["pid"], signal.SIGKILL)  # the task's process (the script exec'd it)
    os.killpg(trial.user_attrs["child"]["pid"], signal.SIGKILL)  # its trial's `dvc exp run`: a session of its own


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["scancel", "died"])
def test_a_slurm_array_shares_the_budget_and_reruns_a_cancelled_tasks_trial(
    sweep_template, tmp_path, pg, slurm, ending
):
    name = f"array-{ending}"
    url = f"postgresql+psycopg://{pg.user}@{pg.host}:{pg.port}/{pg.database}"  # the password: PGPASSWORD
    execution = {"push": "origin", "heartbeat_interval": 1, "grace_period": 8}
    slurm_opts = {"gres": None, "partition": slurm.partition, "time": "20:00", "extra": ["--cpus-per-task=1"]}
    repo, spec = _shared_clone(
        sweep_template,
        tmp_path,
        name,
        {"storage": url, "baselines": [], "budget": {"n_trials": 4}, "execution": {**execution, "slurm": slurm_opts}},
    )
    env = {**ENV, "SLURM_CONF": slurm.env["SLURM_CONF"], "PGPASSWORD": pg.password}
    submitted = _kdsweep(repo, "run", spec, "--slurm", "2", env=env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = re.search(r"submitted Slurm job (\d+)", submitted.stdout).group(1)

    cancelled = _running_in_task(pg.url, name, job, "1")
    status = _kdsweep(repo, "status", name, env=env).stdout
    assert re.search(rf"running: trial {cancelled.number} .*; slurm {job}_1 \(job \d+\)", status), status
    time.sleep(1.0)  # mid-trial: `dvc exp run` is copying or training
    _end_task(slurm, job, cancelled, ending)
    _wait_for_job(slurm, job)

    trials = {t.number: t for t in optuna.load_study(study_name=name, storage=pg.url).trials}
    logs = {p.name: p.read_text() for p in (repo / "studies" / name / "slurm").glob("*.log")}
    recs = [TrialRecord.of(t) for t in trials.values()]
    assert spent(recs) == 4, logs
    assert sorted(trials) == list(range(5))
    assert trials[cancelled.number].state == TS.FAIL
    # scancel: the task's runner marked it interrupted; died: another runner failed it for its stale heartbeat.
    # Either way it spent no budget and was run again.
    assert cancelled.number in retried(recs)
    retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") == cancelled.number)
    assert retry.state == TS.COMPLETE and retry.params == cancelled.params
    assert sum(t.state == TS.COMPLETE for t in trials.values()) == 4
    assert {t.user_attrs["runner"]["slurm"]["array_job"] for t in trials.values()} == {job}
    status = _kdsweep(repo, "status", name, env=env).stdout
    assert "4 of 4 finished" in status and "1 interrupted (spent no budget)" in status

    # Every counted trial is an experiment on the shared remotes: a fresh clone pulls them all, outputs included.
    clone = tmp_path / "elsewhere"
    sh(tmp_path, "git", "clone", "-q", str(tmp_path / "origin.git"), str(clone))
    sh(clone, "dvc", "exp", "pull", "origin")
    counted = {f"{name}-{n}" for n, t in trials.items() if t.state == TS.COMPLETE}
    pulled = experiments(clone)
    assert counted <= set(pulled) and all(pulled[n]["metrics"]["state"] == "complete" for n in counted)

    script = (repo / "studies" / name / "slurm" / f"{name}.sbatch").read_text()
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm.env, capture_output=True, text=True).stdout
    leaks = [n for n, text in {"script": script, "scontrol": shown, **logs}.items() if pg.password in text]
    assert not leaks
