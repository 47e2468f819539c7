"""Text sources, tokenizers and the packed token sequences the stages share.

The ``prepare`` stage writes a directory::

    data/prepared/
        tokenizer/          # save_pretrained of the tokenizer the teacher and student use
        train.npy           # int32 (num_sequences, max_length), packed, no padding
        validation.npy      # same layout, from held-out documents
        test.npy            # same layout, from other held-out documents (read by evaluate only)
        meta.json           # what it was made from (used in the cache fingerprint)

The split is by document, before packing, so no document straddles two splits: the
distinct documents are shuffled with ``dataset.seed``, the first ``validation_fraction`` of
them are validation, the next ``test_fraction`` test and the rest train (a named Hugging Face split,
``validation_split`` or ``test_split``, replaces its fraction). ``distill`` and the sweep
never read ``test.npy``: :func:`load_prepared` opens it only when asked for the test split.

Packing: every document's tokens are followed by the EOS token, all documents of a
split are concatenated, and the stream is cut into ``max_length`` windows (the last
partial window is dropped). Labels are the inputs themselves; models shift them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from kdsweep.config import DatasetConfig, TokenizerConfig
from kdsweep.errors import UserError

SPLITS = ("train", "validation", "test")


@dataclass
class Corpus:
    """Documents of the three splits plus a description of where they came from."""

    train: list[str]
    validation: list[str]
    test: list[str]
    identity: dict


def builtin_documents() -> list[str]:
    """Python's own reference documentation (``pydoc_data``): ~465 KB of real English, shipped with CPython."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _split_documents(
    docs: list[str], validation_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Shuffle the distinct texts with ``seed``; return (train, validation, test), each in corpus order.

    The unit is a distinct text, so copies of one document always land in the same split
    and no held-out text is also trained on. A fraction of 0 holds out nothing (its split
    is then read from a named split instead); a positive one holds out at least one text.
    Validation is taken first, so adding a test split leaves validation of the same seed unchanged.
    """
    texts = list(dict.fromkeys(docs))  # distinct, in first-appearance order
    random.Random(seed).shuffle(texts)
    n_val = max(1, round(validation_fraction * len(texts))) if validation_fraction else 0
    n_test = max(1, round(test_fraction * len(texts))) if test_fraction else 0
    if n_val + n_test >= len(texts):
        raise UserError(
            f"dataset: {len(texts)} distinct document(s) is too few to hold out {n_val} for validation and {n_test} "
            "for test and keep some for training; add text (dataset.max_samples) or lower "
            "dataset.validation_fraction / dataset.test_fraction"
        )
    val, test = set(texts[:n_val]), set(texts[n_val : n_val + n_test])
    return (
        [d for d in docs if d not in val and d not in test],
        [d for d in docs if d in val],
        [d for d in docs if d in test],
    )


def _load_hf_split(cfg: DatasetConfig, split: str) -> list[str]:
    import datasets

    name = cfg.name
    try:
        saved = Path(name)
        if (saved / "state.json").exists() or (saved / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(name)  # written by Dataset.save_to_disk
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, cfg.config_name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise UserError(
            f"dataset.name: could not load {name!r} (config {cfg.config_name!r}, split {split!r}): {e}. "
            "Check the id, dataset.config_name and dataset.split; offline, point dataset.name at a local copy."
        ) from None
    if cfg.text_column not in ds.column_names:
        raise UserError(
            f"dataset.text_column: {cfg.text_column!r} is not a column of {name!r}; columns: {ds.column_names}"
        )
    return [t for t in ds[cfg.text_column] if isinstance(t, str) and t.strip()]


def _named_split(cfg: DatasetConfig, split: str) -> list[str]:
    docs = _load_hf_split(cfg, split)
    return docs[: cfg.max_samples] if cfg.max_samples else docs


def load_corpus(cfg: DatasetConfig) -> Corpus:
    """Read the documents named by the ``dataset`` section and split them into train/validation/test."""
    identity = {"source": cfg.source, "max_samples": cfg.max_samples, "seed": cfg.seed}
    if cfg.source == "builtin":
        import sys

        docs = builtin_documents()
        identity["name"] = f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor})"
    elif cfg.source == "files":
        docs = []
        for f in cfg.files:
            path = Path(f)
            if not path.is_file():
                raise UserError(f"dataset.files: {f} does not exist")
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
        identity["name"] = sorted(cfg.files)
    else:
        docs = _load_hf_split(cfg, cfg.split)
        identity.update(name=cfg.name, config_name=cfg.config_name, split=cfg.split, text_column=cfg.text_column)
    identity["sha256"] = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    if cfg.max_samples is not None:
        docs = docs[: cfg.max_samples]
    # A named split replaces its fraction; the identity records whichever decided the split.
    val_fraction = 0.0 if cfg.validation_split else cfg.validation_fraction
    test_fraction = 0.0 if cfg.test_split else cfg.test_fraction
    if cfg.validation_split:
        identity["validation_split"] = cfg.validation_split
    else:
        identity["validation_fraction"] = cfg.validation_fraction
    if cfg.test_split:
        identity["test_split"] = cfg.test_split
    else:
        identity["test_fraction"] = cfg.test_fraction
    train, val, test = _split_documents(docs, val_fraction, test_fraction, cfg.seed)
    if cfg.validation_split:
        val = _named_split(cfg, cfg.validation_split)
    if cfg.test_split:
        test = _named_split(cfg, cfg.test_split)
    return Corpus(train, val, test, identity)


def train_bpe_tokenizer(docs: list[str], cfg: TokenizerConfig, max_length: int):
    """A byte-level BPE trained on ``docs``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,  # saved as 1e30 otherwise
    )


def load_tokenizer(path_or_id: str, revision: str | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with an error that names the path."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer: could not load {path_or_id!r}: {e}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id), so caches made with another tokenizer are recognised."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def pack(docs: list[str], tokenizer, max_length: int, split: str = "train") -> np.ndarray:
    """Tokenize, append EOS to every document, concatenate and cut into ``max_length`` windows.

    ``split`` names the split in the error raised when the documents fill no window.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer: has no eos_token; packing needs one to separate documents")
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // max_length
    if n == 0:
        raise UserError(
            f"dataset: the {split} split has only {len(stream)} tokens, fewer than one sequence of max_length "
            f"{max_length}; add text, lower dataset.max_length or hold out more documents for it"
        )
    return np.asarray(stream[: n * max_length], dtype=np.int32).reshape(n, max_length)


@dataclass
class Prepared:
    """The prepare stage's output, loaded; the test split is read from disk only when asked for."""

    root: Path
    train: np.ndarray
    validation: np.ndarray
    meta: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @cached_property
    def test(self) -> np.ndarray:
        """The held-out test sequences (``test.npy``), opened on first use so training never touches them."""
        path = self.root / "test.npy"
        if not path.is_file():
            raise UserError(f"{self.root}: no test split (missing test.npy); run `dvc repro prepare` to rewrite it")
        return np.load(path)

    def split(self, name: str) -> np.ndarray:
        """The packed sequences of ``name``, one of :data:`SPLITS`."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def load_prepared(root: str | Path) -> Prepared:
    """Load ``data/prepared`` (train and validation; test on first access); a missing directory names the stage."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{root}: no prepared data (missing meta.json); run `dvc repro prepare` first")
    meta = json.loads(meta_path.read_text())
    return Prepared(root, np.load(root / "train.npy"), np.load(root / "validation.npy"), meta)
