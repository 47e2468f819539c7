"""Teacher-logit cache benchmarks (issue 3): size, read speed, generation overhead, interpolation error.

    python bench/cache.py                                    # trains a small teacher first (~1-2 min)
    python bench/cache.py --teacher models/teacher --prepared data/prepared   # reuse the demo's
    python bench/cache.py --codes                            # only: q8 and sampled caches against fp16
    python bench/cache.py --sizes data/teacher_logits/train.h5 ...   # only: sizes of existing caches

Prints markdown tables. Everything runs on one CPU thread and is timed in CPU seconds of
this process (best of 3). Logits are a real teacher's:
the embedded Qwen3-MoE (vocabulary 4,096) trained on the builtin corpus. The 151,936-token
rows place that teacher's distribution into a 151,936-id space by an order-preserving random
injection of its 4,096 ids (the other ids get probability 0), so values and normaliser are the
real teacher's and only the ids grow; "random ids" is the worst case, top-k sets drawn uniformly.
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from kdsweep.cache.format import (
    STORED,
    CacheLayout,
    decode_log_normalizer,
    deltas_to_ids,
    ids_to_deltas,
    log_normalizer,
    summarize_logits,
    temperature_grid,
)
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.cache.writer import dataset_options, generate, teacher_batch_summary, teacher_logits_chunks

BIG_VOCAB = 151_936


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def best_of(fn, repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs, in CPU seconds of this (single-threaded) process: the
    machine's cores are shared, and wall time would count the time other work held the core."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


# --------------------------------------------------------------------------- teacher
def teacher_and_data(args, work: Path):
    """(teacher model, (N, L) int32 sequences); trains a small embedded teacher unless --teacher is given."""
    from kdsweep.config import validate
    from kdsweep.data import load_prepared
    from kdsweep.models import load_causal_lm
    from kdsweep.stages import prepare, teacher

    if args.teacher:
        prepared = load_prepared(args.prepared)
        model = load_causal_lm(args.teacher)
    else:
        params = validate({"teacher": {"train": {"max_steps": args.train_steps}}})
        prepare.main(params, out=work / "prepared")
        print(f"training the embedded teacher for {args.train_steps} steps ...")
        metrics = teacher.train_embedded(params, work / "prepared", work / "teacher")
        print(f"teacher: val loss {metrics['val_loss']:.2f} after {metrics['seconds']} s")
        prepared = load_prepared(work / "prepared")
        model = load_causal_lm(work / "teacher")
    return model.float().eval(), prepared.train[: args.sequences]


# --------------------------------------------------------------------------- generation
def bench_generation(model, seqs: np.ndarray, layout: CacheLayout, batch: int, work: Path) -> tuple[str, dict]:
    vocab = layout.vocab_size
    chunk = max(1, min(4096, 2**24 // vocab))
    batches = [torch.as_tensor(seqs[i : i + batch], dtype=torch.long) for i in range(0, len(seqs), batch)]

    @torch.no_grad()
    def forward_only():
        for ids in batches:
            for lg in teacher_logits_chunks(model, ids, vocab, chunk):
                lg.sum()  # the logits exist; nothing else

    @torch.no_grad()
    def with_summary():
        for ids in batches:
            teacher_batch_summary(model, ids, layout)

    summaries = []

    def full_generate():
        path = work / "gen.h5"
        path.unlink(missing_ok=True)
        generate(model, seqs, path, layout, batch_size=batch, device=torch.device("cpu"), desc="bench")
        summaries.append(path)

    forward_only()  # warm-up
    t_fwd = best_of(forward_only)
    t_sum = best_of(with_summary)
    t_gen = best_of(full_generate, repeat=2)
    tokens = seqs.size
    rows = [
        ["teacher forward (decoder + LM head)", f"{t_fwd:.2f}", f"{tokens / t_fwd:,.0f}", "-"],
        ["forward + top-k + normaliser", f"{t_sum:.2f}", f"{tokens / t_sum:,.0f}", f"+{t_sum / t_fwd - 1:.0%}"],
        [
            "`generate()`: + batch files, HDF5 assembly (gzip)",
            f"{t_gen:.2f}",
            f"{tokens / t_gen:,.0f}",
            f"+{t_gen / t_fwd - 1:.0%}",
        ],
    ]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    out = table(
        [
            f"generation, {params:.1f}M-parameter teacher, vocab {vocab:,}, {tokens:,} tokens",
            "seconds",
            "tokens/s",
            "over forward",
        ],
        rows,
    )
    return out, {"path": summaries[-1], "t_fwd": t_fwd, "t_gen": t_gen}


def bench_big_vocab_summary(betas: np.ndarray, k: int) -> str:
    """Summary cost per token at 151,936 tokens vs the LM head alone at hidden 2048 (Qwen3-30B-A3B's)."""
    g = torch.Generator().manual_seed(0)
    n, hidden = 32, 2048
    rank = torch.randperm(BIG_VOCAB, generator=g).float() + 1
    logits = 3 * torch.randn(n, BIG_VOCAB, generator=g) - 1.5 * torch.log(rank)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(BIG_VOCAB, hidden, generator=g) / hidden**0.5
    t_sum = best_of(lambda: summarize_logits(logits, k, betas))
    t_head = best_of(lambda: h @ w.T)
    # Qwen3-30B-A3B: ~3.3B active parameters per token, of which the LM head is 2048 x 151,936.
    head_share = hidden * BIG_VOCAB / 3.3e9
    return table(
        ["vocab 151,936, per token, one core", "ms/token"],
        [
            ["top-k + normaliser (`summarize_logits`)", f"{t_sum / n * 1e3:.2f}"],
            ["LM head alone, hidden 2048 (fp32 matmul)", f"{t_head / n * 1e3:.2f}"],
            ["ratio summary / LM head", f"{t_sum / t_head:.2f}"],
            [
                f"estimate: summary / Qwen3-30B-A3B forward (LM head = {head_share:.1%} of its FLOPs)",
                f"{t_sum / t_head * head_share:.1%}",
            ],
        ],
    )


# --------------------------------------------------------------------------- size
class Bf16Logits:
    """The teacher with its logits rounded to bfloat16, as a bf16 teacher's LM head returns them."""

    def __init__(self, model):
        self.model = model

    def get_decoder(self):
        return self.model.get_decoder()

    def get_output_embeddings(self):
        head = self.model.get_output_embeddings()
        return lambda h: head(h).bfloat16()

    def parameters(self):
        return self.model.parameters()


def stored_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in STORED}


