"""The held-out test split: disjoint by document, validated, cached, read by evaluate and by nothing else."""

from __future__ import annotations

import json
import shutil
from contextlib import chdir

import numpy as np
import pytest
from helpers import tiny_params_dict

from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.config import validate
from kdsweep.data import builtin_documents, load_corpus, load_prepared, load_tokenizer, pack
from kdsweep.errors import UserError


def test_three_splits_are_disjoint_by_document_and_cover_the_corpus():
    docs = builtin_documents()
    distinct = len(set(docs))
    assert distinct < len(docs)  # two topics share one text: copies must not straddle splits
    corpus = load_corpus(validate({"dataset": {"validation_fraction": 0.15, "test_fraction": 0.2}}).dataset)
    train, val, test = corpus.train, corpus.validation, corpus.test
    assert len(set(val)) == round(0.15 * distinct) and len(set(test)) == round(0.2 * distinct)
    assert sorted(train + val + test) == sorted(docs)  # every document in exactly one split
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert corpus.identity["test_fraction"] == 0.2 and corpus.identity["validation_fraction"] == 0.15


def test_split_is_seeded_and_keeps_validation_when_test_is_added():
    def corpus(**dataset):
        return load_corpus(validate({"dataset": dataset}).dataset)

    a, b, other = corpus(seed=3), corpus(seed=3), corpus(seed=4)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert set(a.test) != set(other.test)
    # Validation is drawn first: a larger test split takes documents from train only.
    assert corpus(seed=3, test_fraction=0.3).validation == a.validation


def test_prepared_test_split_is_packed_from_the_test_documents_alone(tiny_pipeline):
    """No document straddles two splits: each .npy is exactly the packing of its own documents."""
    params = validate(tiny_params_dict())
    corpus = load_corpus(params.dataset)
    data = load_prepared(tiny_pipeline / "data/prepared")
    tok = load_tokenizer(str(data.tokenizer_dir))
    for split in ("train", "validation", "test"):
        docs = getattr(corpus, split)
        assert np.array_equal(data.split(split), pack(docs, tok, params.dataset.max_length)), split
        assert data.meta["splits"][split]["documents"] == len(docs)
    assert sum(data.meta["splits"][s]["documents"] for s in ("train", "validation", "test")) == 24
    assert data.meta["dataset"]["test_fraction"] == 0.1


def test_cache_covers_the_test_split(tiny_pipeline):
    data = load_prepared(tiny_pipeline / "data/prepared")
    cache = TeacherLogitCache(tiny_pipeline / "data/teacher_logits/test.h5")
    assert cache.fingerprint["split"] == "test" and cache.num_sequences == len(data.test)
    assert np.array_equal(cache.read(list(range(len(data.test))))["input_ids"], data.test)
    metrics = json.loads((tiny_pipeline / "metrics/teacher_logits.json").read_text())
    assert metrics["test"]["sequences"] == len(data.test)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, r"dataset\.test_fraction: .*validation_fraction 0\.5"),
        ({"validation_fraction": 0.95}, r"dataset\.test_fraction: .*leaves no documents for training"),
        ({"test_fraction": 0}, r"dataset\.test_fraction: "),
        ({"test_fraction": 1.0}, r"dataset\.test_fraction: "),
        ({"test_split": "test"}, r"dataset\.test_split: .*source 'hf'.*dataset\.test_fraction"),
        ({"source": "files", "files": ["a.txt"], "test_split": "test"}, r"dataset\.test_split: .*'files'"),
        ({"validation_split": "validation"}, r"dataset\.validation_split: .*source 'hf'"),
        ({"source": "hf", "name": "x", "test_split": "train"}, r"dataset\.test_split: 'train' is also dataset\.split"),
        (
            {"source": "hf", "name": "x", "validation_split": "dev", "test_split": "dev"},
            r"dataset\.test_split: 'dev' is also dataset\.validation_split",
        ),
    ],
)
def test_test_split_settings_errors_name_the_key(dataset, message):
    with pytest.raises(UserError, match=message):
        validate({"dataset": dataset})


