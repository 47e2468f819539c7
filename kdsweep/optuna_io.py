"""Optuna objects that both the sweep runner and a trial's ``kdsweep distill`` build from plain data.

The storage is named by one string that the runner and a trial's process (which runs in a
temporary copy of the repository) resolve the same way: ``journal:<absolute path>`` for
Optuna's JournalFileBackend, or an RDB URL. The pruner is built from its spec as a dict.
This module lives outside :mod:`kdsweep.sweep` so that the distill stage's code, and so its
``dvc.yaml`` deps, do not include the sweep package.

A journal is one JSON record per line, appended under a lock. A kill during a write, or a
full disk, can leave the last line torn; Optuna then skips it, and the next append lands on
it, after which no reader can parse the file. So opening a journal first checks its last
line and, if it is torn, saves the file as ``<journal>.torn-<time>`` and cuts the torn bytes
(or restores the line end of a record that lost only that), under the journal's own lock.

Runners on several machines share one study, so some steps must not interleave (counting the
budget, then asking for a trial; creating the study and Optuna's tables). :func:`storage_lock`
is one lock per study for every process that reaches the storage: an ``flock`` on a file beside
a journal or SQLite file (one machine), a session-level ``pg_advisory_lock`` on PostgreSQL (or
``GET_LOCK`` on MySQL) held on a connection of its own, which the server releases if the holder
dies. A database connection that drops (a server restart, a network blip) and a journal write
on a full disk are retried with backoff by :func:`with_retries`, used by the runner and by each
trial's reports alike; the runner's pool holds a connection per worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kdsweep.errors import UserError
from kdsweep.fsio import atomic_path

# Driver modules whose pip package has another name.
_PIP_NAMES = {"MySQLdb": "mysqlclient", "psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'"}
RETRY_DELAYS_S = (1, 2, 4, 8, 16, 30)  # a lost database connection is retried after each of these
T = TypeVar("T")


def open_storage(
    url: str,
    *,
    connections: int | None = None,
    heartbeat: tuple[int, int] | None = None,
    on_stale: Callable | None = None,
):
    """An Optuna storage object for a storage string.

    A torn journal is repaired first (see the module docstring); a journal that cannot be read,
    an RDB URL whose driver is not installed or whose database cannot be reached is a
    :class:`UserError` naming the storage (never its password) and the fix.

    For a database server: ``connections`` sizes the pool (the threads that use it at once), and
    ``heartbeat=(interval, grace_period)`` turns on Optuna's trial heartbeats, with
    ``on_stale(study, trial)`` called once for each trial :func:`optuna.storages.fail_stale_trials`
    fails. Journal storage has no heartbeats; the sweep keeps its own there.
    """
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    if url.startswith("journal:"):
        return _open_journal(Path(url[len("journal:") :]))
    problem = _driver_problem(url)
    if problem:
        raise UserError(problem)
    from sqlalchemy import make_url
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {}
    if make_url(url).get_backend_name() != "sqlite":
        # pre_ping replaces a pooled connection the server dropped, instead of failing on it.
        n = connections or 1
        kwargs["engine_kwargs"] = {"pool_size": n + 2, "max_overflow": n + 2, "pool_pre_ping": True}
    if heartbeat:
        # Optuna marks heartbeats experimental and expects study.optimize; the runner drives them itself.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        kwargs.update(heartbeat_interval=heartbeat[0], grace_period=heartbeat[1])
        kwargs["heartbeat_stale_trial_callback"] = on_stale
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except SQLAlchemyError as e:
        raise UserError(f"storage {safe_url(url)}: cannot open the database: {_first_line(e)}") from None


class StorageUnavailable(UserError):
    """The study's storage took no write (or gave no read) for as long as :func:`with_retries` waits:
    an infrastructure fault (database down, disk full), never the trial's configuration."""