def dataset_bytes(arrays: dict[str, np.ndarray], compression: int) -> dict[str, float]:
    """Stored bytes of each array, chunked per sequence with the cache's filters (in memory)."""
    out = {}
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for key, arr in arrays.items():
            ds = f.create_dataset(key, data=arr, chunks=(1,) + arr.shape[1:], **dataset_options(compression))
            out[key] = ds.id.get_storage_size()
    return out


def variants(stored: dict[str, np.ndarray], betas: np.ndarray, vocab: int, rng) -> dict[str, dict]:
    """The same cache content in the layouts compared (see the module docstring)."""
    ids = deltas_to_ids(stored["topk_id_deltas"])
    base = {
        "input_ids": stored["input_ids"],
        "topk_logits": stored["topk_logits"],
        "tail_log_normalizer_residual": stored["tail_log_normalizer_residual"],
        "tail_log_normalizer_slope": stored["tail_log_normalizer_slope"],
    }
    out = {f"vocab {vocab:,}": {**base, "topk_id_deltas": stored["topk_id_deltas"]}}
    # Format 1 stored f itself (float32) and f' (float16) at the grid, and absolute ids.
    t = decode_log_normalizer(stored["tail_log_normalizer_residual"], stored["tail_log_normalizer_slope"], betas)
    s = torch.from_numpy(stored["topk_logits"].astype(np.float32))
    b = torch.as_tensor(betas, dtype=torch.float32)[:, None]
    g = torch.logsumexp(s.unsqueeze(-2) * b, -1)
    g_slope = (torch.softmax(s.unsqueeze(-2) * b, -1) * s.unsqueeze(-2)).sum(-1)
    f = torch.logaddexp(g, torch.from_numpy(t))
    w = torch.exp(torch.from_numpy(t) - f)
    f_slope = (1 - w) * g_slope + w * torch.from_numpy(stored["tail_log_normalizer_slope"].astype(np.float32))
    out[f"vocab {vocab:,}, format 1 (absolute ids, f as float32)"] = {
        "input_ids": stored["input_ids"],
        "topk_ids": ids.astype(np.uint16),
        "topk_logits": stored["topk_logits"],
        "log_normalizer": f.numpy(),
        "log_normalizer_slope": f_slope.half().numpy(),
    }
    inj = np.sort(rng.choice(BIG_VOCAB, vocab, replace=False)).astype(np.uint32)
    out[f"vocab {BIG_VOCAB:,} (teacher's ids, injected)"] = {**base, "topk_id_deltas": ids_to_deltas(inj[ids])}
    k = ids.shape[-1]
    rand = np.sort(rng.integers(0, BIG_VOCAB, (ids[..., 0].size, k)), -1)
    while (dup := (np.diff(rand, axis=-1) == 0).any(-1)).any():  # distinct ids per position
        rand[dup] = np.sort(rng.integers(0, BIG_VOCAB, (int(dup.sum()), k)), -1)
    out[f"vocab {BIG_VOCAB:,}, random ids (worst case)"] = {
        **base,
        "topk_id_deltas": ids_to_deltas(rand.astype(np.uint32).reshape(ids.shape)),
    }
    return out


