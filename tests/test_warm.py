"""Warm trial processes (kdsweep.warm): a real zygote, real `kdsweep distill` clients, real signals.

The zygote imports torch once and forks each trial; a forked trial must compute exactly what a
cold process computes, and behave like one for whoever started it (exit status, output,
signals, dying with its client).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from sweeprepo import BIN, ENV, committed_repo, experiments, kdsweep, lock, sh, study

from kdsweep import warm

TIMING = ("started_at", "seconds", "train_seconds")


@pytest.fixture(scope="module")
def zygote():
    z = warm.Zygote()
    yield z
    z.stop()


def _distill(cwd: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kdsweep"), "distill", *args], cwd=cwd, env=env, capture_output=True, text=True, **kw
    )


def _student_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "models/student").iterdir())}


def _metrics(root: Path) -> dict:
    return {k: v for k, v in json.loads((root / "metrics/distill.json").read_text()).items() if k not in TIMING}


@pytest.mark.slow
def test_a_warm_forked_distill_equals_a_cold_one_and_its_client_never_imports_torch(zygote, pipeline_copy, tmp_path):
    cold_dir, warm_dir = pipeline_copy, tmp_path / "warm"
    shutil.copytree(cold_dir, warm_dir)
    # Cold: $KDSWEEP_WARM names a socket nobody listens on, so distill runs in-process as always.
    cold = _distill(cold_dir, ENV | {warm.ENV: str(tmp_path / "gone.sock")})
    assert cold.returncode == 0, cold.stderr[-2000:]

    client = [str(BIN.parent / "bin" / "python"), "-X", "importtime", "-m", "kdsweep.cli", "distill"]
    hot = subprocess.run(client, cwd=warm_dir, env=ENV | zygote.env, capture_output=True, text=True)
    assert hot.returncode == 0, hot.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in hot.stderr.splitlines() if line.startswith("import time")}
    assert "kdsweep.warm" in imported and "torch" not in imported and "transformers" not in imported
    assert "Val Loss" in hot.stdout + hot.stderr  # the trial wrote to the client's own stdout/stderr

    assert _metrics(warm_dir) == _metrics(cold_dir)  # bit-identical: floats compared exactly
    assert _student_digest(warm_dir) == _student_digest(cold_dir)


def test_the_trials_exit_status_and_error_come_back_through_the_client(zygote, tmp_path):
    proc = _distill(tmp_path, ENV | zygote.env, "--params", "missing.yaml")
    assert proc.returncode == 2
    first, last = proc.stderr.strip().splitlines()
    assert first.startswith(warm.FORKED)
    assert last == "error: missing.yaml: file not found (run from the repository root, or pass --params PATH)"


def test_without_a_listening_zygote_distill_runs_in_process(tmp_path):
    proc = _distill(tmp_path, ENV | {warm.ENV: str(tmp_path / "gone.sock")}, "--params", "missing.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: missing.yaml: file not found (run from the repository root, or pass --params PATH)"
    )


def _trial_of(zygote, root: Path) -> psutil.Process:
    """The trial forked for a client in directory ``root`` (the zygote's grandchild), once it runs."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for handler in psutil.Process(zygote.proc.pid).children():
            with contextlib.suppress(psutil.Error):  # a handler (or its trial) may end while we look
                for trial in handler.children():
                    if Path(trial.cwd()) == root:
                        return trial
        time.sleep(0.05)
    raise AssertionError("no trial forked by the zygote")


def _long_run(root: Path, env: dict) -> subprocess.Popen:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["training"].update(max_steps=100000, eval_steps=100000, logging_steps=100000)
    (root / "long.yaml").write_text(yaml.safe_dump(params))
    cmd = [str(BIN / "kdsweep"), "distill", "--params", "long.yaml"]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_reaches_the_trial(zygote, pipeline_copy, sig):
    client = _long_run(pipeline_copy, ENV | zygote.env)
    trial = _trial_of(zygote, pipeline_copy)
    time.sleep(1.0)
    client.send_signal(sig)
    _, err = client.communicate(timeout=60)
    # SIGTERM kills the trial, and the client dies of it too; SIGINT is Ctrl-C: kdsweep's exit 130.
    assert client.returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130), err[-2000:]
    trial.wait(timeout=30)  # raises if the trial lives on


def test_a_killed_client_takes_its_trial_with_it(zygote, pipeline_copy):
    client = _long_run(pipeline_copy, ENV | zygote.env)
    trial = _trial_of(zygote, pipeline_copy)
    client.kill()
    client.wait()
    trial.wait(timeout=30)  # raises if the trial lives on
    assert psutil.Process(zygote.proc.pid).is_running()  # the zygote serves the next trial


