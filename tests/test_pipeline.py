"""Every stage end to end on the tiny config: real files, real models, real TensorBoard events."""

from __future__ import annotations

import json
from contextlib import chdir

import numpy as np
import pytest
import torch
from helpers import tiny_params_dict, tiny_qwen3_moe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdsweep.cache.format import log_normalizer
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.compress import load_student
from kdsweep.config import validate
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.models import load_causal_lm


def test_prepare_writes_packed_sequences_and_tokenizer(tiny_pipeline):
    from transformers import AutoTokenizer

    data = load_prepared(tiny_pipeline / "data/prepared")
    assert data.train.shape[1] == data.validation.shape[1] == data.test.shape[1] == 32
    assert data.train.dtype == np.int32 and len(data.train) > 8 and len(data.validation) >= 1 and len(data.test) >= 1
    tok = AutoTokenizer.from_pretrained(tiny_pipeline / "data/prepared/tokenizer")
    assert len(tok) == data.meta["tokenizer"]["vocab_size"] == 320
    assert data.train.max() < len(tok)
    assert tok.eos_token_id in data.train  # documents are separated by EOS


def test_teacher_is_a_loadable_qwen3_moe(tiny_pipeline):
    teacher = load_causal_lm(tiny_pipeline / "models/teacher")
    assert teacher.config.model_type == "qwen3_moe"
    metrics = json.loads((tiny_pipeline / "metrics/teacher.json").read_text())
    assert np.isfinite(metrics["val_loss"])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_cache_probabilities_match_a_full_teacher_forward(tiny_pipeline, temperature):
    """Top-k probabilities and tail mass read from the cache equal a fresh forward's (fp16 values)."""
    teacher = load_causal_lm(tiny_pipeline / "models/teacher").eval()
    cache = TeacherLogitCache(tiny_pipeline / "data/teacher_logits/validation.h5")
    batch = cache.read([0, 1])
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    with torch.no_grad():
        full = torch.softmax(teacher(input_ids=ids).logits.float() / temperature, dim=-1)
    top_ids = torch.as_tensor(batch["topk_ids"].astype(np.int64))
    lse = log_normalizer(
        torch.as_tensor(batch["log_normalizer"]),
        torch.as_tensor(batch["log_normalizer_slope"]),
        cache.betas,
        1 / temperature,
    )
    p_cache = torch.exp(torch.as_tensor(batch["topk_logits"]).float() / temperature - lse[..., None])
    p_true = full.gather(-1, top_ids)
    assert (p_cache - p_true).abs().max() < 1e-3
    tail_cache, tail_true = 1 - p_cache.sum(-1), 1 - p_true.sum(-1)
    assert (tail_cache - tail_true).abs().max() < 1e-3
    assert torch.equal(top_ids, full.topk(cache.top_k, dim=-1).indices.sort(-1).values)


def test_cache_position_t_predicts_token_t_plus_1(tiny_pipeline):
    """The cache at position t equals the teacher's output after reading tokens 0..t only."""
    teacher = load_causal_lm(tiny_pipeline / "models/teacher").eval()
    cache = TeacherLogitCache(tiny_pipeline / "data/teacher_logits/train.h5")
    batch = cache.read([3])
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    for t in (0, 5, ids.shape[1] - 1):
        with torch.no_grad():
            last = teacher(input_ids=ids[:, : t + 1]).logits[0, -1]
        expected = last.topk(cache.top_k).indices.sort().values
        assert torch.equal(torch.as_tensor(batch["topk_ids"][0, t].astype(np.int64)), expected)
    assert np.array_equal(batch["input_ids"], load_prepared(tiny_pipeline / "data/prepared").train[[3]])


def test_student_is_compressed_and_reported(tiny_pipeline):
    metrics = json.loads((tiny_pipeline / "metrics/student.json").read_text())
    assert metrics["student"]["total"] < metrics["teacher"]["total"]
    assert metrics["expert_parameter_ratio"] <= 0.5
    student = load_student(tiny_pipeline / "models/student_init")
    names = [n for n, _ in student.named_parameters()]
    assert any("shared_core" in n for n in names) and any("wrapper" in n for n in names)


def _distill(root, **overrides):
    from kdsweep.stages import distill

    params = validate(tiny_params_dict(**overrides))
    with chdir(root):
        return distill.main(params, run_dir=root / "runs/distill")


