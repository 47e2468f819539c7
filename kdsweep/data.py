"""Text sources, tokenizers and the packed token sequences the stages share.

The ``prepare`` stage writes a directory::

    data/prepared/
        tokenizer/          # save_pretrained of the tokenizer the teacher and student use
        train.npy           # int32 (num_sequences, max_length), packed, no padding
        validation.npy      # same layout, from held-out documents
        meta.json           # what it was made from (used in the cache fingerprint)

Packing: every document's tokens are followed by the EOS token, all documents of a
split are concatenated, and the stream is cut into ``max_length`` windows (the last
partial window is dropped). Labels are the inputs themselves; models shift them.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdsweep.config import DatasetConfig, TokenizerConfig
from kdsweep.errors import UserError

SPLITS = ("train", "validation")


@dataclass
class Corpus:
    """Documents of the two splits plus a description of where they came from."""

    train: list[str]
    validation: list[str]
    identity: dict


def builtin_documents() -> list[str]:
    """Python's own reference documentation (``pydoc_data``): ~465 KB of real English, shipped with CPython."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(docs)))
    if n_val >= len(docs):
        raise UserError(f"dataset: {len(docs)} document(s) is too few to hold out a validation split; add text")
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


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


def load_corpus(cfg: DatasetConfig) -> Corpus:
    """Read the documents named by the ``dataset`` section and split them into train/validation."""
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
    if cfg.source == "hf" and cfg.validation_split:
        val = _load_hf_split(cfg, cfg.validation_split)
        identity["validation_split"] = cfg.validation_split
        return Corpus(docs, val[: cfg.max_samples] if cfg.max_samples else val, identity)
    identity["validation_fraction"] = cfg.validation_fraction
    train, val = _split_documents(docs, cfg.validation_fraction, cfg.seed)
    return Corpus(train, val, identity)


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


def pack(docs: list[str], tokenizer, max_length: int) -> np.ndarray:
    """Tokenize, append EOS to every document, concatenate and cut into ``max_length`` windows."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("tokenizer: has no eos_token; packing needs one to separate documents")
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // max_length
    if n == 0:
        raise UserError(f"dataset: only {len(stream)} tokens, fewer than one sequence of max_length {max_length}")
    return np.asarray(stream[: n * max_length], dtype=np.int32).reshape(n, max_length)


@dataclass
class Prepared:
    """The prepare stage's output, loaded."""

    root: Path
    train: np.ndarray
    validation: np.ndarray
    meta: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "validation": self.validation}[name]


def load_prepared(root: str | Path) -> Prepared:
    """Load ``data/prepared``; a missing directory names the stage to run."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{root}: no prepared data (missing meta.json); run `dvc repro prepare` first")
    meta = json.loads(meta_path.read_text())
    return Prepared(root, np.load(root / "train.npy"), np.load(root / "validation.npy"), meta)