def _connection_lost(e: BaseException) -> bool:
    """Whether ``e`` is a database connection failing (worth retrying), not a wrong query or a finished trial."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

    while e is not None:
        if isinstance(e, (OperationalError, DisconnectionError)) or (
            isinstance(e, DBAPIError) and e.connection_invalidated
        ):
            return True
        if not isinstance(e, StorageInternalError):
            return False
        e = e.__cause__
    return False


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that found no space (ENOSPC, or a quota), which freeing space fixes."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def with_retries(call: Callable[[], T], url: str, what: str, patience: float | None = None) -> T:
    """``call()``, retried with backoff (:data:`RETRY_DELAYS_S`) while the database connection is lost
    or the journal's disk is full, for up to ``patience`` seconds (default: the delays' sum, 61 s).

    Only calls that are safe to repeat belong here: reads, setting attributes, heartbeats, reports.
    A journal append that the full disk cut short is cut off before the retry (else the next record
    would land on its torn line). When the storage still fails, :class:`StorageUnavailable` names it
    (never its password), the cause, and the fix; each retry prints one line.
    """
    deadline = time.monotonic() + (sum(RETRY_DELAYS_S) if patience is None else patience)
    for attempt in itertools.count():
        try:
            return call()
        except Exception as e:
            if not (_connection_lost(e) or _disk_full(e)):
                raise
            if url.startswith("journal:") and _disk_full(e):
                _cut_torn_tail(Path(url[len("journal:") :]))
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(_unavailable(url, what, e)) from None
            print(
                f"warning: storage {safe_url(url)}: {_cause(e)} while {what}; retrying in {min(delay, left):.0f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(min(delay, left))
    raise AssertionError("unreachable")


def _cause(e: BaseException) -> str:
    if _disk_full(e):
        return f"{os.strerror(e.errno)} (errno {errno.errorcode[e.errno]})"
    return f"connection lost ({_first_line(e)})"


def _unavailable(url: str, what: str, e: BaseException) -> str:
    fix = "free space on its disk" if _disk_full(e) else "check that the database server runs and is reachable"
    return f"storage {safe_url(url)}: {_cause(e)} while {what}, after retrying; {fix}, then run again"


@contextlib.contextmanager
def storage_lock(url: str, name: str) -> Iterator[None]:
    """Hold the study ``name``'s lock, shared by every process on every machine that uses ``url``
    (see the module docstring); blocks while another holds it."""
    if url.startswith("journal:"):
        with _file_lock(Path(url[len("journal:") :] + ".claim-lock")):
            yield
        return
    from sqlalchemy import make_url

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        with (
            _file_lock(Path(database + ".claim-lock"))
            if database and database != ":memory:"
            else contextlib.nullcontext()
        ):
            yield
        return
    with _server_lock(url, backend, name):
        yield


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Each call opens the file anew: flock then also excludes other threads of this process.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _server_lock(url: str, backend: str, name: str) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    key = int.from_bytes(hashlib.sha256(f"kdsweep study {name}".encode()).digest()[:8], "big", signed=True)
    take, give = {
        "postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
        "mysql": ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)"),
    }[backend]
    engine = create_engine(url, poolclass=NullPool)
    try:
        conn = with_retries(engine.connect, url, f"taking study {name}'s lock")
        try:
            conn.execute(text(take), {"key": key if backend == "postgresql" else str(key)})
            yield
        finally:
            with contextlib.suppress(Exception):  # a dropped connection released the lock already
                conn.execute(text(give), {"key": key if backend == "postgresql" else str(key)})
            conn.close()
    finally:
        engine.dispose()


def check_storage(url: str) -> list[str]:
    """Problems that would stop a study from opening its storage (``kdsweep run --check``).

    A journal: its directory must be writable and its records readable (a torn last record is
    not a problem: opening repairs it). An RDB URL: its driver must import, and a server
    database must accept a connection; a SQLite file's directory must exist.
    """
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
            return [f"storage {path}: {existing} is not writable"]
        line = _broken_line(path) if path.is_file() else 0
        return [_damaged(path, line)] if line and line != _line_count(path) else []
    problem = _driver_problem(url)
    if problem:
        return [problem]
    from sqlalchemy import create_engine, make_url
    from sqlalchemy.exc import SQLAlchemyError

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        folder = Path(parsed.database or ".").parent
        return [] if folder.is_dir() else [f"storage {url}: the directory {folder} does not exist"]
    try:
        with create_engine(parsed, connect_args={"connect_timeout": 10}).connect():
            return []
    except SQLAlchemyError as e:
        return [f"storage {safe_url(url)}: cannot connect: {_first_line(e)}"]


def safe_url(url: str) -> str:
    """An RDB URL with its password replaced by ``***``."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]


def _first_line(e: Exception) -> str:
    return (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]


