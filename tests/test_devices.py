"""Devices: each running trial holds its own devices; a trial on several devices runs under torchrun;
the teacher-logit cache written by one shard process per device.

The device sets and pool are checked directly; the rest runs as the user runs it: `kdsweep run`
on the tiny pipeline in a real git + DVC repository, `kdsweep cache generate --devices 2` as
subprocesses. On this CPU machine an explicit `execution.devices` list only sets
CUDA_VISIBLE_DEVICES, which is what the study tests look at.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from helpers import tiny_params_dict
from sweeprepo import BIN, ENV, SPEC, TS, experiments, kdsweep, sh, study, write_spec
from typer.testing import CliRunner

from kdsweep.cache.cli import cache_app
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.verify import verify_cache
from kdsweep.errors import UserError
from kdsweep.sweep.devices import DevicePool, DeviceSets, device_sets
from kdsweep.sweep.spec import parse_spec


def _spec(**fields):
    return parse_spec({"budget": {"n_trials": 1}, **fields})


# --------------------------------------------------------------------------- the plan
def test_auto_on_a_cpu_machine_changes_nothing():
    plan = device_sets(_spec(), visible=[])
    assert plan.sets == () and plan.workers == 1
    assert device_sets(_spec(workers=3), visible=[]).workers == 3
    assert "none visible" in plan.describe()
    assert DevicePool(plan).env(0) == {"KDSWEEP_NPROC_PER_NODE": "1"}  # no CUDA_VISIBLE_DEVICES


def test_auto_makes_one_worker_per_device_set():
    plan = device_sets(_spec(execution={"devices_per_trial": 2}), visible=["0", "1", "2", "3", "4"])
    assert plan.sets == (("0", "1"), ("2", "3")) and plan.unused == ("4",) and plan.workers == 2
    assert plan.describe() == (
        "devices: 2 per trial (auto: 5 visible): sets [0,1] [2,3], one per running trial; unused: 4; "
        "each trial's distill runs under torchrun with 2 processes"
    )
    listed = device_sets(_spec(workers=1, execution={"devices": [3, "GPU-7f"]}), visible=["0"])
    assert listed.sets == (("3",), ("GPU-7f",)) and listed.workers == 1
    assert "1 set(s) idle with 1 worker(s)" in listed.describe()


def test_more_workers_than_device_sets_is_an_error_naming_the_keys():
    spec = _spec(workers=2, execution={"devices": [0, 1], "devices_per_trial": 2})
    with pytest.raises(UserError) as e:
        device_sets(spec)
    for key in ("workers: 2", "execution.devices", "execution.devices_per_trial: 2", "at most 1"):
        assert key in str(e.value)
    overridden = _spec(execution={"devices": [0, 1]}).model_copy(update={"workers": 3})  # `--workers 3`
    with pytest.raises(UserError, match="workers: 3"):
        device_sets(overridden)
    with pytest.raises(UserError, match=r"execution.devices_per_trial: 4, but execution.devices \(auto\) has 2"):
        device_sets(_spec(execution={"devices_per_trial": 4}), visible=["0", "1"])


def test_device_lists_are_checked_with_the_spec():
    for devices, per, message in (
        ([0, 0], 1, "a device is listed twice"),
        ([], 1, "an empty list"),
        ([-1], 1, "-1 is not a device id"),
        ([0], 2, "devices_per_trial: 2 exceeds the 1 device"),
        ("all", 1, "Input should be 'auto'"),
    ):
        with pytest.raises(UserError, match=message):
            _spec(execution={"devices": devices, "devices_per_trial": per})


# --------------------------------------------------------------------------- the pool
def _hold(pool: DevicePool, holder: int, log: list, entered: threading.Event, release: threading.Event):
    with pool.take(holder) as devices:
        log.append((holder, devices, pool.env(holder)["CUDA_VISIBLE_DEVICES"]))
        entered.set()
        release.wait(10)


def test_running_trials_hold_disjoint_sets_and_a_third_waits():
    pool = DevicePool(DeviceSets((("0", "1"), ("2", "3")), 2, 2, "list"))
    log, release = [], threading.Event()
    entered = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(target=_hold, args=(pool, i, log, entered[i], release)) for i in range(3)]
    for t in threads[:2]:
        t.start()
    assert entered[0].wait(5) and entered[1].wait(5)
    threads[2].start()
    assert not entered[2].wait(0.3), "a third trial took a set while both were held"
    assert sorted(d for _, d, _ in log) == [("0", "1"), ("2", "3")]
    assert all(env == ",".join(d) for _, d, env in log)
    release.set()
    for t in threads:
        t.join(5)
    assert entered[2].is_set() and len(log) == 3
    assert pool.env(2) == {"KDSWEEP_NPROC_PER_NODE": "2"}  # given back: no devices any more


def test_a_crashed_trial_gives_its_devices_back():
    pool = DevicePool(DeviceSets((("0",),), 1, 1, "list"))
    with pytest.raises(RuntimeError), pool.take(0) as devices:
        assert devices == ("0",)
        raise RuntimeError("the trial crashed")
    got = []
    t = threading.Thread(target=lambda: got.append(pool.take(1).__enter__()))
    t.start()
    t.join(5)
    assert got == [("0",)], "the crashed trial kept its device"


# --------------------------------------------------------------------------- studies
def _without_workers(repo: Path, spec: str) -> str:
    """The spec with `workers` left out (the helpers' specs set it)."""
    data = yaml.safe_load((repo / spec).read_text())
    del data["workers"]
    (repo / spec).write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def test_two_workers_on_one_device_set_exit_2_and_check_prints_the_plan(sweep_repo):
    spec = write_spec(sweep_repo, "toomany", workers=2, execution={"devices": [0, 1], "devices_per_trial": 2})
    proc = kdsweep(sweep_repo, "run", spec, "--check", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("workers: 2", "execution.devices", "execution.devices_per_trial: 2"):
        assert key in proc.stderr
    ok = _without_workers(sweep_repo, write_spec(sweep_repo, "plan", execution={"devices": [0, 1]}))
    out = kdsweep(sweep_repo, "run", ok, "--check").stdout
    assert "; 2 workers" in out and "devices: 1 per trial (listed): sets [0] [1], one per running trial" in out


def _trial_devices(repo: Path, name: str, n: int) -> dict[int, list[str]]:
    """Trial number -> the CUDA_VISIBLE_DEVICES values its distill printed into its log."""
    found = {}
    for k in range(n):
        log = (repo / "studies" / name / "logs" / f"{k}.log").read_text()
        found[k] = re.findall(r"distill: CUDA_VISIBLE_DEVICES=(\S*);", log)
    return found


@pytest.mark.slow
def test_four_trials_on_two_devices_never_share_one(sweep_repo):
    spec = write_spec(sweep_repo, "gpus", baselines=[], budget={"n_trials": 4}, execution={"devices": [0, 1]})
    spec = _without_workers(sweep_repo, spec)  # two device sets make two workers
    proc = kdsweep(sweep_repo, "run", spec)
    assert "4 to run by this and any other runner, 2 worker(s) here" in proc.stdout
    s = study(sweep_repo, "gpus")
    assert [t.state for t in s.trials] == [TS.COMPLETE] * 4
    devices = _trial_devices(sweep_repo, "gpus", 4)
    assert all(len(set(d)) == 1 and d[0] in ("0", "1") for d in devices.values()), devices  # exactly one each
    exps = experiments(sweep_repo)
    # distill's own process, from its metrics: inside the time its trial held the device
    metrics = {k: exps[f"gpus-{k}"]["metrics"] for k in range(4)}
    spans = {k: (m["started_at"], m["started_at"] + sum(m["seconds"].values())) for k, m in metrics.items()}
    overlapping = [
        (a, b)
        for a in range(4)
        for b in range(a + 1, 4)
        if max(spans[a][0], spans[b][0]) < min(spans[a][1], spans[b][1])
    ]
    assert overlapping, f"no two trials ran at the same time: {spans}"
    for a, b in overlapping:
        assert devices[a][0] != devices[b][0], f"trials {a} and {b} overlapped on device {devices[a][0]}"


@pytest.mark.slow
def test_a_trial_on_two_devices_runs_its_distill_under_torchrun_and_pruning_works(sweep_repo):
    """A study with devices_per_trial: 2 on CPU (Gloo): 2 trials, each a DVC experiment with its
    metrics, the second pruned."""
    spec = write_spec(
        sweep_repo,
        "ranks",
        fixed={**SPEC["fixed"], "training.max_steps": 9},
        space={"training.learning_rate": {"type": "categorical", "choices": [0.003, 0.5]}},
        baselines=[{"training.learning_rate": 0.003}, {"training.learning_rate": 0.5}],
        pruner={"type": "median", "n_startup_trials": 1},
        budget={"n_trials": 2},
        execution={"devices": [0, 1], "devices_per_trial": 2},
    )
    kdsweep(sweep_repo, "run", spec)
    s = study(sweep_repo, "ranks")
    assert [t.state for t in s.trials] == [TS.COMPLETE, TS.PRUNED]
    exps = experiments(sweep_repo)
    assert exps["ranks-0"]["metrics"]["state"] == "complete" and "val_loss" in exps["ranks-0"]["metrics"]
    assert exps["ranks-1"]["metrics"]["state"] == "pruned" and exps["ranks-1"]["metrics"]["steps"] == 3
    for k in range(2):
        log = (sweep_repo / "studies" / "ranks" / "logs" / f"{k}.log").read_text()
        assert "distill: CUDA_VISIBLE_DEVICES=0,1; 2 processes" in log
        assert "torch.distributed.run --standalone --nproc_per_node=2 -m kdsweep.cli distill" in log


@pytest.mark.slow
def test_distill_reexecutes_itself_under_torchrun(pipeline_copy):
    env = {**ENV, "KDSWEEP_NPROC_PER_NODE": "2", "KDSWEEP_HPARAM_KEYS": "loss.alpha"}
    proc = subprocess.run(
        [str(BIN / "kdsweep"), "distill"], cwd=pipeline_copy, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distill: CUDA_VISIBLE_DEVICES unset; 2 processes" in proc.stdout
    assert "--nproc_per_node=2 -m kdsweep.cli distill --no-resume --params params.yaml" in proc.stdout
    assert "--hparam-keys loss.alpha" in proc.stdout
    assert json.loads((pipeline_copy / "metrics/distill.json").read_text())["state"] == "complete"


# --------------------------------------------------------------------------- the cache on several devices
def _standalone_args(tiny_pipeline: Path, tmp_path: Path) -> list[str]:
    """`cache generate` options for a small standalone run with the tiny pipeline's teacher."""
    teacher = tmp_path / "teacher_model"
    shutil.copytree(tiny_pipeline / "models/teacher", teacher)
    for f in (tiny_pipeline / "data/prepared/tokenizer").iterdir():
        shutil.copy(f, teacher / f.name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    return ["--params", "params.yaml", "--teacher-model", str(teacher), "--dataset", "builtin"]


def _generate(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(tmp_path, str(BIN / "kdsweep"), "cache", "generate", *args, check=check)


def test_cache_on_two_devices_equals_one_process(tiny_pipeline, tmp_path, monkeypatch):
    args = [*_standalone_args(tiny_pipeline, tmp_path), "--max-samples", "3", "--batch-size", "8"]
    monkeypatch.chdir(tmp_path)
    one = CliRunner().invoke(cache_app, ["generate", *args, "--output-dir", "one"])
    assert one.exit_code == 0, (one.output, one.exception)
    proc = _generate(tmp_path, *args, "--output-dir", "two", "--devices", "2")
    assert "2 shard processes on the CPU" in proc.stdout and "merged 2 shards" in proc.stdout
    for split in ("train", "validation", "test"):
        a, b = TeacherLogitCache(tmp_path / "one" / f"{split}.h5"), TeacherLogitCache(tmp_path / "two" / f"{split}.h5")
        assert b.shards == [f"{split}.shard-0-of-2.h5", f"{split}.shard-1-of-2.h5"]
        assert a.num_sequences == b.num_sequences and a.fingerprint == b.fingerprint
        rows = list(range(a.num_sequences))
        x, y = a.read(rows), b.read(rows)
        assert np.array_equal(x["input_ids"], y["input_ids"]) and np.array_equal(x["topk_ids"], y["topk_ids"])
        for key in ("topk_logits", "log_normalizer", "log_normalizer_slope"):
            np.testing.assert_allclose(y[key], x[key], rtol=1e-6, atol=1e-6)
        lines = []
        verify_cache(tmp_path / "two" / f"{split}.h5", report=lines.append)
    metrics = json.loads((tmp_path / "two/metrics/teacher_logits.json").read_text())
    assert metrics["validation"]["sequences"] == TeacherLogitCache(tmp_path / "one/validation.h5").num_sequences


@pytest.mark.slow
def test_a_killed_shard_fails_the_stage_with_its_log_and_a_rerun_resumes_it(pipeline_copy):
    params = yaml.safe_load((pipeline_copy / "params.yaml").read_text())
    params["teacher"].update(cache_devices=2, cache_batch_size=1)  # many small batches: time to kill one
    (pipeline_copy / "params.yaml").write_text(yaml.safe_dump(params))
    logs = pipeline_copy / "data/teacher_logits.partial/logs"
    parent = subprocess.Popen(
        [str(BIN / "kdsweep"), "cache", "generate"],
        cwd=pipeline_copy,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = pipeline_copy / "data/teacher_logits.partial/train.shard-1-of-2.h5"
    deadline = time.monotonic() + 300
    while not list(partial.glob("batch-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    shard = next(c for c in psutil.Process(parent.pid).children() if "1/2" in c.cmdline())
    shard.kill()
    _, err = parent.communicate(timeout=300)
    assert parent.returncode == 2 and "Traceback" not in err
    assert f"shard 1/2 failed (exit -9); the end of its log {logs / 'shard-1-of-2.log'}:" in err
    assert "teacher logits (train)" in err  # the log's tail: where the shard was
    again = _generate(pipeline_copy)
    assert "merged 2 shards" in again.stdout
    assert "resuming" in (logs / "shard-1-of-2.log").read_text()
    verify_cache(pipeline_copy / "data/teacher_logits/train.h5", report=lambda line: None)


def test_the_runner_never_imports_torch_on_a_machine_without_a_gpu_driver():
    """`kdsweep run` counts GPUs and checks patterns without torch where no GPU driver exists."""
    code = (
        "import json, sys; import kdsweep.sweep.runner, kdsweep.param_groups; from kdsweep import gpus; "
        "print(json.dumps([gpus.gpu_driver_present(), gpus.visible_gpus(), 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    driver, visible, torch_imported = json.loads(out.stdout)
    assert driver or (visible == [] and not torch_imported)
