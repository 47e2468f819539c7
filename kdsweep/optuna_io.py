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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from kdsweep.errors import UserError
from kdsweep.fsio import atomic_path

# Driver modules whose pip package has another name.
_PIP_NAMES = {"MySQLdb": "mysqlclient", "psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'"}


def open_storage(url: str):
    """An Optuna storage object for a storage string.

    A torn journal is repaired first (see the module docstring); a journal that cannot be read,
    an RDB URL whose driver is not installed or whose database cannot be reached is a
    :class:`UserError` naming the storage (never its password) and the fix.
    """
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    if url.startswith("journal:"):
        return _open_journal(Path(url[len("journal:") :]))
    problem = _driver_problem(url)
    if problem:
        raise UserError(problem)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return optuna.storages.RDBStorage(url)
    except SQLAlchemyError as e:
        raise UserError(f"storage {safe_url(url)}: cannot open the database: {_first_line(e)}") from None


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
    """How the console names a storage: a journal by its path below ``root``, an RDB URL without its password."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        return str(path.relative_to(root)) if root in path.parents else str(path)
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
