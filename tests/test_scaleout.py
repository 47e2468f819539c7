"""One study, several runners: the budget is the study's, and machines share it through PostgreSQL.

Runners here are real ``kdsweep run`` processes on real git + DVC repositories (the tiny
pipeline); the PostgreSQL server is a real one (``pgserver``), its role's password random, so
any output holding it is a leak.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from pgserver import PostgresServer, postgres_server
from sweeprepo import BIN, ENV, TS, experiments, sh, study, write_spec

pytestmark = pytest.mark.slow


_runners: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_leftover_runners():
    """A failed test leaves no runner behind (each is a process group of its own)."""
    yield
    while _runners:
        proc = _runners.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(repo: Path, spec: str, env: dict | None = None) -> subprocess.Popen:
    """``kdsweep run <spec>`` in ``repo``, in its own process group (a test can kill the whole runner)."""
    proc = subprocess.Popen(
        [str(BIN / "kdsweep"), "run", spec],
        cwd=repo,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _runners.append(proc)
    return proc


def _kdsweep(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "kdsweep"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n\n".join(o[-4000:] for o in outputs)
    return outputs


def test_two_runners_started_together_share_the_journal_studys_budget(sweep_repo):
    spec = write_spec(sweep_repo, "together", budget={"n_trials": 3}, baselines=[])
    _finish([_start(sweep_repo, spec), _start(sweep_repo, spec)])
    trials = study(sweep_repo, "together").trials
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert {t.state for t in trials} == {TS.COMPLETE}


# --------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def pg() -> PostgresServer:
    with postgres_server() as server:
        yield server


def _no_password(pg: PostgresServer, *texts: str, trees: tuple[Path, ...] = ()) -> None:
    """The password is in none of ``texts`` and in no file under ``trees`` (logs, TensorBoard, git, DVC)."""
    assert not [i for i, text in enumerate(texts) if pg.password in text]
    secret = pg.password.encode()
    leaked = [p for tree in trees for p in tree.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked


def test_two_runners_started_together_share_the_postgres_studys_budget(sweep_repo, pg):
    spec = write_spec(sweep_repo, "together-pg", budget={"n_trials": 3}, baselines=[], storage=pg.url)
    outputs = _finish([_start(sweep_repo, spec), _start(sweep_repo, spec)])
    trials = optuna.load_study(study_name="together-pg", storage=pg.url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert {t.state for t in trials} == {TS.COMPLETE}
    status = _kdsweep(sweep_repo, "status", spec, env=ENV).stdout
    assert "3 of 3 finished" in status
    logs = [sweep_repo / "studies" / "together-pg", sweep_repo / "runs" / "together-pg"]
    _no_password(pg, *outputs, status, sh(sweep_repo, "dvc", "exp", "show", "--json").stdout, trees=tuple(logs))


# --------------------------------------------------------------------------- two machines
SHARED = {"baselines": [], "budget": {"n_trials": 4}, "execution": {"push": "origin"}}
STALE = {"heartbeat_interval": 1, "grace_period": 8}  # a dead machine's trial is retried after 8 s, not 2 min


@dataclass
class Machines:
    """Two clones that share only a bare git remote, a DVC remote (a local path) and a PostgreSQL study."""

    a: Path
    b: Path
    env: dict  # each machine's environment: PGPASSWORD, so the committed spec holds no password
    setup_output: str


@pytest.fixture(scope="module")
def machines(sweep_template, pg, tmp_path_factory) -> Machines:
    """Machine A has run the upstream stages (the template did), commits dvc.lock, their metrics and the
    study specs, `dvc push`es and `git push`es; machine B `git clone`s and `dvc pull`s the upstream
    outputs: the commands of docs/scale-out.md."""
    top = tmp_path_factory.mktemp("machines")
    a, b, origin = top / "a" / "kdsweep", top / "b" / "kdsweep", top / "origin.git"
    shutil.copytree(sweep_template, a, symlinks=True)
    url = f"postgresql+psycopg://{pg.user}@{pg.host}:{pg.port}/{pg.database}"
    specs = [
        write_spec(a, "pair", storage=url, **SHARED),
        write_spec(a, "pair-kill", storage=url, **{**SHARED, "execution": {"push": "origin", **STALE}}),
    ]
    out = [sh(a, "dvc", "remote", "add", "-d", "shared", str(top / "dvc-remote")).stdout]
    sh(a, "git", "add", "dvc.lock", "metrics", ".dvc/config", *specs)  # metrics: not in the DVC cache
    sh(a, "git", "commit", "-q", "-m", "upstream outputs; studies pair and pair-kill")
    out.append(sh(a, "dvc", "push").stdout)
    sh(top, "git", "init", "-q", "--bare", str(origin))
    sh(a, "git", "remote", "add", "origin", str(origin))
    branch = sh(a, "git", "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    sh(a, "git", "push", "-q", "origin", branch)
    sh(top, "git", "clone", "-q", "--branch", branch, str(origin), str(b))
    out.append(sh(b, "dvc", "pull", "--with-deps", "student", "teacher_logits").stdout)
    return Machines(a, b, {**ENV, "PGPASSWORD": pg.password}, "\n".join(out))


def _exp_names(repo: Path, study_name: str) -> set[str]:
    return {n for n in experiments(repo) if n.startswith(f"{study_name}-") and n[len(study_name) + 1 :].isdigit()}


def test_two_machines_run_one_study_and_each_lists_every_trial(machines, pg):
    m = machines
    a, b = _start(m.a, "experiments/pair.yaml", m.env), _start(m.b, "experiments/pair.yaml", m.env)
    outputs = _finish([a, b])
    trials = optuna.load_study(study_name="pair", storage=pg.url).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state for t in trials} == {TS.COMPLETE}
    assert "upstream: up to date" in outputs[1] and "upstream recomputations: 0" in outputs[1]
    # `best --apply` on the clone that did not run the best trial fetches its experiment first.
    best = min(trials, key=lambda t: t.value)
    ran_best = m.a if best.user_attrs["runner"]["pid"] == a.pid else m.b
    other = m.b if ran_best == m.a else m.a
    assert f"pair-{best.number}" not in _exp_names(other, "pair")
    applied = _kdsweep(other, "best", "pair", "--apply", env=m.env)
    assert f"applied pair-{best.number}" in applied.stdout
    shown = []
    for repo in (m.a, m.b):
        sh(repo, "dvc", "exp", "pull", "origin")
        assert _exp_names(repo, "pair") == {f"pair-{n}" for n in range(4)}
        shown.append(sh(repo, "dvc", "exp", "show", "--json").stdout)
    _no_password(pg, m.setup_output, *outputs, applied.stdout + applied.stderr, *shown, trees=(m.a, m.b))


def _running_on(storage: str, study_name: str, pid: int, timeout: float = 300):
    """The first trial of ``study_name`` that runner ``pid`` runs, once its `dvc exp run` has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=study_name, storage=storage).trials
        except KeyError:  # the runners have not created the study yet
            trials = []
        for t in trials:
            if t.state == TS.RUNNING and t.user_attrs.get("runner", {}).get("pid") == pid and "child" in t.user_attrs:
                return t
        time.sleep(0.5)
    raise AssertionError(f"runner {pid} ran no trial of {study_name} within {timeout} s")


