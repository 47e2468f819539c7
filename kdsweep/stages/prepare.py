"""Stage ``prepare``: text -> tokenizer + packed train/validation/test token sequences.

The documents are split into train, validation and test by document, before packing
(``kdsweep.data.load_corpus``). The tokenizer is the teacher's own when ``teacher.model``
names a model, so teacher and student share a vocabulary; otherwise a byte-level BPE is
trained on the training split alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdsweep.config import Params
from kdsweep.data import SPLITS, load_corpus, load_tokenizer, pack, tokenizer_fingerprint, train_bpe_tokenizer
from kdsweep.fsio import atomic_path, write_json


def main(params: Params, out: Path = Path("data/prepared")) -> dict:
    """Write ``out/{tokenizer/, train.npy, validation.npy, test.npy, meta.json}``; return the meta."""
    ds = params.dataset
    corpus = load_corpus(ds)
    if params.teacher.model:
        tokenizer = load_tokenizer(params.teacher.model, params.teacher.revision, params.teacher.trust_remote_code)
        tok_source = {"from": params.teacher.model, "revision": params.teacher.revision}
    else:
        tokenizer = train_bpe_tokenizer(corpus.train, params.tokenizer, ds.max_length)
        tok_source = {"trained": "byte-level BPE", "vocab_size": params.tokenizer.vocab_size}
    documents = {split: getattr(corpus, split) for split in SPLITS}
    packed = {split: pack(docs, tokenizer, ds.max_length, split) for split, docs in documents.items()}
    meta = {
        "dataset": corpus.identity,
        "max_length": ds.max_length,
        "packing": "concatenate documents with EOS, cut into max_length windows, drop the remainder",
        "tokenizer": {"sha256": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer), **tok_source},
        "eos_token_id": tokenizer.eos_token_id,
        "splits": {
            split: {"documents": len(documents[split]), "sequences": len(seqs), "tokens": int(seqs.size)}
            for split, seqs in packed.items()
        },
    }
    with atomic_path(out, directory=True) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        for split, seqs in packed.items():
            np.save(tmp / f"{split}.npy", seqs)
        write_json(tmp / "meta.json", meta)
    sizes = ", ".join(f"{split} {len(seqs)} x {ds.max_length}" for split, seqs in packed.items())
    print(f"prepare: {len(tokenizer)}-token vocabulary; {sizes} tokens")
    return meta