def _driver_problem(url: str) -> str | None:
    """Why SQLAlchemy cannot load the driver this URL names (``mysql+pymysql://``), or None."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(url).get_dialect()
        dialect.import_dbapi()
    except ArgumentError as e:
        return f"storage {safe_url(url)}: not a database URL ({e})"
    except NoSuchModuleError as e:
        return f"storage {safe_url(url)}: SQLAlchemy has no such database dialect ({e})"
    except ImportError as e:
        module = (e.name or str(e)).split(".")[0]
        hint = ", or write postgresql+psycopg:// to use psycopg" if module == "psycopg2" else ""
        return (
            f"storage {safe_url(url)}: its database driver needs the Python module `{module}`, which is not "
            f"installed: pip install {_PIP_NAMES.get(module, module)}{hint}"
        )
    return None


# --------------------------------------------------------------------------- journals
def _open_journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path.parent.mkdir(parents=True, exist_ok=True)
    _check_is_journal(path)
    if path.is_file() and _torn(_last_line(path)[1]):
        # The backend's own lock: a writer that is appending right now finishes first.
        lock = JournalFileSymlinkLock(str(path))
        lock.acquire()
        try:
            _repair_torn_tail(path)
        finally:
            lock.release()
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except ValueError:  # json.JSONDecodeError included: a broken record with others after it
        line = _broken_line(path)
        if not line:
            raise
        raise UserError(_damaged(path, line)) from None
    except (AssertionError, KeyError, TypeError, IndexError) as e:  # whole JSON records Optuna cannot replay
        raise UserError(
            f"{path}: not a journal Optuna can read ({type(e).__name__} replaying its records): it was not "
            f"written by Optuna; restore it from a copy, or move it away to start the study anew"
        ) from None


def _check_is_journal(path: Path) -> None:
    """Refuse a file whose first line is a whole line but no journal record (binary or other text):
    the torn-tail repair must not touch a file that is not a journal at all."""
    if not path.is_file():
        return
    with path.open("rb") as f:
        first = f.readline()
    if first.endswith(b"\n") and not _is_record(first):
        raise UserError(
            f"{path}: not an Optuna journal (its first line is not a JSON record); restore it from a copy, "
            f"or move it away to start the study anew"
        )


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _torn(line: bytes) -> bool:
    return bool(line) and not (line.endswith(b"\n") and _is_record(line))


def _last_line(path: Path) -> tuple[int, bytes]:
    """The offset and bytes of the file's last line (its newline included, if it has one)."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        pos, start = max(size - 1, 0), 0  # a final newline ends the last line; it starts none
        while pos > 0:
            block_start = max(0, pos - 65536)
            f.seek(block_start)
            i = f.read(pos - block_start).rfind(b"\n")
            if i >= 0:
                start = block_start + i + 1
                break
            pos = block_start
        f.seek(start)
        return start, f.read()


def _repair_torn_tail(path: Path) -> None:
    start, line = _last_line(path)
    if not _torn(line):
        return  # another process repaired it while this one waited for the lock
    backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    with atomic_path(backup) as tmp:
        shutil.copyfile(path, tmp)
    with path.open("r+b") as f:
        if _is_record(line):  # only the line end was lost: the record itself is whole
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            done = "restored the line end of its last record"
        else:
            f.truncate(start)
            done = f"cut its torn last record ({len(line)} bytes)"
        f.flush()
        os.fsync(f.fileno())
    print(
        f"warning: journal {path} ended in a torn write; saved it as {backup} and {done}, "
        f"so the study keeps every complete record",
        file=sys.stderr,
    )


def _cut_torn_tail(path: Path) -> None:
    """Cut a torn last record that a failed append (a full disk) left, without a backup copy (there is
    no space for one, and the bytes are only the start of a record that was never written whole)."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or not _torn(_last_line(path)[1]):
        return
    lock, held = JournalFileSymlinkLock(str(path)), False
    with contextlib.suppress(OSError):  # the lock's link may find no space either; then cut without it
        held = lock.acquire()
    try:
        start, line = _last_line(path)
        if _torn(line) and not _is_record(line):
            with path.open("r+b") as f:
                f.truncate(start)
    finally:
        if held:
            lock.release()


def _broken_line(path: Path) -> int:
    """The number of the first line that is not a whole record, or 0."""
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if _torn(line):
                return n
    return 0


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _damaged(path: Path, line: int) -> str:
    return (
        f"{path}: line {line} is not a whole journal record and more records follow it, so Optuna cannot read "
        f"the study (a write was cut short and another was written onto it). Keep a copy of the file, then edit "
        f"line {line} to keep only the text from its last '{{\"op_code\"' on, or delete the line if it has none"
    )


def display(url: str, root: Path) -> str:
    """How the console names a storage: a journal by its path below ``root``, a database server as
    ``host:port/database`` (no user, no password), anything else as its URL without the password."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        return str(path.relative_to(root)) if root in path.parents else str(path)
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return safe_url(url)
    if parsed.host:
        return f"{parsed.host}" + (f":{parsed.port}" if parsed.port else "") + f"/{parsed.database or ''}"
    return safe_url(url)


def make_pruner(spec: dict[str, Any]):
    """The pruner. Its resource is the optimizer step at which distill evaluated."""
    import optuna

    kind = spec["type"]
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec["n_startup_trials"],
            n_warmup_steps=spec["n_warmup_steps"],
            interval_steps=spec["interval_steps"],
        )
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec["min_resource"],
            reduction_factor=spec["reduction_factor"],
            min_early_stopping_rate=spec["min_early_stopping_rate"],
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec["min_resource"],
            max_resource=spec["max_resource"],
            reduction_factor=spec["reduction_factor"],
        )
    return optuna.pruners.NopPruner()