def entropy_bits(x: np.ndarray) -> float:
    c = np.bincount(x.ravel().astype(np.int64))
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def bench_size(stored: dict[str, np.ndarray], stored_bf16: dict[str, np.ndarray], betas, vocab: int) -> str:
    rng = np.random.default_rng(0)
    tokens = stored["input_ids"].size
    k = stored["topk_logits"].shape[-1]
    rows = []
    cases = variants(stored, betas, vocab, rng)
    cases[f"vocab {vocab:,}, teacher logits in bf16 (a GPU's default)"] = stored_bf16
    for name, arrays in cases.items():
        for level in (4, 1, 9, 0) if name == f"vocab {vocab:,}" else (4,):
            b = dataset_bytes(arrays, level)
            ids_b = b.get("topk_id_deltas", b.get("topk_ids"))
            norm_b = (
                b.get("tail_log_normalizer_residual", 0)
                + b.get("tail_log_normalizer_slope", 0)
                + b.get("log_normalizer", 0)
                + b.get("log_normalizer_slope", 0)
            )
            total = sum(b.values())
            rows.append(
                [
                    name,
                    "gzip %d" % level if level else "none",
                    f"{b['input_ids'] / tokens:.1f}",
                    f"{ids_b / tokens:.1f}",
                    f"{b['topk_logits'] / tokens:.1f}",
                    f"{norm_b / tokens:.1f}",
                    f"{total / tokens:.1f}",
                    f"**{total / tokens / k:.2f}**",
                ]
            )
    out = table(
        [
            "content (k = %d, G = %d)" % (k, len(betas)),
            "compression",
            "input_ids",
            "ids",
            "values",
            "normaliser",
            "bytes/token",
            "bytes/logit",
        ],
        rows,
    )
    u = stored["topk_logits"].view(np.uint16)
    ub = stored_bf16["topk_logits"].view(np.uint16)
    gaps = stored["topk_id_deltas"][..., 1:]
    out += (
        "\n\nEntropy (order 0, per stored value): float16 logits %.2f bits (low byte %.2f of 8, high byte %.2f); "
        "with a bf16 teacher %.2f bits; id gaps at vocab %d: %.2f bits."
        % (entropy_bits(u), entropy_bits(u & 0xFF), entropy_bits(u >> 8), entropy_bits(ub), vocab, entropy_bits(gaps))
    )
    return out


# --------------------------------------------------------------------------- read
def write_file(arrays: dict[str, np.ndarray], like: Path, path: Path, compression: int, repeat: int) -> Path:
    """A cache file with ``arrays`` (tiled ``repeat`` times along the sequences) and the attributes
    of ``like``. Tiling makes each dataset far larger than HDF5's 1 MB chunk cache, so random
    reads inflate a chunk each time, as they do on a real cache of millions of tokens."""
    with h5py.File(like, "r") as src, h5py.File(path, "w") as f:
        for key, arr in arrays.items():
            f.create_dataset(
                key, data=np.concatenate([arr] * repeat), chunks=(1,) + arr.shape[1:], **dataset_options(compression)
            )
        for key, value in src.attrs.items():
            f.attrs[key] = value
        if next(arr for key, arr in arrays.items() if key.endswith("_id_deltas")).dtype == np.uint32:
            f.attrs["vocab_size"] = BIG_VOCAB
    return path


