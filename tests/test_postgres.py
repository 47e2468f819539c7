"""Optuna studies on a real PostgreSQL server (``pgserver``): kdsweep's storage glue and ``kdsweep status``.

One server is started for the module; each test uses its own study. The role's password is
random, so any output that contains it is a leak.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from pgserver import PostgresServer, postgres_server

from kdsweep.optuna_io import display, open_storage

BIN = Path(sys.executable).parent
TS = optuna.trial.TrialState
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}

WORKER = """
import os, optuna
from kdsweep.optuna_io import open_storage
study = optuna.load_study(study_name=os.environ["STUDY"], storage=open_storage(os.environ["STORAGE"]))
study.optimize(lambda t: (t.suggest_float("x", -1.0, 1.0) - 0.25) ** 2, n_trials=int(os.environ["N"]))
print("done", len(study.trials))
"""


@pytest.fixture(scope="module")
def pg() -> PostgresServer:
    with postgres_server() as server:
        yield server


def test_the_role_needs_its_password(pg):
    import psycopg

    with psycopg.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=pg.database) as c:
        assert c.execute("SELECT current_user").fetchone() == (pg.user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=pg.host, port=pg.port, user=pg.user, password="not-it", dbname=pg.database)


def test_two_processes_add_trials_to_one_study(pg):
    storage = open_storage(pg.url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    optuna.create_study(study_name="concurrent", storage=storage)  # created before the workers start
    env = {**os.environ, "STUDY": "concurrent", "STORAGE": pg.url, "N": "6", "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=120)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = optuna.load_study(study_name="concurrent", storage=open_storage(pg.url)).trials
    assert sorted(t.number for t in trials) == list(range(12))
    assert {t.state for t in trials} == {TS.COMPLETE}
    assert not any(pg.password in out for out in outputs)


def test_display_names_the_server_without_the_password(pg, tmp_path):
    shown = display(pg.url, tmp_path)
    assert pg.password not in shown
    assert shown == f"{pg.host}:{pg.port}/{pg.database}"


def _repo_with_spec(root: Path, study: str, storage: str, n_trials: int) -> str:
    """A git + DVC repository whose study spec's storage is ``storage``: what ``status``, ``best``, ``report`` read."""
    (root / "experiments").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    spec = {"study": study, "storage": storage, "budget": {"n_trials": n_trials}, "workers": 2}
    (root / "experiments" / f"{study}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "s"]):
        subprocess.run(cmd, cwd=root, env=ENV, check=True, capture_output=True)
    return f"experiments/{study}.yaml"


def _kdsweep(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kdsweep"), *args], cwd=repo, env=env or ENV, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def status_study(pg) -> optuna.Study:
    """Two finished trials and one running at step 3, written by Optuna directly."""
    study = optuna.create_study(study_name="status", storage=open_storage(pg.url))
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
    study.ask().report(0.5, step=3)
    return study


def test_status_reads_a_postgres_study_without_showing_the_password(pg, status_study, tmp_path):
    proc = _kdsweep(tmp_path, "status", _repo_with_spec(tmp_path, "status", pg.url, n_trials=4))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"study status ({pg.host}:{pg.port}/{pg.database}): 2 of 4 finished" in proc.stdout
    assert "running: trial 2" in proc.stdout and "step 3" in proc.stdout
    assert pg.password not in proc.stdout + proc.stderr


def test_best_and_report_read_a_postgres_study_without_writing_the_password(pg, status_study, tmp_path):
    spec = _repo_with_spec(tmp_path, "status", pg.url, n_trials=4)
    best, report = _kdsweep(tmp_path, "best", spec), _kdsweep(tmp_path, "report", spec, "--out", "out")
    for proc in (best, report):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert pg.password not in proc.stdout + proc.stderr
    first_row = best.stdout.splitlines()[3].split()  # title, header, rule, then rank 1
    assert first_row[:2] == ["1", str(status_study.best_trial.number)]
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written
    assert not [p for p in written if pg.password.encode() in p.read_bytes()]


def test_a_url_without_password_takes_it_from_pgpassword(pg, status_study, tmp_path):
    """libpq's own PGPASSWORD (or ~/.pgpass) keeps the password out of the spec, which git records."""
    url = f"postgresql+psycopg://{pg.user}@{pg.host}:{pg.port}/{pg.database}"
    spec = _repo_with_spec(tmp_path, "status", url, n_trials=4)
    assert _kdsweep(tmp_path, "status", spec, env={**ENV, "PGPASSWORD": "not-it"}).returncode != 0
    proc = _kdsweep(tmp_path, "status", spec, env={**ENV, "PGPASSWORD": pg.password})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 4 finished" in proc.stdout
    assert pg.password not in proc.stdout + proc.stderr


# ----------------------------------------------------- study-wide budget, heartbeats, lost connections
CLAIMER = """
import os, sys, time, optuna
from kdsweep.optuna_io import open_storage
from kdsweep.sweep.budget import StudyBudget
from kdsweep.sweep.spec import Budget
study = optuna.load_study(study_name=os.environ["STUDY"], storage=open_storage(os.environ["STORAGE"]))
budget = StudyBudget(study, os.environ["STORAGE"], Budget(n_trials=5), time.time(), reap=lambda: None,
                     own=lambda trial: None, poll_s=0.1)
while (trial := budget.claim(lambda: set(), lambda: False)) is not None:
    time.sleep(0.05)  # the other process asks in between: without the lock both would take the last trial
    study.tell(trial, trial.suggest_float("x", 0, 1))
"""


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_processes_that_claim_trials_together_run_exactly_the_budget(pg, tmp_path, kind):
    url = pg.url if kind == "postgresql" else f"journal:{tmp_path / 'claims.journal'}"
    study_name = f"claims-{kind}"
    optuna.create_study(study_name=study_name, storage=open_storage(url))
    env = {**os.environ, "STUDY": study_name, "STORAGE": url, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", CLAIMER], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    trials = optuna.load_study(study_name=study_name, storage=open_storage(url)).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4]
    assert {t.state for t in trials} == {TS.COMPLETE}


def test_a_trial_without_heartbeats_is_failed_and_enqueued_once_by_whichever_runner_looks_first(pg):
    import functools

    from kdsweep.sweep.outcome import retry_stale
    from kdsweep.sweep.record import records, retried, spends_budget

    retry_stale = functools.partial(retry_stale, 3)  # execution.infra_retries
    storage = open_storage(pg.url, connections=2, heartbeat=(1, 2), on_stale=retry_stale)
    study = optuna.create_study(study_name="stale", storage=storage)
    dead = study.ask()
    dead.suggest_float("x", 0, 1)
    storage.record_heartbeat(dead._trial_id)  # its runner's last heartbeat; then its machine dies
    time.sleep(3)
    # Two runners look at once, each with its own storage (their own connections).
    lookers = [
        optuna.load_study(study_name="stale", storage=open_storage(pg.url, heartbeat=(1, 2), on_stale=retry_stale))
        for _ in range(2)
    ]
    threads = [threading.Thread(target=optuna.storages.fail_stale_trials, args=(s,)) for s in lookers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = records(study)
    assert [t.state for t in trials] == [TS.FAIL, TS.WAITING]
    assert (trials[0].ended, trials[0].cause_kind) == ("interrupted", "heartbeat")
    assert trials[0].cause.startswith("no heartbeat from its runner on ")
    assert (trials[1].retry_of, trials[1].attempt) == (0, 2)
    assert study.trials[1].system_attrs["fixed_params"] == dead.params
    assert retried(trials) == {0} and not spends_budget(trials[0], retried(trials))


def test_a_lost_connection_is_retried_until_the_database_takes_connections_again(pg, capfd):
    import psycopg
    from psycopg import sql

    from kdsweep.optuna_io import with_retries

    storage = open_storage(pg.url, connections=1)
    optuna.create_study(study_name="reconnect", storage=storage)

    def superuser(statement) -> None:
        with psycopg.connect(
            host=str(pg.socket_dir), port=pg.port, user="postgres", dbname="postgres", autocommit=True
        ) as c:
            c.execute(statement)

    role = sql.Identifier(pg.user)
    superuser(sql.SQL("ALTER ROLE {} NOLOGIN").format(role))  # the server is unreachable for this role ...
    superuser(
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}").format(
            sql.Literal(pg.user)
        )
    )
    threading.Timer(2.5, superuser, args=(sql.SQL("ALTER ROLE {} LOGIN").format(role),)).start()  # ... for 2.5 s
    t0 = time.monotonic()
    studies = with_retries(storage.get_all_studies, pg.url, "listing studies")
    assert time.monotonic() - t0 >= 2.5
    assert "reconnect" in [s.study_name for s in studies]
    err = capfd.readouterr().err
    assert "connection lost (" in err and "while listing studies; retrying in 1 s" in err
    assert pg.password not in err
