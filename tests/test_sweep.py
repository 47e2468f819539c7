"""Studies end to end on the tiny config: real git + DVC repositories, real Optuna journal
storage, real TensorBoard files, `kdsweep` run as the user runs it (a subprocess).

One session-scoped repository runs `dvc repro` for the upstream stages once; each test
works on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml
from sweeprepo import SPEC, TS, UPSTREAM, experiments, kdsweep, lock, sh, study, write_spec


# --------------------------------------------------------------------------- the default suite
def test_small_study_records_every_trial_as_a_dvc_experiment(small_study):
    repo, proc = small_study
    s = study(repo, "small")
    assert [(t.number, t.state) for t in s.trials] == [(0, TS.COMPLETE), (1, TS.COMPLETE)]
    assert s.trials[0].params == {"loss.alpha": 0.5, "loss.temperature": 2.0}  # the baseline is trial 0
    exps = experiments(repo)
    assert {"small-0", "small-1"} <= exps.keys()
    for t in s.trials:
        e = exps[f"small-{t.number}"]
        assert e["params"]["loss"]["alpha"] == pytest.approx(t.params["loss.alpha"])
        assert e["params"]["loss"]["temperature"] == pytest.approx(t.params["loss.temperature"])
        assert e["params"]["training"]["max_steps"] == 6
        m = e["metrics"]
        assert m["state"] == "complete" and m["steps"] == 6
        assert t.value == pytest.approx(m["val_loss"]) and m["best_val_loss"] <= m["val_loss"] + 1e-9
        assert sorted(t.intermediate_values) == [3, 6]  # reported at every evaluation
    assert "upstream recomputations: 0" in proc.stdout


def test_trials_reuse_the_upstream_stages(small_study, sweep_template):
    repo, proc = small_study
    before = lock(sweep_template)
    assert {s: lock(repo)[s] for s in UPSTREAM} == {s: before[s] for s in UPSTREAM}  # workspace untouched
    for name, e in experiments(repo).items():
        if name.startswith("small-"):
            assert {s: lock(repo, e["rev"])[s] for s in UPSTREAM} == {s: before[s] for s in UPSTREAM}, name
    for log in (repo / "studies" / "small" / "logs").glob("*.log"):
        text = log.read_text()
        assert "Running stage 'distill'" in text
        assert not any(f"Running stage '{s}'" in text for s in UPSTREAM), log


def test_each_trial_writes_hparams_that_tensorboard_reads(small_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    repo, _ = small_study
    s = study(repo, "small")
    for t in s.trials:
        acc = EventAccumulator(str(repo / "runs" / "small" / str(t.number)))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        assert content, "no HParams summaries"
        hparams = {}
        for raw in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.HasField("session_start_info"):
                hparams = {
                    k: v.number_value if v.HasField("number_value") else v.string_value
                    for k, v in data.session_start_info.hparams.items()
                }
        assert hparams["loss.alpha"] == pytest.approx(t.params["loss.alpha"], rel=1e-6)
        assert hparams["loss.temperature"] == pytest.approx(t.params["loss.temperature"], rel=1e-6)
        assert "eval/val_loss" in acc.Tags()["scalars"]


def test_retention_keeps_only_the_best_trials_outputs(small_study):
    repo, proc = small_study
    s = study(repo, "small")
    best, other = sorted(s.trials, key=lambda t: t.value)
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    exps = experiments(repo)

    def files(name):
        out = next(o for o in lock(repo, exps[name]["rev"])["distill"]["outs"] if o["path"] == "models/student")
        entries = (
            json.loads((cache / out["md5"][:2] / out["md5"][2:]).read_text())
            if (cache / out["md5"][:2] / out["md5"][2:]).exists()
            else None
        )
        return out["md5"], entries

    _, kept = files(f"small-{best.number}")
    assert kept and all((cache / e["md5"][:2] / e["md5"][2:]).exists() for e in kept)
    dropped_dir, dropped = files(f"small-{other.number}")
    assert dropped is None  # its manifest and the files only it had are gone
    assert s.user_attrs["outputs_removed"] == [other.number]
    assert "retention: keeping the outputs of the best 1" in proc.stdout and "freed" in proc.stdout
    assert f"small-{other.number}" in exps  # the experiment itself stays listed


def test_status_best_and_report(small_study, tmp_path):
    repo, _ = small_study
    out = kdsweep(repo, "status", "small").stdout
    assert "2 of 2 finished: 2 complete, 0 pruned, 0 failed" in out
    best = kdsweep(repo, "best", "small").stdout
    assert best.splitlines()[1].split()[:2] == ["rank", "trial"] and "small-0" in best and "small-1" in best
    report_dir = tmp_path / "report"
    kdsweep(repo, "report", "small", "--out", str(report_dir))
    text = (report_dir / "report.md").read_text()
    for png in (
        "optimization_history.png",
        "parallel_coordinates.png",
        "alpha_temperature.png",
        "param_importances.png",
    ):
        assert f"]({png})" in text and (report_dir / png).stat().st_size > 1000, png
    assert "## `dvc exp show`" in text and "| small-0 | complete |" in text


def test_best_apply_restores_the_best_params_and_checkpoint(small_study, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(small_study[0], repo, symlinks=True)
    s = study(repo, "small")
    winner = s.best_trial
    kdsweep(repo, "best", "small", "--apply", "--branch", "best-small")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["loss"]["alpha"] == pytest.approx(winner.params["loss.alpha"])
    assert params["loss"]["temperature"] == pytest.approx(winner.params["loss.temperature"])
    rev = experiments(repo)[f"small-{winner.number}"]["rev"]
    out = next(o for o in lock(repo, rev)["distill"]["outs"] if o["path"] == "models/student")
    manifest = json.loads((repo / ".dvc/cache/files/md5" / out["md5"][:2] / out["md5"][2:]).read_text())
    for entry in manifest:
        assert hashlib.md5((repo / "models/student" / entry["relpath"]).read_bytes()).hexdigest() == entry["md5"]
    branch = sh(repo, "git", "show", "best-small:params.yaml").stdout
    assert yaml.safe_load(branch)["loss"]["alpha"] == pytest.approx(winner.params["loss.alpha"])


# --------------------------------------------------------------------------- slow: heavier studies
@pytest.mark.slow
def test_four_trials_with_two_workers(sweep_repo):
    proc = kdsweep(
        sweep_repo,
        "run",
        write_spec(sweep_repo, "par", baselines=[], workers=2, budget={"n_trials": 4}, retention={"keep_best": None}),
    )
    s = study(sweep_repo, "par")
    assert [t.number for t in s.trials] == [0, 1, 2, 3] and all(t.state == TS.COMPLETE for t in s.trials)
    names = [t.user_attrs["experiment"] for t in s.trials]
    assert names == [f"par-{i}" for i in range(4)] and set(names) <= experiments(sweep_repo).keys()
    spans = sorted((t.datetime_start, t.datetime_complete) for t in s.trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "two trials ran at the same time"
    assert "upstream recomputations: 0" in proc.stdout


@pytest.mark.slow
def test_a_harmful_learning_rate_is_pruned(sweep_repo):
    spec = write_spec(
        sweep_repo,
        "prune",
        fixed={**SPEC["fixed"], "training.max_steps": 9},
        space={"training.learning_rate": {"type": "categorical", "choices": [0.003, 0.5]}},
        baselines=[
            {"training.learning_rate": 0.003},
            {"training.learning_rate": 0.003},
            {"training.learning_rate": 0.5},
        ],
        pruner={"type": "median", "n_startup_trials": 2},
        budget={"n_trials": 3},
    )
    kdsweep(sweep_repo, "run", spec)
    s = study(sweep_repo, "prune")
    assert [t.state for t in s.trials] == [TS.COMPLETE, TS.COMPLETE, TS.PRUNED]
    pruned = s.trials[2]
    assert (
        list(pruned.intermediate_values) == [3] and pruned.intermediate_values[3] > s.trials[0].intermediate_values[3]
    )
    m = experiments(sweep_repo)["prune-2"]["metrics"]
    assert m["state"] == "pruned" and m["steps"] == 3  # stopped early, still recorded by DVC


@pytest.mark.slow
def test_a_failing_trial_does_not_stop_the_study(sweep_repo):
    spec = write_spec(
        sweep_repo,
        "fail",
        fixed={**SPEC["fixed"], "training.max_nonfinite_steps": 1},
        space={"training.learning_rate": {"type": "categorical", "choices": [0.003, 1000000.0]}},
        baselines=[
            {"training.learning_rate": 0.003},
            {"training.learning_rate": 1000000.0},
            {"training.learning_rate": 0.003},
        ],
        budget={"n_trials": 3},
    )
    proc = kdsweep(sweep_repo, "run", spec)
    s = study(sweep_repo, "fail")
    assert [t.state for t in s.trials] == [TS.COMPLETE, TS.FAIL, TS.COMPLETE]
    assert "non-finite" in s.trials[1].user_attrs["fail_reason"]
    assert "trial 1 (fail-1): failed: error: distill: stopped after 1 non-finite" in proc.stderr + proc.stdout
    failed = experiments(sweep_repo)["fail-1"]  # DVC keeps no failed run; kdsweep records it
    assert failed["metrics"]["state"] == "failed" and "non-finite" in failed["metrics"]["reason"]
    assert failed["params"]["training"]["learning_rate"] == 1000000.0