def test_distill_writes_student_metrics_plots_and_tensorboard(pipeline_copy):
    metrics = _distill(pipeline_copy)
    assert metrics["state"] == "complete" and metrics["steps"] == 6
    assert json.loads((pipeline_copy / "metrics/distill.json").read_text()) == metrics
    student = load_student(pipeline_copy / "models/student")
    assert student.config.model_type == "kdsweep_compressed_moe"
    train_csv = (pipeline_copy / "plots/distill/train.csv").read_text().splitlines()
    assert train_csv[0] == "step,loss,ce,kl,grad_norm,tokens_per_s" and len(train_csv) == 4
    acc = EventAccumulator(str(pipeline_copy / "runs/distill"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/ce",
        "train/kl",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/memory_mb",
        "eval/val_loss",
        "eval/val_kl",
        "eval/val_top1_agreement",
        "lr/.*shared_core.*",
    ):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [0, 3, 6]


def test_evaluate_reports_before_and_after(pipeline_copy):
    from kdsweep.stages import evaluate

    _distill(pipeline_copy)
    with chdir(pipeline_copy):
        metrics = evaluate.main(validate(tiny_params_dict()))
    for key in ("val_loss", "val_perplexity", "val_kl", "val_top1_agreement"):
        assert np.isfinite(metrics[key]) and np.isfinite(metrics["initial"][key])
    for key in ("test_ce", "test_perplexity", "test_kl", "test_top1_agreement"):
        assert np.isfinite(metrics[key]) and np.isfinite(metrics["initial"][key])
    assert metrics["val_perplexity"] == pytest.approx(np.exp(metrics["val_loss"]))
    assert metrics["test_perplexity"] == pytest.approx(np.exp(metrics["test_ce"]))


def test_resume_continues_exactly(pipeline_copy, tmp_path):
    """Interrupted after step 6 with a checkpoint at step 3, resumed: same weights as one run."""
    from kdsweep.stages import distill

    _distill(pipeline_copy)
    uninterrupted = load_student(pipeline_copy / "models/student").state_dict()

    params = validate(tiny_params_dict(training={"save_steps": 3}))

    def crash(step, _metrics):
        if step == 6:
            raise KeyboardInterrupt  # the process dies after step 6, before any save at 6
        return False

    with chdir(pipeline_copy):
        with pytest.raises(KeyboardInterrupt):
            distill.main(params, run_dir=tmp_path / "tb", eval_hook=crash)
        assert (
            json.loads((pipeline_copy / "checkpoints/distill/last/trainer_state.json").read_text())["global_step"] == 3
        )
        resumed_metrics = distill.main(params, run_dir=tmp_path / "tb", resume=True)
    assert resumed_metrics["steps"] == 6
    resumed = load_student(pipeline_copy / "models/student").state_dict()
    for name, value in uninterrupted.items():
        assert torch.allclose(value, resumed[name], atol=1e-6, rtol=0), name


def test_distill_refuses_a_cache_made_with_another_max_length(pipeline_copy):
    with pytest.raises(UserError, match="max_length"):
        _distill(pipeline_copy, dataset={"max_length": 64})


def test_reference_pattern_that_matches_nothing_stops_before_training(pipeline_copy):
    rules = [{"pattern": r".*layer\.0\..*", "lr_multiplier": 1.0}]
    with pytest.raises(UserError, match=r"layer\\\\\.0|layers"):
        _distill(pipeline_copy, parameter_lr_multipliers=rules)


def test_hugging_face_dataset_tokenizer_and_model_saved_locally(tmp_path):
    """The hub code path (load_dataset / from_pretrained) on artefacts saved with save_pretrained."""
    import datasets

    from kdsweep.config import TokenizerConfig
    from kdsweep.data import builtin_documents, train_bpe_tokenizer
    from kdsweep.stages import distill, prepare, student, teacher, teacher_logits

    docs = builtin_documents()[:20]
    datasets.Dataset.from_dict({"body": docs, "id": list(range(len(docs)))}).save_to_disk(tmp_path / "hf_dataset")
    tok = train_bpe_tokenizer(docs, TokenizerConfig(vocab_size=300), 32)
    model = tiny_qwen3_moe(len(tok))
    model.save_pretrained(tmp_path / "hf_model")
    tok.save_pretrained(tmp_path / "hf_model")

    params = validate(
        tiny_params_dict(
            dataset={"source": "hf", "name": str(tmp_path / "hf_dataset"), "text_column": "body"},
            teacher={"model": str(tmp_path / "hf_model")},
            training={"max_steps": 2, "eval_steps": 2},
        )
    )
    root = tmp_path / "run"
    root.mkdir()
    with chdir(root):
        meta = prepare.main(params)
        assert meta["tokenizer"]["from"] == str(tmp_path / "hf_model")
        assert meta["dataset"]["name"] == str(tmp_path / "hf_dataset")
        teacher.main(params)
        assert json.loads((root / "models/teacher/teacher.json").read_text())["model"] == str(tmp_path / "hf_model")
        teacher_logits.main(params)
        student.main(params)
        assert distill.main(params, run_dir=root / "tb")["state"] == "complete"


def test_hf_dataset_with_a_bad_column_names_the_key(tmp_path):
    import datasets

    from kdsweep.data import load_corpus

    datasets.Dataset.from_dict({"body": ["a b c"] * 4}).save_to_disk(tmp_path / "ds")
    cfg = validate({"dataset": {"source": "hf", "name": str(tmp_path / "ds")}}).dataset
    with pytest.raises(UserError, match="dataset.text_column"):
        load_corpus(cfg)