def bench_read(files: dict[str, Path], batch: int, n_batches: int, step_tokens_per_s: float) -> str:
    rows = []
    for name, path in files.items():
        for in_memory in (False, True):
            c = TeacherLogitCache(path, in_memory=in_memory)
            rng = np.random.default_rng(0)
            idx = [rng.choice(c.num_sequences, batch, replace=False) for _ in range(n_batches)]
            for i in idx[:20]:
                c.read(i)  # warm: the file is in the page cache
            t = best_of(lambda c=c, idx=idx: [c.read(i) for i in idx])
            rate = n_batches * batch * c.seq_len / t
            rows.append(
                [
                    name,
                    "in memory" if in_memory else "lazy (warm file)",
                    f"{rate / 1e6:.2f}",
                    f"{rate / step_tokens_per_s:,.0f}x",
                ]
            )
            c.close()
    return table(
        [f"read, random batches of {batch} sequences, one core", "mode", "M tokens/s", "vs a training step"], rows
    )


def training_step_tokens_per_s(vocab: int, seq_len: int, batch: int) -> float:
    """Tokens/s of a forward + backward + AdamW step of a small Qwen3-MoE student on ``batch`` x ``seq_len`` tokens."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq_len))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    return batch * seq_len / best_of(step)


# --------------------------------------------------------------------------- interpolation
def peaked_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, V) logits of a confident teacher: a Gaussian bulk, a Zipf prior over ids, and 8
    context tokens lifted 6-16 above the bulk (top-1 ~0.7, top-64 mass ~0.99: the bulk
    overtakes the top tokens inside T in [1, 4], the hard case for the normaliser)."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    lifts = 6 + 10 * torch.rand(n, 8, generator=g, dtype=torch.float64)
    z.scatter_add_(-1, torch.randint(0, vocab, (n, 8), generator=g), lifts)
    return z - 0.5 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))


@torch.no_grad()
def bench_grid(model, seqs: np.ndarray, vocab: int, k: int, t_range=(1.0, 4.0)) -> str:
    real = model(input_ids=torch.as_tensor(seqs[:16], dtype=torch.long)).logits[..., :vocab].reshape(-1, vocab)
    temps = np.linspace(t_range[0], t_range[1], 61)
    rows = []
    for name, logits in (("trained teacher", real.double()), ("confident (synthetic)", peaked_logits(2048, vocab))):
        s = logits - logits.max(-1, keepdim=True).values
        exact = torch.stack([torch.logsumexp(s / t, -1) for t in temps], -1)
        p = torch.softmax(s, -1)
        mass = float(p.topk(k, -1).values.sum(-1).mean())
        for g in (3, 4, 6, 8):
            betas = temperature_grid(*t_range, g)
            summ = summarize_logits(logits.float(), k, betas)
            top = summ["topk_logits"].double()
            f = torch.stack(
                [
                    log_normalizer(summ["log_normalizer"], summ["log_normalizer_slope"], betas, 1 / t).double()
                    for t in temps
                ],
                -1,
            )
            p_err = max(
                float((torch.exp(top / t - f[:, i, None]) - torch.exp(top / t - exact[:, i, None])).abs().sum(-1).max())
                for i, t in enumerate(temps)
            )
            arrays = {
                "r": summ["tail_log_normalizer_residual"].numpy()[None],
                "d": summ["log_normalizer_slope"].numpy()[None],
            }
            nbytes = sum(dataset_bytes(arrays, 4).values()) / s.shape[0]
            rows.append(
                [
                    f"{name}, top-{k} mass {mass:.2f}",
                    g,
                    f"{float(summ['max_error']):.1e}",
                    f"{(f - exact).abs().max():.1e}",
                    f"{p_err:.1e}",
                    f"{nbytes:.1f}",
                ]
            )
    return table(
        [
            f"normaliser, T in [{t_range[0]:g}, {t_range[1]:g}], vocab {vocab:,}",
            "grid points G",
            "stored bound",
            "max error over 61 T",
            "max sum_i |p_cache - p_i| (top-k)",
            "bytes/token",
        ],
        rows,
    )


# --------------------------------------------------------------------------- value codes and sampled caches
CODES = {  # name -> (cache_mode, cache_values, sample_draws)
    "topk fp16 (k = 64)": ("topk", "fp16", 0),
    "topk q8 (k = 64)": ("topk", "q8", 0),
    "sampled fp16, 64 draws": ("sampled", "fp16", 64),
    "sampled q8, 64 draws": ("sampled", "q8", 64),
    "sampled q8, 16 draws": ("sampled", "q8", 16),
}


def injected(arrays: dict[str, np.ndarray], vocab: int, rng) -> dict[str, np.ndarray]:
    """The same cache with its ids placed into a 151,936-id space by an order-preserving injection."""
    inj = np.sort(rng.choice(BIG_VOCAB, vocab, replace=False)).astype(np.uint32)
    out = dict(arrays)
    for key in arrays:
        if key.endswith("_id_deltas"):
            out[key] = ids_to_deltas(inj[deltas_to_ids(arrays[key])])
    return out


def stored_cache(path: Path) -> tuple[TeacherLogitCache, dict[str, np.ndarray], float]:
    """An open cache file, its stored arrays and the ids it keeps per position (a sampled cache's unique draws)."""
    c = TeacherLogitCache(path)
    arrays = {key: ds[...] for key, ds in c.datasets().items()}
    kept = float((arrays["sample_counts"] > 0).sum(-1).mean()) if c.mode == "sampled" else float(c.top_k)
    return c, arrays, kept


def both_vocabularies(arrays: dict[str, np.ndarray], vocab: int, tokens: int, rng) -> list[tuple[str, dict, float]]:
    """The arrays at their vocabulary and with ids injected into 151,936: (label, arrays, stored bytes per token)."""
    cases = ((f"{vocab:,}", arrays), (f"{BIG_VOCAB:,}", injected(arrays, vocab, rng)))
    return [(label, case, sum(dataset_bytes(case, 4).values()) / tokens) for label, case in cases]


def bench_sizes(paths: list[Path]) -> None:
    """Bytes per token and per kept id of existing cache files, at their vocabulary and injected into 151,936."""
    rng = np.random.default_rng(0)
    rows = []
    for path in paths:
        c, arrays, kept = stored_cache(path)
        ids = f"{int(c.attrs['sample_draws'])} draws" if c.mode == "sampled" else f"k = {c.top_k}"
        grid = "self-normalised, no grid" if c.self_normalized else f"G = {len(c.betas)}"
        name = f"{c.mode} {c.values} ({ids}), {grid}"
        vocab, tokens = c.vocab_size, c.num_sequences * c.seq_len
        c.close()
        for label, _, per_token in both_vocabularies(arrays, vocab, tokens, rng):
            rows.append([f"{path}: {name}", label, f"{kept:.1f}", f"{per_token:.1f}", f"{per_token / kept:.2f}"])
    print(table(["cache", "vocab", "ids kept per position", "bytes/token", "bytes/kept id"], rows))


def bench_codes(model, seqs: np.ndarray, args, work: Path) -> None:
    """Per value code and mode: generation time, bytes per logit / per token at both vocabularies, read speed."""
    vocab = model.get_output_embeddings().weight.shape[0]
    betas = temperature_grid(1.0, 4.0, args.grid)
    rng = np.random.default_rng(0)
    tokens, repeat = seqs.size, max(1, -(-2048 // len(seqs)))
    size_rows, gen_rows, files = [], [], {}
    for name, (mode, values, draws) in CODES.items():
        layout = CacheLayout(
            draws or args.top_k, betas, vocab, seqs.shape[1], {"bench": name}, mode, values, draws, 1.0
        )
        path = work / f"code-{len(files)}.h5"

        def run(path=path, layout=layout, name=name):
            path.unlink(missing_ok=True)
            generate(model, seqs, path, layout, batch_size=args.batch, device=torch.device("cpu"), desc=name)

        seconds = best_of(run, repeat=2)
        gen_rows.append([name, f"{seconds:.2f}", f"{tokens / seconds:,.0f}"])
        c, arrays, unique = stored_cache(path)
        value_error = float(c.attrs.get("value_max_error", float("nan")))
        c.close()
        for label, case, per_token in both_vocabularies(arrays, vocab, tokens, rng):
            size_rows.append(
                [name, label, f"{unique:.1f}", f"{per_token:.1f}", f"{per_token / unique:.2f}", f"{value_error:.1e}"]
            )
            files[f"{name}, vocab {label}"] = write_file(case, path, work / f"read-{len(files)}.h5", 4, repeat)
    base = float(gen_rows[0][1])
    for row in gen_rows:
        row.append(f"{float(row[1]) / base:.2f}x")
    print(
        table(
            ["cache", "vocab", "ids kept per position", "bytes/token", "bytes/kept id", "stored value_max_error"],
            size_rows,
        ),
        "\n",
    )
    print(table([f"generation, {tokens:,} tokens, gzip 4", "seconds", "tokens/s", "vs topk fp16"], gen_rows), "\n")
    step = training_step_tokens_per_s(vocab, seqs.shape[1], args.batch)
    print(f"read files: {len(seqs) * repeat} sequences; training step {step:,.0f} tokens/s")
    print(bench_read(files, args.batch, 200, step), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="a trained teacher directory (default: train one)")
    ap.add_argument("--prepared", default="data/prepared", help="prepared data of --teacher")
    ap.add_argument("--train-steps", type=int, default=100, help="steps for the teacher trained here")
    ap.add_argument("--sequences", type=int, default=256, help="sequences of 128 tokens to cache")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--grid", type=int, default=8, help="temperature grid points")
    ap.add_argument("--batch", type=int, default=8, help="sequences per teacher forward and per read")
    ap.add_argument("--codes", action="store_true", help="only the q8 / sampled comparison (bench_codes)")
    ap.add_argument("--sizes", nargs="+", type=Path, metavar="FILE", help="only: sizes of these existing caches")
    args = ap.parse_args()
    if args.sizes:
        bench_sizes(args.sizes)
        return
    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch threads 1; "
        f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, seqs = teacher_and_data(args, work)
        if args.codes:
            bench_codes(model, seqs, args, work)
            return
        vocab = model.get_output_embeddings().weight.shape[0]
        betas = temperature_grid(1.0, 4.0, args.grid)
        layout = CacheLayout(args.top_k, betas, vocab, seqs.shape[1], {"bench": True})

        print(bench_grid(model, seqs, vocab, args.top_k), "\n", flush=True)
        gen_table, gen = bench_generation(model, seqs, layout, args.batch, work)
        print(gen_table, "\n", flush=True)
        print(bench_big_vocab_summary(betas, args.top_k), "\n", flush=True)

        stored = stored_arrays(gen["path"])
        bf16_path = generate(
            Bf16Logits(model),
            seqs,
            work / "bf16.h5",
            layout,
            batch_size=args.batch,
            device=torch.device("cpu"),
            desc="bench bf16",
        )
        stored_bf16 = stored_arrays(bf16_path)
        print(bench_size(stored, stored_bf16, betas, vocab), "\n", flush=True)

        step = training_step_tokens_per_s(vocab, seqs.shape[1], args.batch)
        print(
            f"training step of a small student (hidden 128, 2 layers, 8 experts), batch {args.batch} x "
            f"{seqs.shape[1]}: {step:,.0f} tokens/s\n"
        )
        rng = np.random.default_rng(0)
        cases = variants(stored, betas, vocab, rng)
        repeat = max(1, -(-2048 // len(seqs)))
        files = {}
        for name, arrays in (
            (f"vocab {vocab:,}", cases[f"vocab {vocab:,}"]),
            (f"vocab {BIG_VOCAB:,}", cases[f"vocab {BIG_VOCAB:,} (teacher's ids, injected)"]),
        ):
            for level, label in ((4, "gzip"), (0, "no compression")):
                path = work / f"read-{len(files)}.h5"
                files[f"{name}, {label}"] = write_file(arrays, gen["path"], path, level, repeat)
        print(f"read files: {len(seqs) * repeat} sequences of {seqs.shape[1]} tokens each")
        print(bench_read(files, args.batch, 200, step))


if __name__ == "__main__":
    main()
