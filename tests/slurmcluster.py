"""A throwaway Slurm cluster for tests: munged, slurmctld and one slurmd on this machine.

    with slurm_cluster() as slurm:          # its own munge key and socket, its own slurm.conf and ports
        subprocess.run(["sbatch", "job.sh"], env=slurm.env)   # SLURM_CONF points at that conf
    # the daemons are stopped and their directory removed, even if the block raised

The binaries come from Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs
them where ``slurmctld`` is missing). Everything lives in one temporary directory: the munge
key (owner ``munge``, mode 0400) and socket, ``slurm.conf`` (``AuthInfo`` names that socket,
so a system munged, if any, is never used), the controller's state, the node's spool, pid files
and logs. The ports are free loopback ports, so the cluster disturbs nothing else on the machine.

The node declares ``cpus`` CPUs whatever the machine has (``SlurmdParameters=config_overrides``):
a test can run several 1-CPU tasks at once on a 2-core machine. No cgroups:
``ProctrackType=proctrack/linuxproc`` finds a job's processes by their parent chain, and
``scancel`` sends them SIGTERM, then SIGKILL after ``KillWait`` seconds.

Slurm runs here as root (``SlurmUser=root``), as jobs of the user who submits them; munged runs
as the user ``munge``. If a daemon cannot start, :class:`SlurmError` carries the failing call,
its output and the daemons' logs: a test that needs the cluster fails, it is not skipped.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pgserver import free_port

MUNGE_USER = "munge"  # created by Debian's munge package
READY_TIMEOUT_S = 60.0


class SlurmError(RuntimeError):
    """The test cluster could not be set up; the message holds the failing call and the daemons' logs."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: its configuration, its one node and partition, and where its logs are."""

    conf: Path
    node: str
    partition: str
    work: Path

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster (for sbatch, squeue, scancel)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        return _logs(self.work)


def _logs(work: Path) -> str:
    parts = []
    for name in ("munged.log", "slurmctld.log", "slurmd.log"):
        path = work / "log" / name
        text = path.read_text(errors="replace")[-4000:] if path.is_file() else "(no log)"
        parts.append(f"--- {name} ---\n{text}")
    return "\n".join(parts)


def _run(cmd: list[str], work: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{_logs(work)}")
    return proc


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if not found:
        raise SlurmError(f"{name} is missing: apt-get install -y slurm-wlm munge (.ci/run does this)")
    return found


def _start_munged(work: Path) -> Path:
    """munged as user munge with a fresh key in ``work/munge``; returns its socket."""
    try:
        user = pwd.getpwnam(MUNGE_USER)
    except KeyError:
        raise SlurmError(f"no user {MUNGE_USER!r}: apt-get install -y munge (.ci/run does this)") from None
    home = work / "munge"
    home.mkdir()
    home.chmod(0o711)  # munged requires its socket directory to be searchable by everyone
    key = home / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    for path in (home, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    sock = home / "munge.socket"
    log = work / "log" / "munged.log"
    log.touch()
    os.chown(log, user.pw_uid, user.pw_gid)
    _run(
        ["runuser", "-u", MUNGE_USER, "--", _binary("munged"), f"--socket={sock}", f"--key-file={key}"]
        + [f"--pid-file={home / 'munged.pid'}", f"--log-file={log}", f"--seed-file={home / 'munged.seed'}"],
        work,
    )
    return sock


def _write_conf(work: Path, node: str, cpus: int, munge_socket: Path, kill_wait: int) -> Path:
    state, spool, log = work / "state", work / "spool", work / "log"
    state.mkdir()
    spool.mkdir()
    lines = [
        "ClusterName=kdsweep-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # the node's CPUs below, not the machine's
        f"KillWait={kill_wait}",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        f"StateSaveLocation={state}",
        f"SlurmdSpoolDir={spool}",
        f"SlurmctldPidFile={work / 'slurmctld.pid'}",
        f"SlurmdPidFile={work / 'slurmd.pid'}",
        f"SlurmctldLogFile={log / 'slurmctld.log'}",
        f"SlurmdLogFile={log / 'slurmd.log'}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=20000 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
    ]
    conf = work / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(
            [_binary("sinfo"), "--noheader", "--format=%t", "--nodes", cluster.node],
            capture_output=True,
            text=True,
            env=cluster.env,
            timeout=30,
        )
        last = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0 and last == "idle":
            return
        time.sleep(0.5)
    raise SlurmError(
        f"node {cluster.node} not idle within {READY_TIMEOUT_S:.0f} s (sinfo: {last!r})\n{_logs(cluster.work)}"
    )


def _cancel_all(work: Path, node: str) -> None:
    """Cancel every job of the cluster and wait (up to KillWait and a bit) until none runs."""
    env = {**os.environ, "SLURM_CONF": str(work / "slurm.conf")}
    subprocess.run([_binary("scancel"), "--partition", "debug"], capture_output=True, env=env, timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = subprocess.run(
            [_binary("squeue"), "--noheader", "--format=%i"], capture_output=True, text=True, env=env, timeout=30
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            return
        time.sleep(0.5)


def _stop(pid_file: Path) -> None:
    """SIGTERM the daemon named in ``pid_file``, then SIGKILL if it is still there after 10 s."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@contextmanager
def slurm_cluster(cpus: int = 4, kill_wait: int = 30) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd (a few seconds), yield the cluster once its node is idle,
    then stop the daemons and delete their files."""
    if os.geteuid() != 0:
        raise SlurmError("the test Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    work = Path(tempfile.mkdtemp(prefix="kdsweep-slurm-"))
    work.chmod(0o755)  # munged, running as munge, reaches its directory below
    (work / "log").mkdir()
    node = socket.gethostname().split(".")[0]
    started: list[Path] = []  # pid files of what runs, stopped in reverse order
    try:
        started.append(work / "munge" / "munged.pid")
        conf = _write_conf(work, node, cpus, _start_munged(work), kill_wait)
        cluster = SlurmCluster(conf, node, "debug", work)
        for daemon, pid_file in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            started.append(work / pid_file)
            _run([_binary(daemon), "-f", str(conf)], work, env=cluster.env)
        _wait_idle(cluster)
        yield cluster
    finally:
        if len(started) == 3:  # the controller runs: end the jobs first, or their processes outlive slurmd
            _cancel_all(work, node)
        for pid_file in reversed(started):
            _stop(pid_file)
        shutil.rmtree(work, ignore_errors=True)
