"""The sweep never opens the test split: a study decides the same whatever the test split holds."""

from __future__ import annotations

import os

import pytest
from sweeprepo import TS, experiments, kdsweep, lock, sh, study, write_spec

TEST_FILES = ("data/prepared/test.npy", "data/teacher_logits/test.h5")


def _hash(outs: list[dict], path: str) -> str:
    return next(o["md5"] for o in outs if o["path"] == path)


@pytest.mark.slow
def test_a_study_decides_the_same_whatever_the_test_split_holds(small_study, sweep_repo):
    """Run ``small_study``'s spec again where the test split is random bytes; every decision must match.

    A trial does not read the workspace: ``dvc exp run --temp`` checks its inputs out of the DVC
    cache by the hashes in dvc.lock. Replacing the files in the workspace alone would change
    nothing a trial sees. So, in a fresh copy of the sweep template, ``test.npy`` and ``test.h5``
    are replaced by random bytes (neither a valid .npy nor a valid HDF5 file: a process that opened
    them as data would fail, and the trial with it) and ``dvc commit -f`` records them for the
    upstream stages, which stay up to date: the runner reproduces nothing, and every trial's
    checkout holds the random files (asserted below: the trials' experiments record the new
    ``data/prepared`` and ``data/teacher_logits`` hashes). DVC itself reads the bytes to hash and
    copy them; no kdsweep process opens them.

    Compared with ``small_study`` (same spec, same seed, the real test split): the trials' states
    and params, the values reported at every evaluation (all a pruner sees, so any pruner prunes
    the same trials), the final values and the best trial, exactly.
    """
    repo = sweep_repo
    for path in TEST_FILES:
        (repo / path).unlink()  # a link into the DVC cache must not be written through
        (repo / path).write_bytes(os.urandom(4096))
    sh(repo, "dvc", "commit", "-f", "prepare", "teacher", "teacher_logits", "student")
    kdsweep(repo, "run", write_spec(repo, "small"))

    real, random = study(small_study[0], "small"), study(repo, "small")
    assert len(random.trials) == len(real.trials) == 2
    for a, b in zip(real.trials, random.trials, strict=True):
        assert (b.number, b.state, b.params) == (a.number, a.state, a.params)
        assert b.intermediate_values == a.intermediate_values
        assert b.value == a.value and b.state == TS.COMPLETE
    assert random.best_trial.number == real.best_trial.number

    real_exps, random_exps = experiments(small_study[0]), experiments(repo)
    for t in random.trials:
        name = f"small-{t.number}"
        a, b = lock(small_study[0], real_exps[name]["rev"]), lock(repo, random_exps[name]["rev"])
        for path in ("data/prepared", "data/teacher_logits"):
            assert _hash(b["distill"]["deps"], path) != _hash(a["distill"]["deps"], path), (name, path)
