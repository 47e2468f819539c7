"""Stage ``prepare``: text -> tokenizer + packed train/validation token sequences.

The tokenizer is the teacher's own when ``teacher.model`` names a model, so teacher and
student share a vocabulary; otherwise a byte-level BPE is trained on the training split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from kdsweep.config import Params
from kdsweep.data import load_corpus, load_tokenizer, pack, tokenizer_fingerprint, train_bpe_tokenizer


def main(params: Params, out: Path = Path("data/prepared")) -> dict:
    """Write ``out/{tokenizer/, train.npy, validation.npy, meta.json}``; return the meta."""
    ds = params.dataset
    corpus = load_corpus(ds)
    if params.teacher.model:
        tokenizer = load_tokenizer(params.teacher.model, params.teacher.revision, params.teacher.trust_remote_code)
        tok_source = {"from": params.teacher.model, "revision": params.teacher.revision}
    else:
        tokenizer = train_bpe_tokenizer(corpus.train, params.tokenizer, ds.max_length)
        tok_source = {"trained": "byte-level BPE", "vocab_size": params.tokenizer.vocab_size}
    train = pack(corpus.train, tokenizer, ds.max_length)
    validation = pack(corpus.validation, tokenizer, ds.max_length)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    np.save(tmp / "train.npy", train)
    np.save(tmp / "validation.npy", validation)
    meta = {
        "dataset": corpus.identity,
        "max_length": ds.max_length,
        "packing": "concatenate documents with EOS, cut into max_length windows, drop the remainder",
        "tokenizer": {"sha256": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer), **tok_source},
        "eos_token_id": tokenizer.eos_token_id,
        "splits": {
            "train": {"documents": len(corpus.train), "sequences": int(len(train)), "tokens": int(train.size)},
            "validation": {
                "documents": len(corpus.validation),
                "sequences": int(len(validation)),
                "tokens": int(validation.size),
            },
        },
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(
        f"prepare: {len(tokenizer)}-token vocabulary; train {train.shape[0]} x {ds.max_length} tokens, "
        f"validation {validation.shape[0]} x {ds.max_length}"
    )
    return meta
