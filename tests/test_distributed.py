"""``kdsweep distill`` under torchrun: 2 Gloo processes on the CPU against one process, on the tiny pipeline.

Every 2-process run is the documented command, ``torchrun --standalone --nproc_per_node 2 -m kdsweep.cli
distill``, in a subprocess. The one-process reference runs the same global batch: per_device_train_batch_size
4 in one process = 2 per process x 2 processes. The student is pushed away from the teacher first (as in
test_distill's ``perturbed_copy``): the fitted tiny student is almost the teacher, and its gradients would be
at the size of AdamW's eps, where an fp32 rounding difference in a sum changes the update.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import chdir
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from helpers import deep_merge, tiny_params_dict
from test_distill import PHASE1, PHASE2

from kdsweep.config import validate
from kdsweep.distributed import part
from kdsweep.models import load_causal_lm, load_teacher
from kdsweep.stages import distill as stage

TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
RUN = {"max_steps": 4, "eval_steps": 2, "logging_steps": 1}
ONE = {"training": {**RUN, "per_device_train_batch_size": 4}, "evaluate": {"batch_size": 4}}
TWO = {"training": {**RUN, "per_device_train_batch_size": 2}, "evaluate": {"batch_size": 4}}


@pytest.fixture
def perturbed(pipeline_copy) -> Path:
    student = load_causal_lm(pipeline_copy / "models/student_init")
    with torch.no_grad():
        student.lm_head.weight.mul_(3.0)
    student.save_pretrained(pipeline_copy / "models/student_init")
    return pipeline_copy


def one_process(root: Path, overrides: dict, resume: bool = False) -> dict:
    """distill in this process, outputs under ``root/one``."""
    params = validate(tiny_params_dict(**overrides))
    with chdir(root):
        return stage.main(
            params,
            out=Path("one/student"),
            metrics_path=Path("one/distill.json"),
            plots_dir=Path("one/plots"),
            run_dir=Path("one/runs"),
            checkpoint_dir=Path("one/checkpoints"),
            resume=resume,
        )


def launch(root: Path, overrides: dict, *args: str) -> subprocess.Popen:
    """``torchrun ... -m kdsweep.cli distill`` on 2 processes in ``root`` with these params."""
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(**overrides)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "-m", "kdsweep.cli", "distill", *args]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(root: Path, overrides: dict, *args: str) -> str:
    proc = launch(root, overrides, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def max_rel_diff(a: Path, b: Path) -> float:
    """Over the student's tensors, the largest max|a - b| / max|b|."""
    wa, wb = load_causal_lm(a).state_dict(), load_causal_lm(b).state_dict()
    assert wa.keys() == wb.keys()
    return max(((wa[k] - wb[k]).abs().max() / wb[k].abs().max()).item() for k in wa)


def csv_rows(path: Path) -> list[list[float]]:
    return [[float(x) for x in line.split(",")] for line in path.read_text().splitlines()[1:]]


