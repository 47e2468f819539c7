"""``kdsweep dashboard``: optuna-dashboard over a study's own storage, while it runs or after.

    storage = the study's, resolved as ``kdsweep status`` does (its spec's ``storage:``, else
              ``studies/<study>.journal``; ``--storage`` overrides), opened and checked
    print what it serves (the storage without user or password) and the study's URL
    optuna-dashboard serves it until Ctrl-C (reading the storage on every request: live)

The dashboard reads the same storage object the runner writes through, so a torn journal line
is repaired first (:func:`kdsweep.optuna_io.open_storage`), and a PostgreSQL password stays in
``PGPASSWORD`` or ``~/.pgpass``: it is never on the command line, where ``ps`` would show it.
"""

from __future__ import annotations

from kdsweep.errors import UserError
from kdsweep.optuna_io import display


def serve(study: str, storage: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard for ``study`` (a name or a spec file) on ``host:port`` until interrupted."""
    from optuna_dashboard import run_server

    from kdsweep.sweep.results import StudyHandle

    h = StudyHandle(study, storage)
    study_id = h.storage.get_study_id_from_name(h.name)  # the dashboard's URLs name a study by its id
    print(
        f"dashboard: study {h.name!r} ({len(h.trials)} trials) in {display(h.url, h.root)}: "
        f"http://{host}:{port}/dashboard/studies/{study_id}  (Ctrl-C stops it)",
        flush=True,
    )
    try:
        run_server(h.storage, host=host, port=port)
    except OSError as err:  # the port is taken, or the host is not this machine's
        raise UserError(f"--host {host} --port {port}: {err.strerror}; pick another --port") from None