@pytest.mark.slow
def test_a_studys_warm_trials_reproduce_exactly_with_best_apply_and_dvc_repro(small_study, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(small_study[0], repo, symlinks=True)
    logs = [p.read_text() for p in (repo / "studies" / "small" / "logs").glob("*.log")]
    assert logs and all(warm.FORKED in text for text in logs)  # every trial ran in a forked process
    winner = study(repo, "small").best_trial
    rev = experiments(repo)[f"small-{winner.number}"]["rev"]
    trial_out = _student_out(lock(repo, rev))
    kdsweep(repo, "best", "small", "--apply")
    sh(repo, "dvc", "repro", "--force", "--single-item", "distill")  # a cold process, in the workspace
    metrics = json.loads((repo / "metrics/distill.json").read_text())
    assert metrics["val_loss"] == winner.value  # exactly
    assert _student_out(lock(repo))["md5"] == trial_out["md5"]  # the same student weights, file for file


def _student_out(stages: dict) -> dict:
    return next(o for o in stages["distill"]["outs"] if o["path"] == "models/student")


def _ready(zygote) -> None:
    deadline = time.monotonic() + 120
    while not os.path.exists(zygote.env[warm.ENV] + warm.READY):
        assert time.monotonic() < deadline, "the zygote never finished its imports"
        time.sleep(0.1)


def test_a_trials_dvc_command_runs_forked_from_the_zygote_with_dvcs_own_output_and_status(zygote, tmp_path):
    repo = committed_repo(tmp_path / "repo", {"params.yaml": "lr: 0.1\n"})
    sh(repo, "dvc", "stage", "add", "-n", "echo", "-p", "lr", "-o", "out.txt", "echo done > out.txt")
    _ready(zygote)
    cold = sh(repo, "dvc", "status", check=False)
    client = [*zygote.command(["dvc", "status"])]
    client[1:1] = ["-X", "importtime"]  # after the interpreter: which modules the client itself imported
    hot = subprocess.run(client, cwd=repo, env=ENV | zygote.env, capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in hot.stderr.splitlines() if line.startswith("import time")}
    assert "kdsweep.warm" in imported and not any(m.split(".")[0] == "dvc" for m in imported)
    assert (hot.returncode, hot.stdout) == (cold.returncode, cold.stdout) and "echo" in hot.stdout
    missing = zygote.command(["dvc", "repro", "missing"])
    failed = subprocess.run(missing, cwd=repo, env=ENV | zygote.env, capture_output=True, text=True)
    cold_failed = sh(repo, "dvc", "repro", "missing", check=False)
    assert (failed.returncode, failed.stderr) == (cold_failed.returncode, cold_failed.stderr) != (0, "")


def test_a_dvc_client_runs_dvc_itself_while_the_zygote_is_still_importing(tmp_path):
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a zygote whose imports have not finished
    listening.bind(str(tmp_path / "socket"))
    listening.listen(1)
    code = "import sys; from kdsweep import warm; print(warm.delegate(warm.DVC_ENTRY)); print('dvc' in sys.modules)"
    env = ENV | {warm.ENV: str(tmp_path / "socket")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]  # nothing connected: the caller runs DVC itself
    listening.settimeout(0.1)
    with pytest.raises(TimeoutError):
        listening.accept()
    listening.close()


def test_the_runner_starts_and_stops_its_zygote():
    z = warm.Zygote()
    path = z.env[warm.ENV]
    assert os.path.exists(path) and z.proc.poll() is None
    z.stop()
    assert not os.path.exists(path) and z.env == {}
    assert warm.Zygote(enabled=False).env == {}


def test_trials_link_the_cache_and_never_write_into_it(small_study, tmp_path):
    """`cache.type` hardlink: checkouts (the trials' temporary copies are checkouts) share the cached
    files, read-only; after a study every cached object still hashes to its name (no stage wrote into a link)."""
    repo = tmp_path / "repo"
    shutil.copytree(small_study[0], repo, symlinks=True)
    assert "hardlink" in sh(repo, "dvc", "config", "cache.type").stdout
    objects = [p for p in (repo / ".dvc/cache/files/md5").rglob("*") if p.is_file() and p.suffix != ".dir"]
    assert len(objects) > 10
    for p in objects:
        assert hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name, p
    sh(repo, "dvc", "checkout", "--relink", "models/teacher")
    teacher = next((repo / "models/teacher").glob("*.safetensors"))
    assert teacher.stat().st_nlink >= 2 and teacher.stat().st_mode & 0o222 == 0  # linked, read-only
