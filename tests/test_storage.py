"""Opening Optuna storage: torn journals are repaired, RDB URLs are checked before use.

Every study here is a real Optuna study in a real JournalFileBackend file; a torn journal
is made the way a kill during a write or a full disk leaves one.
"""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from kdsweep.errors import UserError
from kdsweep.optuna_io import check_storage, open_storage

TS = optuna.trial.TrialState


def _study(path, n: int) -> None:
    """A journal study with ``n`` complete trials."""
    s = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    for i in range(n):
        t = s.ask()
        t.suggest_float("x", 0, 1)
        s.tell(t, float(i))


def _read_back(path) -> list:
    """Every trial, read by Optuna itself from a fresh storage object (no repair on this path)."""
    return optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path)))).trials


def _cut_last_byte(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1])


def _append_half_record(path) -> None:
    last = path.read_bytes().splitlines()[-1]
    with path.open("ab") as f:
        f.write(last[: len(last) // 2])


@pytest.mark.parametrize("tear", [_cut_last_byte, _append_half_record])
def test_a_torn_journal_is_backed_up_and_repaired_before_a_resume_appends(tmp_path, capfd, tear):
    path = tmp_path / "s.journal"
    _study(path, 3)
    tear(path)
    torn = path.read_bytes()

    storage = open_storage(f"journal:{path}")
    err = capfd.readouterr().err.strip().splitlines()
    backups = list(tmp_path.glob("s.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == torn  # the torn file, byte for byte
    assert len(err) == 1 and str(path) in err[0] and str(backups[0]) in err[0]

    resumed = optuna.load_study(study_name="s", storage=storage)  # a resume: more records appended
    t = resumed.ask()
    t.suggest_float("x", 0, 1)
    resumed.tell(t, 10.0)

    trials = _read_back(path)
    assert [t.state for t in trials][-1] == TS.COMPLETE and trials[-1].value == 10.0
    assert len(trials) in (3, 4)  # the torn record's trial is kept when its record was whole
    assert all(t.state == TS.COMPLETE for t in trials[:-1])
    for line in path.read_bytes().splitlines():
        json.loads(line)


def test_an_intact_journal_is_left_alone(tmp_path, capfd):
    path = tmp_path / "s.journal"
    _study(path, 2)
    before = path.read_bytes()
    open_storage(f"journal:{path}")
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))
    assert capfd.readouterr().err == ""


def test_a_record_broken_in_the_middle_is_refused_with_the_line_and_the_fix(tmp_path):
    path = tmp_path / "s.journal"
    _study(path, 2)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2][:10] + lines[3]  # what the old code left: a record written onto a torn one
    path.write_bytes(b"".join(lines))
    with pytest.raises(UserError) as e:
        open_storage(f"journal:{path}")
    assert str(path) in str(e.value) and "line 3" in str(e.value)


def test_a_storage_url_whose_driver_is_missing_names_it_and_the_fix(tmp_path):
    url = "mysql+pymysql://kd:s3cret@db.example:3306/sweeps"
    problems = check_storage(url)
    assert len(problems) == 1
    assert "pymysql" in problems[0] and "pip install pymysql" in problems[0]
    assert "db.example:3306/sweeps" in problems[0] and "s3cret" not in problems[0]
    with pytest.raises(UserError) as e:
        open_storage(url)
    assert str(e.value) == problems[0]


def test_check_storage_accepts_a_journal_and_a_sqlite_file(tmp_path):
    assert check_storage(f"journal:{tmp_path / 'new' / 's.journal'}") == []
    assert check_storage(f"sqlite:///{tmp_path / 's.db'}") == []
