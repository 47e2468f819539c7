"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory.

    with postgres_server() as pg:        # initdb, then pg_ctl start on a free loopback port
        optuna.create_study(storage=pg.url)
    # the cluster is stopped and its directory removed, even if the block raised

The server binaries come from Debian's ``/usr/lib/postgresql/<version>/bin`` (``.ci/run``
installs the ``postgresql`` package where they are missing). PostgreSQL refuses to run as
root, so under root the binaries run as the system user ``kdsweep-pg`` (created with
``useradd`` when missing), which owns the temporary directory.

The superuser ``postgres`` may connect only over the cluster's Unix socket, without a
password; TCP connections need a password (scram-sha-256). Tests use the role ``kdsweep``
with a random password over TCP, so they can check that the password never leaks. If the
server cannot start, :class:`PostgresError` carries its log: a test that needs the server
fails, it is not skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_USER = "kdsweep-pg"  # who runs the server when the tests run as root
ROLE = "kdsweep"
DATABASE = "kdsweep"


class PostgresError(RuntimeError):
    """The test server could not be set up; the message holds the command's output and the server log."""


@dataclass(frozen=True)
class PostgresServer:
    """A running test cluster and the password-protected role the tests connect as."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)  # a failing test's report must not print it
    database: str
    socket_dir: Path
    log: Path

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Optuna's ``RDBStorage`` takes (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def server_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresError(
        "no PostgreSQL server: /usr/lib/postgresql/*/bin/initdb is missing (apt-get install -y postgresql)"
    )


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_user() -> str | None:
    """The user the server runs as: None (this process's own) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
            capture_output=True,
        )
    return SERVICE_USER


def _run(user: str | None, cmd: list[str], cwd: Path, log: Path | None = None) -> None:
    full = ["runuser", "-u", user, "--", *cmd] if user else cmd
    proc = subprocess.run(full, cwd=cwd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        server_log = log.read_text(errors="replace") if log and log.is_file() else "(no server log)"
        output = f"{proc.stdout}\n{proc.stderr}"
        raise PostgresError(f"{' '.join(full)} exited {proc.returncode}:\n{output}\n--- server log ---\n{server_log}")


def _create_role(socket_dir: Path, port: int, password: str) -> None:
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(host=str(socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(password)))
            c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(ROLE)))
    except psycopg.Error as err:
        log = socket_dir / "server.log"
        raise PostgresError(
            f"creating role {ROLE!r}: {err}\n--- server log ---\n{log.read_text(errors='replace')}"
        ) from err


@contextmanager
def postgres_server(password: str | None = None) -> Iterator[PostgresServer]:
    """Start a fresh cluster (about 2-3 s), yield it, and stop it and delete its files afterwards."""
    bin_dir = server_bin_dir()
    user = _service_user()
    work = Path(tempfile.mkdtemp(prefix="kdsweep-pg-"))
    data, log = work / "data", work / "server.log"
    started = False
    try:
        if user:
            shutil.chown(work, user, user)
        pwfile = work / "superuser-password"  # initdb requires one with scram; nobody uses it
        pwfile.write_text(secrets.token_hex(16))
        if user:
            shutil.chown(pwfile, user, user)
        _run(
            user,
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile)]
            + ["--auth-local=trust", "--auth-host=scram-sha-256", "--no-locale", "--encoding=UTF8"],
            cwd=work,
        )
        port = free_port()
        # fsync off: the cluster is thrown away, so durability costs test time for nothing.
        options = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
        started = True  # from here on, stop it even if start itself fails halfway
        _run(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"], work, log)
        password = password or secrets.token_urlsafe(18)
        _create_role(work, port, password)
        yield PostgresServer("127.0.0.1", port, ROLE, password, DATABASE, work, log)
    finally:
        if started:
            subprocess.run(
                (["runuser", "-u", user, "--"] if user else [])
                + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                cwd=work,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(work, ignore_errors=True)
