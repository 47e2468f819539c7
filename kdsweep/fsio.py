"""Atomic outputs: every file or directory kdsweep writes appears whole or not at all.

DVC outputs here are ``persist: true``, so a stage killed halfway must never leave a
half-written output where the next ``dvc repro`` or a reader would pick it up. Every
writer goes through :func:`atomic_path`: it writes into a temporary sibling and swaps
it in with ``os.replace`` only once the write has finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``.

    With ``directory=True`` the temporary path is created as an empty directory (for
    ``save_pretrained`` and checkpoints). On an exception the temporary path is removed and
    ``path`` is left exactly as it was. Replacing a directory goes through a ``.old``
    sibling, since ``os.replace`` cannot overwrite a non-empty directory.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")