def test_named_splits_lift_the_fraction_sum_check():
    cfg = validate({"dataset": {"source": "hf", "name": "x", "test_split": "test", "validation_fraction": 0.9}}).dataset
    assert cfg.test_split == "test"


def test_too_few_documents_for_three_splits_names_the_keys():
    cfg = validate({"dataset": {"max_samples": 2}}).dataset
    with pytest.raises(UserError, match=r"dataset\.validation_fraction / dataset\.test_fraction"):
        load_corpus(cfg)


def test_distill_never_opens_the_test_split(pipeline_copy):
    """With test.npy and test.h5 gone, distill still runs; evaluate then reports on the restored test split."""
    from kdsweep.stages import distill, evaluate

    aside = pipeline_copy / "aside"
    aside.mkdir()
    for path in (pipeline_copy / "data/prepared/test.npy", pipeline_copy / "data/teacher_logits/test.h5"):
        shutil.move(path, aside / path.name)
    params = validate(tiny_params_dict())
    with chdir(pipeline_copy):
        assert distill.main(params, run_dir=pipeline_copy / "tb")["state"] == "complete"
        with pytest.raises(UserError, match=r"teacher_logits/test\.h5"):
            evaluate.main(params)
    with pytest.raises(UserError, match=r"missing test\.npy.*dvc repro prepare"):
        load_prepared(pipeline_copy / "data/prepared").split("test")
    shutil.move(aside / "test.npy", pipeline_copy / "data/prepared/test.npy")
    shutil.move(aside / "test.h5", pipeline_copy / "data/teacher_logits/test.h5")
    with chdir(pipeline_copy):
        metrics = evaluate.main(params)
    test_len = len(load_prepared(pipeline_copy / "data/prepared").test)
    assert metrics["test_tokens"] == test_len * (params.dataset.max_length - 1)
    for scores in (metrics, metrics["initial"]):
        for key in ("test_ce", "test_perplexity", "test_kl", "test_top1_agreement"):
            assert np.isfinite(scores[key]), key
        assert scores["test_perplexity"] == pytest.approx(np.exp(scores["test_ce"]))
        assert 0 <= scores["test_top1_agreement"] <= 1 and scores["test_kl"] >= 0
    assert json.loads((pipeline_copy / "metrics/evaluate.json").read_text()) == metrics


def test_hf_named_test_split_saved_locally(tmp_path):
    """A DatasetDict saved with save_to_disk: train, validation and test each come from their named split."""
    import datasets

    from kdsweep.stages import prepare

    docs = builtin_documents()
    splits = {"train": docs[:16], "validation": docs[16:20], "test": docs[20:24]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"body": texts}) for name, texts in splits.items()}
    ).save_to_disk(tmp_path / "hf_dataset")
    params = validate(
        tiny_params_dict(
            dataset={
                "source": "hf",
                "name": str(tmp_path / "hf_dataset"),
                "text_column": "body",
                "validation_split": "validation",
                "test_split": "test",
                "max_samples": None,
            }
        )
    )
    with chdir(tmp_path):
        meta = prepare.main(params)
    assert meta["dataset"]["test_split"] == "test" and "test_fraction" not in meta["dataset"]
    assert {s: meta["splits"][s]["documents"] for s in splits} == {"train": 16, "validation": 4, "test": 4}
    data = load_prepared(tmp_path / "data/prepared")
    tok = load_tokenizer(str(data.tokenizer_dir))
    for name, texts in splits.items():
        assert np.array_equal(data.split(name), pack(texts, tok, 32)), name

    # Without a named validation split, validation_fraction of the train split is held out; test stays named.
    params = validate(tiny_params_dict(dataset={**params.dataset.model_dump(), "validation_split": None}))
    corpus = load_corpus(params.dataset)
    assert corpus.test == splits["test"] and len(corpus.validation) == 2
    assert sorted(corpus.train + corpus.validation) == sorted(splits["train"])
