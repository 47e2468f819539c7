"""The trial record, its causes and the budget they spend, the study's stored objective, and one ranking
for every reader: on real Optuna journal studies (and a real full disk: a small tmpfs this test mounts).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import optuna
import pytest
from helpers import REPO, fill_disk, small_disk
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from sweeprepo import committed_repo, kdsweep, write_spec

from kdsweep.errors import UserError
from kdsweep.optuna_io import StorageUnavailable, open_storage, with_retries
from kdsweep.sweep import selection
from kdsweep.sweep.budget import spent
from kdsweep.sweep.record import FAILED, INTERRUPTED, StudyRecord, classify, enqueue, records, write, write_cause
from kdsweep.sweep.runner import open_study
from kdsweep.sweep.spec import parse_spec

TS = optuna.trial.TrialState


@pytest.mark.parametrize(
    ("output", "ended", "kind", "line"),
    [
        (
            "Traceback (most recent call last):\n  File x\nOSError: [Errno 28] No space left on device\n",
            INTERRUPTED,
            "disk_full",
            "OSError: [Errno 28] No space left on device",
        ),
        (
            "error: storage postgresql+psycopg://kd:***@127.0.0.1:5/s: connection lost (connection failed: "
            "Connection refused) while reporting (trial 3), after retrying; check that the database server runs",
            INTERRUPTED,
            "storage",
            None,
        ),
        (
            "ERROR: failed to reproduce 'distill': failed to run: kdsweep distill, exited with -9",
            INTERRUPTED,
            "memory",
            None,
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", INTERRUPTED, "memory", None),
        (
            "ERROR: failed to reproduce 'distill': failed to run: kdsweep distill, exited with -15",
            INTERRUPTED,
            "signal",
            None,
        ),
        (
            "step 3\nerror: distill: stopped after 1 non-finite training losses in a row\nERROR: failed to reproduce",
            FAILED,
            "config",
            "error: distill: stopped after 1 non-finite training losses in a row",
        ),
    ],
)
def test_classify_tells_the_infrastructure_from_the_configuration(output, ended, kind, line):
    cause = classify(output)
    assert (cause.ended, cause.kind) == (ended, kind)
    assert "\n" not in cause.line and cause.line in output
    if line is not None:
        assert cause.line == line


def _journal(path: Path, name: str = "s") -> tuple[optuna.Study, JournalStorage, str]:
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.create_study(study_name=name, storage=storage), storage, f"journal:{path}"


def _finish(study, storage, url, *, value=None, cause=None):
    """A trial that completes with ``value``, or fails with ``cause``."""
    t = study.ask()
    t.suggest_float("x", 0, 1)
    write(storage, t._trial_id, url, experiment=f"s-{t.number}")
    if cause is not None:
        write_cause(storage, t._trial_id, url, cause, cause.line)
        study.tell(t, state=TS.FAIL)
    else:
        study.tell(t, value)
    return t


def test_interrupted_trials_spend_no_budget_and_their_retry_does(tmp_path):
    study, storage, url = _journal(tmp_path / "s.journal")
    _finish(study, storage, url, value=1.0)
    _finish(study, storage, url, cause=classify("error: distill: stopped after 1 non-finite training losses"))
    _finish(study, storage, url, cause=classify("OSError: [Errno 28] No space left on device"))
    assert spent(records(study)) == 2  # complete + failed; the interrupted one spends nothing
    interrupted = records(study)[2]
    enqueue(study, interrupted.params, retry_of=interrupted, attempt=interrupted.attempt + 1)
    retry = study.ask()
    retry.suggest_float("x", 0, 1)  # the enqueued value
    study.tell(retry, 0.5)
    trials = records(study)
    assert (trials[3].retry_of, trials[3].attempt, trials[3].params) == (2, 2, interrupted.params)
    assert spent(trials) == 3
    assert [t.ended for t in trials] == ["complete", "failed", "interrupted", "complete"]
    assert trials[2].cause == "OSError: [Errno 28] No space left on device" and trials[2].cause_kind == "disk_full"


def test_an_older_studys_interrupted_mark_still_reads_as_interrupted(tmp_path):
    study, storage, url = _journal(tmp_path / "s.journal")
    t = study.ask()
    t.suggest_float("x", 0, 1)
    t.set_user_attr("interrupted", True)  # how studies before the record module marked it
    study.tell(t, state=TS.FAIL)
    (old,) = records(study)
    assert old.interrupted and old.ended == "interrupted" and spent([old]) == 0


def test_a_resume_with_another_objective_exits_2_and_names_both(tmp_path):
    url = f"journal:{tmp_path / 's.journal'}"
    spec = parse_spec({"study": "s", "objective": {"metric": "val_loss"}}, "spec")
    study, _ = open_study(spec, tmp_path, url)
    assert StudyRecord.of(study).objective == {"metric": "val_loss", "direction": "minimize"}
    for objective, words in (
        ({"metric": "best_val_loss"}, ("minimizes val_loss", "minimize best_val_loss")),
        ({"metric": "val_loss", "direction": "maximize"}, ("minimizes val_loss", "maximize val_loss")),
    ):
        other = parse_spec({"study": "s", "objective": objective}, "spec")
        with pytest.raises(UserError) as e:
            open_study(other, tmp_path, url)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
    open_study(spec, tmp_path, url)  # the same objective resumes


def test_a_study_from_before_the_stored_objective_is_checked_against_its_last_spec(tmp_path):
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "s.journal")))
    old = optuna.create_study(study_name="s", storage=storage)
    old.set_user_attr("spec", {"objective": {"metric": "val_loss", "direction": "minimize"}})
    spec = parse_spec({"study": "s", "objective": {"metric": "best_val_loss"}}, "spec")
    with pytest.raises(UserError, match="minimizes val_loss.*minimize best_val_loss"):
        open_study(spec, tmp_path, f"journal:{tmp_path / 's.journal'}")


def test_selection_ranks_complete_then_pruned_and_follows_an_interrupted_baseline(tmp_path):
    study, storage, url = _journal(tmp_path / "s.journal")
    enqueue(study, {"x": 0.5}, baseline=0)
    base = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    write_cause(storage, base._trial_id, url, classify("could not connect to server: Connection refused"), "")
    study.tell(base, state=TS.FAIL)
    (first,) = records(study)
    enqueue(study, first.params, retry_of=first, attempt=2)
    retry = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(retry, 2.0)
    _finish(study, storage, url, value=1.0)
    pruned = study.ask()
    pruned.suggest_float("x", 0, 1)
    pruned.report(0.1, 3)
    study.tell(pruned, state=TS.PRUNED)
    _finish(study, storage, url, value=1.0)  # ties with trial 2: the lower number ranks first
    trials = records(study)
    assert [t.number for t in selection.ranked(trials, "minimize")] == [2, 4, 1, 3]
    assert selection.best(trials, "minimize").number == 2 and selection.best(trials, "maximize").number == 1
    base_record, what = selection.baseline(trials)
    assert base_record.number == 1 and what == "the baseline"
    assert selection.baselines(trials) == {0, 1}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs mounted for the test (CI runs as root), unmounted afterwards."""
    with small_disk(tmp_path / "disk", "512k") as mount:
        yield mount