def test_a_machine_that_dies_mid_trial_is_retried_and_can_rejoin(machines, pg):
    m = machines
    a, b = _start(m.a, "experiments/pair-kill.yaml", m.env), _start(m.b, "experiments/pair-kill.yaml", m.env)
    killed = _running_on(pg.url, "pair-kill", a.pid)
    time.sleep(1.0)  # mid-trial: `dvc exp run` is copying or training
    for group in (a.pid, killed.user_attrs["child"]["pid"]):  # the machine dies: its runner and its trial
        os.killpg(group, signal.SIGKILL)
    a.communicate(timeout=30)
    deadline = time.monotonic() + 120
    while not [
        t
        for t in optuna.load_study(study_name="pair-kill", storage=pg.url).trials
        if t.user_attrs.get("retry_of") == killed.number
    ]:
        assert time.monotonic() < deadline, "the dead machine's trial was not retried"
        time.sleep(0.5)
    again = _start(m.a, "experiments/pair-kill.yaml", m.env)  # the machine comes back and joins the study
    outputs = _finish([b, again])
    trials = {t.number: t for t in optuna.load_study(study_name="pair-kill", storage=pg.url).trials}
    assert sorted(trials) == list(range(5))
    assert trials[killed.number].state == TS.FAIL
    retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") == killed.number)
    assert retry.state == TS.COMPLETE and retry.params == killed.params
    assert sum(t.state == TS.COMPLETE for t in trials.values()) == 4
    assert "study pair-kill" in outputs[1]
    status = _kdsweep(m.b, "status", "pair-kill", env=m.env).stdout
    assert "4 of 4 finished" in status and "1 interrupted (spent no budget)" in status
    assert f"spent no budget): trial {killed.number} (pair-kill-{killed.number}): " in status, status  # its cause
    _no_password(pg, *outputs, status)
