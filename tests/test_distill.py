"""The distillation trainer (kdsweep.stages.distill) on the tiny pipeline: real models, cache and files.

Phase layouts (params.yaml's `stages`), resume inside a phase, the live teacher, gradient checkpointing, bf16,
dataloader workers, non-finite losses, HParams and the reference's starting point.
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import chdir
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, TINY, deep_merge, tiny_params_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.compress import load_student
from kdsweep.config import validate
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.losses import LossSpec, student_loss
from kdsweep.models import load_teacher, resolve_dtype
from kdsweep.schedule import lr_factor
from kdsweep.teacher_targets import batch_to_tensors, cached_teacher_fn

CORE = r".*shared_core.*|.*wrapper.*"
PHASE1 = {
    "stage_name": "experts",
    "max_steps": 3,
    "learning_rate": 0.01,
    "warmup_steps": 1,
    "alpha": 0.9,
    "temperature": 1.5,
    "parameter_lr_multipliers": [{"pattern": CORE, "lr_multiplier": 1.0}, {"pattern": ".*", "lr_multiplier": 0.0}],
}
PHASE2 = {
    "stage_name": "full",
    "max_steps": 4,
    "learning_rate": 0.002,
    "warmup_steps": 2,
    "alpha": 0.2,
    "temperature": 3.0,
    "parameter_lr_multipliers": [{"pattern": ".*", "lr_multiplier": 1.0}],
}
TWO_PHASES = {
    "stages": {"enabled": True, "configs": [PHASE1, PHASE2]},
    "training": {"logging_steps": 1, "eval_steps": 1, "eval_max_batches": 1},
}


def distill(root: Path, overrides: dict | None = None, **kwargs) -> dict:
    from kdsweep.stages import distill as stage

    params = validate(tiny_params_dict(**(overrides or {})))
    with chdir(root):
        return stage.main(params, run_dir=kwargs.pop("run_dir", root / "runs/distill"), **kwargs)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_student(path).state_dict().items()}


def rows(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture
def perturbed_copy(pipeline_copy) -> Path:
    """The tiny pipeline with the student pushed away from the teacher (the fitted tiny student
    is almost the teacher, KL ~ 1e-7), so that the KD term weighs in the checks (KL ~ 0.2)."""
    student = load_student(pipeline_copy / "models/student_init")
    with torch.no_grad():
        student.lm_head.weight.mul_(3.0)
    student.save_pretrained(pipeline_copy / "models/student_init")
    return pipeline_copy


def crash_at(step_to_crash: int):
    def hook(step, _metrics):
        if step == step_to_crash:
            raise KeyboardInterrupt  # the process dies here, before any checkpoint of this step
        return False

    return hook


# --------------------------------------------------------------------------- phase layouts and resume
def test_phase1_freezes_bit_identically_then_phase2_trains_everything(pipeline_copy, tmp_path):
    init = weights(pipeline_copy / "models/student_init")
    core = {n for n in init if "shared_core" in n or "wrapper" in n}
    assert core and len(core) < len(init)

    # Crash right after phase 1 (3 steps) with a checkpoint at its end.
    with pytest.raises(KeyboardInterrupt):
        distill(
            pipeline_copy,
            deep_merge(TWO_PHASES, {"training": {"save_steps": 3}}),
            eval_hook=crash_at(4),
            run_dir=tmp_path / "crashed",
        )
    state = json.loads((pipeline_copy / "checkpoints/distill/last/trainer_state.json").read_text())
    assert (state["global_step"], state["phase_index"], state["step_in_phase"]) == (3, 0, 3)
    after_phase1 = weights(pipeline_copy / "checkpoints/distill/last/model")
    for name, value in init.items():
        if name in core:
            assert not torch.equal(value, after_phase1[name]), f"{name} did not train in phase 1"
        else:
            assert torch.equal(value, after_phase1[name]), f"{name} changed while frozen"

    metrics = distill(pipeline_copy, TWO_PHASES)
    assert metrics["state"] == "complete" and metrics["steps"] == 7
    final = weights(pipeline_copy / "models/student")
    unfrozen = [n for n in init if n not in core and not torch.equal(init[n], final[n])]
    assert len(unfrozen) == len(init) - len(core), "phase 2 must train the parameters phase 1 froze"


def test_each_phase_rebuilds_optimizer_schedule_alpha_and_temperature(perturbed_copy):
    distill(perturbed_copy, TWO_PHASES)
    run = perturbed_copy / "runs/distill"
    core_lr, all_lr = scalars(run, f"lr/{CORE}"), scalars(run, "lr/.*")
    assert sorted(core_lr) == [1, 2, 3] and sorted(all_lr) == [4, 5, 6, 7]  # frozen groups have no LR
    for step, lr in core_lr.items():
        assert lr == pytest.approx(
            0.01 * lr_factor(step - 1, warmup_steps=1, total_steps=3, kind="cosine", min_ratio=0.1)
        )
    # Phase 2 warms up again from its own first step.
    assert all_lr[4] == pytest.approx(0.002 / 2) and all_lr[5] == pytest.approx(0.002)
    assert all_lr[7] == pytest.approx(0.002 * lr_factor(3, warmup_steps=2, total_steps=4, kind="cosine", min_ratio=0.1))
    # Every logged total is (1 - alpha) * CE + alpha * T^2 * KL with that phase's alpha and T.
    for row in rows(perturbed_copy / "plots/distill/train.csv"):
        alpha, t = (0.9, 1.5) if row["step"] <= 3 else (0.2, 3.0)
        assert row["kl"] > 0.01
        assert row["loss"] == pytest.approx((1 - alpha) * row["ce"] + alpha * t**2 * row["kl"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("checkpoint_step", [3, 5])  # 3: the phase boundary; 5: inside phase 2
def test_resume_in_a_two_phase_run_equals_an_uninterrupted_run(perturbed_copy, tmp_path, checkpoint_step):
    pipeline_copy = perturbed_copy
    distill(pipeline_copy, TWO_PHASES, run_dir=tmp_path / "whole")
    uninterrupted = weights(pipeline_copy / "models/student")

    with_saves = deep_merge(TWO_PHASES, {"training": {"save_steps": checkpoint_step}})
    with pytest.raises(KeyboardInterrupt):
        distill(pipeline_copy, with_saves, eval_hook=crash_at(checkpoint_step + 1), run_dir=tmp_path / "tb")
    state = json.loads((pipeline_copy / "checkpoints/distill/last/trainer_state.json").read_text())
    assert state["global_step"] == checkpoint_step
    metrics = distill(pipeline_copy, with_saves, resume=True, run_dir=tmp_path / "tb")
    assert metrics["state"] == "complete" and metrics["steps"] == 7
    resumed = weights(pipeline_copy / "models/student")
    for name, value in uninterrupted.items():
        assert torch.allclose(value, resumed[name], atol=1e-6, rtol=0), name
    # The crashed run's rows after the checkpoint were dropped: each step appears once.
    steps = [int(r["step"]) for r in rows(pipeline_copy / "plots/distill/train.csv")]
    assert steps == list(range(1, 8))
    assert sorted(scalars(tmp_path / "tb", "train/loss")) == list(range(1, 8))


def test_a_checkpoint_with_the_older_stage_keys_resumes_exactly(perturbed_copy, tmp_path):
    """Older checkpoints name the phase keys stage_index / step_in_stage / stage_name."""
    distill(perturbed_copy, TWO_PHASES, run_dir=tmp_path / "whole")
    uninterrupted = weights(perturbed_copy / "models/student")
    with_saves = deep_merge(TWO_PHASES, {"training": {"save_steps": 5}})
    with pytest.raises(KeyboardInterrupt):
        distill(perturbed_copy, with_saves, eval_hook=crash_at(6), run_dir=tmp_path / "tb")
    saved = perturbed_copy / "checkpoints/distill/last/trainer_state.json"
    older = {"phase_index": "stage_index", "step_in_phase": "step_in_stage", "phase_name": "stage_name"}
    state = {older.get(k, k): v for k, v in json.loads(saved.read_text()).items()}
    assert (state["stage_index"], state["step_in_stage"], state["stage_name"]) == (1, 2, "full")
    saved.write_text(json.dumps(state))

    metrics = distill(perturbed_copy, with_saves, resume=True, run_dir=tmp_path / "tb")
    assert metrics["state"] == "complete" and metrics["steps"] == 7
    for name, value in weights(perturbed_copy / "models/student").items():
        assert torch.allclose(value, uninterrupted[name], atol=1e-6, rtol=0), name


def test_final_checkpoint_holds_model_optimizer_rng_state_and_config(pipeline_copy):
    distill(pipeline_copy)
    last = pipeline_copy / "checkpoints/distill/last"
    assert list((last / "model").glob("*.safetensors"))
    assert (last / "optimizer.pt").is_file() and (last / "rng.pt").is_file()
    again = distill(pipeline_copy, resume=True)
    assert again["state"] == "complete" and again["steps"] == 6
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["status"] == "complete"
    saved = yaml.safe_load((last / "params.yaml").read_text())
    assert validate(saved) == validate(tiny_params_dict())
    final = weights(pipeline_copy / "models/student")
    for name, value in weights(last / "model").items():
        assert torch.equal(value, final[name]), name


def test_default_lr_multiplier_zero_freezes_unmatched_parameters(pipeline_copy):
    init = weights(pipeline_copy / "models/student_init")
    distill(
        pipeline_copy,
        {
            "training": {"default_lr_multiplier": 0.0, "max_steps": 2},
            "parameter_lr_multipliers": [{"pattern": ".*shared_core.*", "lr_multiplier": 1.0}],
        },
    )
    final = weights(pipeline_copy / "models/student")
    for name, value in init.items():
        assert torch.equal(value, final[name]) is ("shared_core" not in name), name


def test_lr_group_table_is_printed_and_logged(pipeline_copy, capsys):
    distill(pipeline_copy, {"training": {"max_steps": 1}})
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "pattern" in text and "tensors" in text and ".*shared_core.*" in text
    assert "phase 1/1 'train': 1 steps" in text
    acc = EventAccumulator(str(pipeline_copy / "runs/distill"))
    acc.Reload()
    (tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("param_groups/train")]
    logged = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    assert ".*shared_core.*" in logged and "parameters" in logged


# --------------------------------------------------------------------------- the live teacher
@pytest.mark.parametrize(
    "mode,direction", [("dense", "forward"), ("topk_tail", "forward"), ("dense", "jsd"), ("topk_tail", "reverse")]
)
def test_live_teacher_end_to_end(pipeline_copy, mode, direction):
    metrics = distill(
        pipeline_copy,
        {
            "teacher": {"use_cached_logits": False},
            "loss": {"mode": mode, "direction": direction},
            "training": {"max_steps": 3, "eval_steps": 3},
        },
    )
    assert metrics["state"] == "complete" and metrics["steps"] == 3
    assert all(math.isfinite(metrics[k]) for k in ("val_loss", "val_kl", "val_top1_agreement"))
    for row in rows(pipeline_copy / "plots/distill/train.csv"):
        assert math.isfinite(row["loss"]) and row["kl"] >= 0


def test_auto_teacher_dtype_is_the_same_for_the_live_teacher_and_the_cache(tiny_pipeline):
    """`teacher.dtype: auto` is float32 on a CPU on every path: the live teacher of distill
    (it used to run in bfloat16 there) and the teacher that writes the cache."""
    from kdsweep.stages.distill import TeacherSource

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    params = validate(tiny_params_dict(teacher={"use_cached_logits": False}))
    live = TeacherSource(
        params,
        load_prepared(tiny_pipeline / "data/prepared"),
        tiny_pipeline / "models/teacher",
        tiny_pipeline / "data/teacher_logits",
        cpu,
    ).model
    cache_writer = load_teacher(tiny_pipeline / "models/teacher", params.teacher, cpu)
    assert {p.dtype for p in live.parameters()} == {p.dtype for p in cache_writer.parameters()} == {torch.float32}


def test_live_teacher_runs_in_its_dtype_eval_and_frozen(tiny_pipeline):
    params = validate(tiny_params_dict(teacher={"use_cached_logits": False, "dtype": "bfloat16"}))
    teacher = load_teacher(tiny_pipeline / "models/teacher", params.teacher, torch.device("cpu"))
    assert not teacher.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())


def test_live_topk_tail_gives_the_cached_loss(perturbed_copy):
    """Same loss path: an fp32 live teacher with the cache's k reproduces the cached first step
    (up to the cache's float16 logits and its interpolated normaliser at T = 2)."""
    one_step = {"training": {"max_steps": 1, "logging_steps": 1, "eval_steps": 1}}
    distill(perturbed_copy, one_step)
    (cached,) = rows(perturbed_copy / "plots/distill/train.csv")
    distill(perturbed_copy, deep_merge(one_step, {"teacher": {"use_cached_logits": False, "dtype": "float32"}}))
    (live,) = rows(perturbed_copy / "plots/distill/train.csv")
    assert cached["kl"] > 0.01
    assert live["ce"] == pytest.approx(cached["ce"], abs=1e-6)
    assert live["kl"] == pytest.approx(cached["kl"], rel=2e-3, abs=1e-4)
    assert live["loss"] == pytest.approx(cached["loss"], rel=1e-3)


# --------------------------------------------------------------------------- the loop
def _batch(root: Path, indices: list[int]):
    cache = TeacherLogitCache(root / "data/teacher_logits/train.h5")
    return batch_to_tensors(cache.read(indices), torch.device("cpu")), cache.betas


def test_gradient_checkpointing_takes_effect_and_gives_the_same_loss(tiny_pipeline):
    from kdsweep.stages.distill import enable_gradient_checkpointing

    torch.manual_seed(0)
    student = load_student(tiny_pipeline / "models/student_init").train()
    # Frozen embeddings: the inputs of the first checkpointed layer do not require grad,
    # where a reentrant checkpoint would silently give the layers no gradient.
    student.get_input_embeddings().weight.requires_grad_(False)
    batch, betas = _batch(tiny_pipeline, [0, 1, 2, 3])
    spec = LossSpec(alpha=0.5, temperature=2.0, chunk_size=40)
    n_tokens = batch["input_ids"][:, 1:].numel()

    def step():
        calls = []
        # A pre-hook: torch stops a recompute early, once the tensors backward needs exist again.
        hook = student.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
        student.zero_grad(set_to_none=True)
        out = student_loss(student, batch["input_ids"], cached_teacher_fn(batch, betas, 2.0), spec)
        out.total(n_tokens).backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
        return out.total(n_tokens).detach(), grads, len(calls)

    loss_plain, grads_plain, calls_plain = step()
    enable_gradient_checkpointing(student)
    loss_ckpt, grads_ckpt, calls_ckpt = step()
    assert (calls_plain, calls_ckpt) == (1, 2)  # the layer ran again in backward
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5)
    assert grads_ckpt["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_gradient_checkpointing_run_matches_a_plain_run(pipeline_copy):
    distill(pipeline_copy, {"training": {"max_steps": 2}})
    plain = weights(pipeline_copy / "models/student")
    distill(pipeline_copy, {"training": {"max_steps": 2, "gradient_checkpointing": True}})
    for name, value in weights(pipeline_copy / "models/student").items():
        torch.testing.assert_close(value, plain[name], atol=1e-5, rtol=0)


def test_a_dataloader_worker_reads_the_cache_and_gives_the_same_run(pipeline_copy):
    distill(pipeline_copy, {"training": {"max_steps": 3}})
    in_process = weights(pipeline_copy / "models/student")
    metrics = distill(pipeline_copy, {"training": {"max_steps": 3, "dataloader_num_workers": 1}})
    assert metrics["state"] == "complete"
    for name, value in weights(pipeline_copy / "models/student").items():
        assert torch.equal(value, in_process[name]), name


def test_gradient_accumulation_equals_one_big_batch(pipeline_copy):
    """4 x 2 accumulated = 8 at once: same batchmean loss, same update (fp32, within rounding)."""
    distill(pipeline_copy, {"training": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1}})
    big, big_rows = weights(pipeline_copy / "models/student"), rows(pipeline_copy / "plots/distill/train.csv")
    distill(
        pipeline_copy,
        {
            "training": {
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "logging_steps": 1,
            }
        },
    )
    acc_rows = rows(pipeline_copy / "plots/distill/train.csv")
    for a, b in zip(big_rows, acc_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, value in weights(pipeline_copy / "models/student").items():
        torch.testing.assert_close(value, big[name], atol=1e-5, rtol=0)


def test_bf16_autocast_keeps_fp32_master_weights(pipeline_copy):
    distill(pipeline_copy, {"training": {"max_steps": 2, "logging_steps": 1}})
    fp32_rows = rows(pipeline_copy / "plots/distill/train.csv")
    metrics = distill(pipeline_copy, {"training": {"max_steps": 2, "logging_steps": 1, "bf16": True}})
    assert metrics["state"] == "complete" and math.isfinite(metrics["val_loss"])
    bf16_rows = rows(pipeline_copy / "plots/distill/train.csv")
    assert bf16_rows[0]["loss"] != fp32_rows[0]["loss"]  # autocast did run in bf16
    assert bf16_rows[0]["loss"] == pytest.approx(fp32_rows[0]["loss"], rel=2e-2)
    student = load_student(pipeline_copy / "models/student")
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_deterministic_mode_runs_and_is_restored_after(pipeline_copy):
    before = torch.are_deterministic_algorithms_enabled()
    distill(pipeline_copy, {"training": {"max_steps": 1, "deterministic": True}})
    first = weights(pipeline_copy / "models/student")
    distill(pipeline_copy, {"training": {"max_steps": 1, "deterministic": True}})
    for name, value in weights(pipeline_copy / "models/student").items():
        assert torch.equal(value, first[name]), name
    assert torch.are_deterministic_algorithms_enabled() == before


# --------------------------------------------------------------------------- non-finite losses
def test_nan_weights_stop_the_run_with_a_state_the_sweep_can_read(pipeline_copy):
    student = load_student(pipeline_copy / "models/student_init")
    with torch.no_grad():
        student.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    student.save_pretrained(pipeline_copy / "models/student_init")
    before = weights(pipeline_copy / "models/student_init")

    with pytest.raises(UserError, match="non-finite") as info:
        distill(pipeline_copy, {"training": {"max_steps": 10, "max_nonfinite_steps": 3}})
    assert "training.learning_rate" in str(info.value)
    metrics = json.loads((pipeline_copy / "metrics/distill.json").read_text())  # strict JSON: NaN is null
    assert metrics["state"] == "stopped_nonfinite"
    assert metrics["steps"] == 3 and metrics["nonfinite_steps"] == 3
    assert metrics["val_loss"] is None and metrics["best_val_loss"] is None
    for name, value in weights(pipeline_copy / "models/student").items():  # skipped steps change nothing
        assert torch.equal(value.nan_to_num(7.0), before[name].nan_to_num(7.0)), name


def test_a_learning_rate_that_blows_up_is_skipped_counted_then_stopped(pipeline_copy):
    with pytest.raises(UserError, match="stopped after 2 non-finite"):
        distill(
            pipeline_copy,
            {
                "training": {
                    "max_steps": 20,
                    "max_nonfinite_steps": 2,
                    "learning_rate": 1e30,
                    "warmup_steps": 0,
                    "max_grad_norm": None,
                }
            },
        )
    metrics = json.loads((pipeline_copy / "metrics/distill.json").read_text())
    assert metrics["state"] == "stopped_nonfinite" and metrics["nonfinite_steps"] == 2
    assert metrics["steps"] > 2  # the first step was finite and taken; it blew the weights up


# --------------------------------------------------------------------------- observability
def test_hparams_include_the_keys_a_sweep_names(pipeline_copy):
    """A sweep names its keys through $KDSWEEP_HPARAM_KEYS, the envvar of `kdsweep distill --hparam-keys`."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from typer.testing import CliRunner

    from kdsweep.cli import app
    from kdsweep.stages.distill import hparams_of

    keys = "training.warmup_steps, parameter_lr_multipliers.1.lr_multiplier,stages.configs,loss.nope"
    params = validate(tiny_params_dict())
    hp = hparams_of(params, keys.split(","))
    assert hp["training.warmup_steps"] == 1 and hp["parameter_lr_multipliers.1.lr_multiplier"] == 1.0
    assert hp["stages.configs"] == "[]" and "loss.nope" not in hp

    (pipeline_copy / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(training={"max_steps": 1})))
    with chdir(pipeline_copy):
        result = CliRunner().invoke(app, ["distill"], env={"KDSWEEP_HPARAM_KEYS": keys})
    assert result.exit_code == 0, result.output
    acc = EventAccumulator(str(pipeline_copy / "runs/distill"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["training.warmup_steps"].number_value == 1
    assert info.hparams["parameter_lr_multipliers.1.lr_multiplier"].number_value == 1.0
    assert info.hparams["loss.alpha"].number_value == 0.5


def test_console_reports_the_reference_loss_line(pipeline_copy, capsys):
    distill(pipeline_copy, {"training": {"max_steps": 2, "logging_steps": 1}})
    text = capsys.readouterr()
    lines = [line for line in (text.out + text.err).splitlines() if line.startswith("Step 2: Total Loss:")]
    assert len(lines) == 1 and ", CE Loss: " in lines[0] and ", KL Loss: " in lines[0]


# --------------------------------------------------------------------------- the reference's starting point
REFERENCE = REPO / "docs/examples/reference-starting-point.params.yaml"


def _reference_on_tiny(**overrides) -> dict:
    """The shipped reference file, with the tiny pipeline's data/teacher/cache shape and few steps."""
    ref = yaml.safe_load(REFERENCE.read_text())
    tiny = {k: TINY[k] for k in ("dataset", "tokenizer", "teacher", "student")}  # the cache's shape (top_k 16)
    return deep_merge(deep_merge(ref, tiny), {"training": {"max_steps": 2, "eval_steps": 2}, **overrides})


def test_reference_starting_point_file_has_the_reference_values():
    p = validate(yaml.safe_load(REFERENCE.read_text()))
    assert p.teacher.use_cached_logits and p.teacher.top_k == 64
    assert (p.loss.alpha, p.loss.temperature, p.loss.kl_reduction) == (0.5, 2.0, "batchmean")
    tr = p.training
    assert (
        tr.num_train_epochs,
        tr.per_device_train_batch_size,
        tr.gradient_accumulation_steps,
        tr.learning_rate,
        tr.warmup_steps,
    ) == (3, 2, 8, 5e-5, 100)
    assert [(r.pattern, r.lr_multiplier) for r in p.parameter_lr_multipliers] == [
        (".*shared_core.*", 1.0),
        (".*wrapper.*", 1.0),
        (".*embed_tokens.*|.*lm_head.*", 0.1),
        (".*norm.*", 0.5),
    ]


def test_reference_starting_point_trains_the_compressed_student(pipeline_copy):
    params = validate(_reference_on_tiny())
    from kdsweep.stages import distill as stage

    with chdir(pipeline_copy):
        metrics = stage.main(params, run_dir=pipeline_copy / "runs/ref")
    assert metrics["state"] == "complete" and metrics["steps"] == 2


def test_reference_starting_point_stops_before_training_a_student_without_shared_core(pipeline_copy):
    from kdsweep.stages import distill as stage
    from kdsweep.stages import student

    copy_student = validate(tiny_params_dict(student={"kind": "copy"}))
    with chdir(pipeline_copy):
        student.main(copy_student)
    names = [n for n, _ in load_student(pipeline_copy / "models/student_init").named_parameters()]
    assert not any("shared_core" in n or "wrapper" in n for n in names)

    params = validate(_reference_on_tiny(student={"kind": "copy"}))
    with chdir(pipeline_copy), pytest.raises(UserError) as info:
        stage.main(params, run_dir=pipeline_copy / "runs/ref")
    msg = str(info.value)
    assert "parameter_lr_multipliers.0.pattern: '.*shared_core.*' matches no parameter" in msg
    assert "parameter_lr_multipliers.1.pattern: '.*wrapper.*' matches no parameter" in msg
    # Nothing ran: no evaluation, no TensorBoard run, no student, no metrics.
    assert not (pipeline_copy / "runs/ref").exists() and not (pipeline_copy / "models/student").exists()
    assert not (pipeline_copy / "metrics/distill.json").exists()


# --------------------------------------------------------------------------- data per run
def test_train_sequences_trains_on_a_prefix_of_the_split_for_epochs_of_its_size(pipeline_copy):
    """training.train_sequences N: every micro-batch comes from the split's first N sequences (read
    at their own cache rows), an epoch is N sequences, and N = the whole split is the plain run."""
    from kdsweep.stages.distill import MicroBatches, training_sequences

    train = load_prepared(pipeline_copy / "data/prepared").train
    n = 6
    prefix = training_sequences(train, n)
    assert len(prefix) == n and (prefix == train[:n]).all()
    batches = MicroBatches(prefix, None, 4, seed=0)
    assert batches.per_epoch == 2
    seen = [batches.indices(m) for m in range(6)]  # three epochs of 6 sequences in batches of 4
    assert sorted(int(i) for batch in seen[:2] for i in batch) == list(range(n))
    assert max(int(i) for batch in seen for i in batch) < n

    metrics = distill(pipeline_copy, {"training": {"max_steps": None, "num_train_epochs": 3, "train_sequences": n}})
    assert metrics["state"] == "complete" and metrics["steps"] == 6
    distill(pipeline_copy, {"training": {"max_steps": 2, "train_sequences": len(train)}})
    whole = weights(pipeline_copy / "models/student")
    distill(pipeline_copy, {"training": {"max_steps": 2}})
    for name, value in weights(pipeline_copy / "models/student").items():
        assert torch.equal(value, whole[name]), name


def test_train_sequences_past_the_split_is_a_user_error_naming_the_key(pipeline_copy):
    train = load_prepared(pipeline_copy / "data/prepared").train
    with pytest.raises(UserError, match=rf"training.train_sequences is {len(train) + 1}.*at most {len(train)}"):
        distill(pipeline_copy, {"training": {"max_steps": 1, "train_sequences": len(train) + 1}})