def test_a_journal_write_on_a_full_disk_waits_for_space_and_leaves_no_torn_record(tiny_disk, capfd):
    study, storage, url = _journal(tiny_disk / "s.journal")
    t = study.ask()
    filler = fill_disk(tiny_disk)
    threading.Timer(2.0, filler.unlink).start()  # space comes back after 2 s
    t0 = time.monotonic()
    with_retries(lambda: storage.set_trial_user_attr(t._trial_id, "experiment", "x" * 5000), url, "writing", 20)
    assert time.monotonic() - t0 >= 2.0
    assert "No space left on device (errno ENOSPC) while writing; retrying" in capfd.readouterr().err
    lines = (tiny_disk / "s.journal").read_bytes().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)  # every record whole
    reread = JournalStorage(JournalFileBackend(str(tiny_disk / "s.journal")))
    assert reread.get_trial(t._trial_id).user_attrs == {"experiment": "x" * 5000}


def test_a_journal_write_on_a_disk_that_stays_full_is_one_clear_error(tiny_disk):
    study, storage, url = _journal(tiny_disk / "s.journal")
    t = study.ask()
    fill_disk(tiny_disk)
    with pytest.raises(StorageUnavailable) as e:
        with_retries(lambda: storage.set_trial_user_attr(t._trial_id, "experiment", "x" * 5000), url, "writing", 2)
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message
    assert "No space left on device" in message and "free space on its disk" in message and "s.journal" in message
    assert open_storage(url).get_trial(t._trial_id).user_attrs == {}  # the journal still reads


def test_status_best_and_report_show_why_a_trial_ended_in_one_line(tmp_path):
    repo = committed_repo(tmp_path / "repo", {name: (REPO / name).read_text() for name in ("params.yaml", "dvc.yaml")})
    write_spec(repo, "causes")
    (repo / "studies").mkdir()
    study, storage, url = _journal(repo / "studies" / "causes.journal", "causes")
    study.set_user_attr("spec", json.loads(parse_spec({"study": "causes"}, "spec").model_dump_json()))
    _finish(study, storage, url, value=1.0)
    log = "step 3\nTraceback (most recent call last):\nOSError: [Errno 28] No space left on device\nERROR: failed"
    _finish(study, storage, url, cause=classify(log))
    _finish(study, storage, url, cause=classify("error: distill: stopped after 1 non-finite training losses"))
    want = [
        "interrupted (disk_full, spent no budget): trial 1 (s-1): OSError: [Errno 28] No space left on device",
        "failed: trial 2 (s-2): error: distill: stopped after 1 non-finite training losses",
    ]
    status = kdsweep(repo, "status", "causes").stdout
    assert "2 of 10 finished: 1 complete, 0 pruned, 1 failed" in status and "1 interrupted (spent no budget)" in status
    for args in (("status", "causes"), ("best", "causes")):
        out = kdsweep(repo, *args).stdout.splitlines()
        assert all(line in out for line in want), (args, out)
    kdsweep(repo, "report", "causes")
    report = (repo / "reports" / "causes" / "report.md").read_text()
    assert all(f"- {line}" in report for line in want)


def test_the_backoff_after_an_interruption_grows_and_is_bounded():
    from kdsweep.sweep.outcome import backoff

    assert [backoff(a) for a in range(6)] == [5.0, 5.0, 15.0, 45.0, 45.0, 45.0]