def test_a_rank_reads_its_part_of_the_global_batch_and_the_parts_make_it_up():
    idx = np.array([3, 8, 9, 14, 20])
    parts = [part(idx, r, 2) for r in range(2)]
    assert np.concatenate([p for p, _ in parts]).tolist() == idx.tolist()
    assert [w for _, w in parts] == [1.0, 1.0]
    mine, weight = part(np.array([7]), 1, 2)  # fewer sequences than ranks: a stand-in of weight 0
    assert mine.tolist() == [7] and weight == 0.0


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(perturbed):
    one_process(perturbed, ONE)
    out = torchrun(perturbed, TWO)

    assert max_rel_diff(perturbed / "models/student", perturbed / "one/student") <= 1e-5
    two, one = (json.loads(p.read_text()) for p in (perturbed / "metrics/distill.json", perturbed / "one/distill.json"))
    for key in ("val_loss", "val_kl", "val_top1_agreement", "initial_val_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert two["steps"] == one["steps"] == 4
    # The logged losses are the global batch's, not one rank's half.
    for a, b in zip(csv_rows(perturbed / "plots/distill/train.csv"), csv_rows(perturbed / "one/plots/train.csv")):
        assert a[:4] == pytest.approx(b[:4], rel=1e-5)
    # Rank 0 alone reports: one line per step, one TensorBoard events file.
    assert out.count("Step 4: Total Loss") == 1
    assert len(list((perturbed / "runs/distill").glob("events.out.tfevents.*"))) == 1
    # No warning that tells the user nothing: no deprecated DDP argument, and no unused-parameter
    # search (every trainable parameter gets a gradient), whose warning says it found none.
    assert "FutureWarning" not in out and "find_unused_parameters" not in out, out[-4000:]


@pytest.mark.slow
def test_ddp_phases_that_freeze_and_unfreeze_equal_one_process_without_warnings(perturbed):
    # All parameters, then only the experts' (the rest frozen after DDP first ran), then all again.
    phases = [
        {**PHASE2, "max_steps": 2, "warmup_steps": 1},
        {**PHASE1, "max_steps": 2, "stage_name": "experts"},
        {**PHASE2, "max_steps": 2, "warmup_steps": 1, "stage_name": "all_again"},
    ]
    phased = {"stages": {"enabled": True, "configs": phases}, "training": {"eval_steps": 3, "logging_steps": 1}}
    one_process(perturbed, deep_merge(ONE, phased))
    out = torchrun(perturbed, deep_merge(TWO, phased))

    # fp32 sums in another order, over 6 steps at LR up to 0.01: 3.1e-5 measured; a phase whose
    # gradients were not reduced would step each rank on its own half of the batch, far further off.
    assert max_rel_diff(perturbed / "models/student", perturbed / "one/student") <= 1e-4
    two, one = (json.loads(p.read_text()) for p in (perturbed / "metrics/distill.json", perturbed / "one/distill.json"))
    assert two["steps"] == one["steps"] == 6
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert "FutureWarning" not in out and "find_unused_parameters" not in out, out[-4000:]


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process_and_saves_whole_tensors(perturbed):
    one_process(perturbed, ONE)
    torchrun(perturbed, {**TWO, "training": {**TWO["training"], "distributed": "fsdp"}})

    assert max_rel_diff(perturbed / "models/student", perturbed / "one/student") <= 1e-5
    # The checkpoint holds the whole optimizer state, in a one-process optimizer's layout.
    fsdp = torch.load(perturbed / "checkpoints/distill/last/optimizer.pt", weights_only=True)
    one = torch.load(perturbed / "one/checkpoints/last/optimizer.pt", weights_only=True)
    assert fsdp["state"].keys() == one["state"].keys()
    for i, s in one["state"].items():
        assert fsdp["state"][i]["exp_avg"].shape == s["exp_avg"].shape
        assert torch.allclose(fsdp["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and the workers it started (they run in sessions of their own)."""
    victims = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that ended on its own
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_to_the_uninterrupted_run(perturbed, tmp_path):
    long = {"training": {"max_steps": 30, "save_steps": 3, "eval_steps": 10, "logging_steps": 5}}
    long["training"]["per_device_train_batch_size"] = 2
    reference = tmp_path / "reference"
    shutil.copytree(perturbed, reference)
    torchrun(reference, long)

    proc = launch(perturbed, long)
    state = perturbed / "checkpoints/distill/last/trainer_state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_tree(proc)
    assert not (perturbed / "metrics/distill.json").exists(), "the run ended before it was killed"
    killed_at = json.loads(state.read_text())["global_step"]
    assert 3 <= killed_at < 30

    out = torchrun(perturbed, long, "--resume")
    assert f"resuming from checkpoints/distill/last at step {killed_at}" in out
    assert max_rel_diff(perturbed / "models/student", reference / "models/student") <= 1e-6
    assert json.loads((perturbed / "metrics/distill.json").read_text())["steps"] == 30


@pytest.mark.slow
def test_a_prune_decision_of_rank_0_stops_every_rank_at_the_same_step(perturbed, tmp_path):
    import optuna

    from kdsweep.optuna_io import open_storage

    url = f"journal:{tmp_path / 'study.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    # A finished trial far better at every step: the median pruner stops the next one at its first report.
    study.add_trial(
        optuna.trial.create_trial(
            value=0.0, intermediate_values=dict.fromkeys(range(1, 50), 0.0), params={}, distributions={}
        )
    )
    trial = study.ask()
    pruner = {"type": "median", "n_startup_trials": 0, "n_warmup_steps": 0, "interval_steps": 1}
    ctx = {"storage": url, "study": "s", "trial_id": trial._trial_id, "number": trial.number}
    ctx |= {"pruner": pruner, "metric": "val_loss"}
    os.environ["KDSWEEP_TRIAL"] = json.dumps(ctx)
    try:
        out = torchrun(perturbed, {"training": {**TWO["training"], "max_steps": 8}})
    finally:
        del os.environ["KDSWEEP_TRIAL"]

    metrics = json.loads((perturbed / "metrics/distill.json").read_text())
    assert metrics["state"] == "pruned" and metrics["steps"] == 2
    assert out.count("the pruner stops trial") == 1  # rank 0 alone reported
    reported = study.trials[trial.number].intermediate_values
    assert list(reported) == [2]


def test_device_map_auto_loads_the_teacher_with_the_logits_of_a_plain_load(tiny_pipeline):
    params = validate(tiny_params_dict(teacher={"device_map": "auto", "dtype": "float32"}))
    device = torch.device("cpu")
    spread = load_teacher(tiny_pipeline / "models/teacher", params.teacher, device)
    plain = load_teacher(
        tiny_pipeline / "models/teacher", params.teacher.model_copy(update={"device_map": None}), device
    )
    # On a machine without GPUs Accelerate's map puts every module on the CPU; with several GPUs it spreads them.
    assert {p.device.type for p in spread.parameters()} == {"cpu"}
    assert not spread.training and not any(p.requires_grad for p in spread.parameters())
    ids = torch.as_tensor(np.load(tiny_pipeline / "data/prepared/validation.npy")[:4], dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(spread(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_ranks_other_than_0_have_no_trial_hook(monkeypatch):
    from kdsweep.trial_hook import eval_hook

    monkeypatch.setenv("RANK", "1")
    assert eval_hook(json.dumps({"storage": "journal:/nonexistent/never-opened", "study": "s"})) is None


def test_resume_after_a_kill_before_the_first_log_flush(pipeline_copy):
    # SIGKILL after a checkpoint but before the first logging step leaves an empty train.csv.
    run = {"training": {"max_steps": 4, "save_steps": 2, "logging_steps": 4, "eval_steps": 4}}
    one_process(pipeline_copy, run)
    (pipeline_copy / "one/plots/train.csv").write_text("")
    one_process(pipeline_copy, run, resume=True)
    assert (pipeline_copy / "one/plots/train.csv").read_text().startswith("step,loss")
