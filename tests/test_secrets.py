"""A password written in the storage URL reaches no command line, log, file, DVC experiment,
git history, Optuna attribute or error message, in every way a trial can run.

The PostgreSQL server is a real one (``pgserver``) whose role ``kdsweep`` has a random password;
studies are real ``kdsweep run`` processes on the tiny pipeline. While they run, a thread samples
every process's command line (what ``ps -eo args`` shows any user on the machine). The several
machines mode is covered by ``tests/test_scaleout.py`` (which shares the study through
``PGPASSWORD``, as docs/scale-out.md says); the URL-with-password case of one machine is here.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
from helpers import REPO
from pgserver import PostgresServer, postgres_server
from sweeprepo import BIN, ENV, TS, sh, write_spec


@pytest.fixture(scope="module")
def pg() -> PostgresServer:
    with postgres_server() as server:
        yield server


class CommandLines:
    """Every process's command line, sampled every 50 ms while the block runs."""

    def __init__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                self.seen.add(" ".join(proc.info["cmdline"] or []))
            time.sleep(0.05)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _files_holding(secret: str, tree: Path, skip: set[Path]) -> list[Path]:
    data = secret.encode()
    return [p for p in tree.rglob("*") if p.is_file() and p not in skip and data in p.read_bytes()]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_wrong_password_in_the_url_is_named_nowhere(pg, tmp_path):
    """The server refuses a planted password: every command says so in one line without it."""
    planted = "Wr0ng-" + pg.password[::-1]
    url = f"postgresql+psycopg://{pg.user}:{planted}@{pg.host}:{pg.port}/{pg.database}"
    repo = tmp_path / "repo"
    (repo / "experiments").mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, repo / name)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "pipeline")
    spec = write_spec(repo, "refused", storage=url)
    for args in (("run", spec, "--check"), ("status", "refused"), ("best", "refused"), ("report", "refused")):
        line = _one_line_error(sh(repo, str(BIN / "kdsweep"), *args, check=False))
        assert planted not in line and f"{pg.host}:{pg.port}" in line, (args, line)


MODES = {
    "one device": {"workers": 1},
    "device sets": {"workers": 2, "execution": {"devices": [0, 1], "devices_per_trial": 1}},
    "torchrun trials": {"workers": 1, "execution": {"devices": [0, 1], "devices_per_trial": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_the_storage_password_leaks_nowhere(sweep_repo, pg, mode):
    repo, name = sweep_repo, "secret-" + mode.replace(" ", "-")
    spec = write_spec(
        repo, name, storage=pg.url, baselines=[], budget={"n_trials": 2}, retention={"keep_best": None}, **MODES[mode]
    )
    with CommandLines() as ps:
        run = subprocess.run([str(BIN / "kdsweep"), "run", spec], cwd=repo, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=pg.url)
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.COMPLETE]
    if mode == "torchrun trials":
        assert any("torch.distributed.run" in cmd and "kdsweep.cli distill" in cmd for cmd in ps.seen)
        log = (repo / "studies" / name / "logs" / "0.log").read_text()
        assert "running under torchrun" in log

    report = repo / "reports" / name
    outputs = [
        run.stdout + run.stderr,
        *ps.seen,
        sh(repo, str(BIN / "kdsweep"), "status", spec).stdout,
        sh(repo, str(BIN / "kdsweep"), "best", spec).stdout,
        sh(repo, str(BIN / "kdsweep"), "report", spec, "--out", str(report)).stdout,
        sh(repo, "git", "log", "-p", "--all").stdout,
        sh(repo, "dvc", "exp", "show", "--json").stdout,
        repr(study.user_attrs),
        *(repr(t.user_attrs) for t in study.trials),
    ]
    assert [i for i, text in enumerate(outputs) if pg.password in text] == []
    # Every file under the repository (logs, studies/, runs/, reports/, .dvc/tmp, .git), but the
    # spec the user wrote the password into.
    assert _files_holding(pg.password, repo, skip={repo / spec}) == []
