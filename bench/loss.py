"""Extra peak memory and time of the KD loss, forward + backward, at Qwen3's vocabulary.

    .venv/bin/python bench/loss.py                      # V 151,936, 8 x 512 tokens, hidden 512, top-64
    .venv/bin/python bench/loss.py --tokens 1024 --chunks 256   # a quicker look

Variants (each in a fresh subprocess, so no allocator state or peak carries over):

* ``naive_dense``: the reference's path. Full student logits (N, V); the teacher rebuilt to the
  full vocabulary from its cached top-k (tail spread uniformly); ``F.cross_entropy`` and
  ``F.log_softmax`` + ``F.kl_div`` over N x V; autograd.
* ``naive_topk``: full student logits, then kdsweep's exact top-k + tail loss on them (the
  same math as ``chunked``, unchunked): what chunking alone saves.
* ``chunked_C``: ``kdsweep.losses.distillation_loss`` with ``chunk_size`` C.

Memory is measured honestly on CPU: the kernel's peak RSS (``VmHWM``), reset through
``/proc/self/clear_refs`` right before the loss, minus the RSS just before it. Each
subprocess runs with ``MALLOC_MMAP_THRESHOLD_=131072``, so glibc serves every block over
128 KiB with mmap and returns it to the OS when torch frees it: RSS then follows the live
tensors (with glibc's adaptive threshold, freed 16-32 MB chunks stay in the heap and RSS
overstates). ``tracemalloc`` would not see torch's memory at all. Inputs (hidden states,
head weight, teacher top-k) exist before the measurement and are not counted; everything
the loss allocates, including the head weight's gradient, is. Each variant runs
``--repeats`` times in its process; the table shows the smallest peak and time (the first
run also pays one-time costs such as loading kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


ALPHA, TEMPERATURE, TAIL = 0.5, 2.0, 0.3


def sparse_teacher(tokens: int, vocab: int, k: int, device="cpu"):
    """A top-k teacher at temperature T with 30% tail mass and distinct ids per row: (tokens, k) each."""
    import torch

    from kdsweep.losses import SparseTeacher

    ids = (torch.randint(0, vocab, (tokens, 1), device=device) + torch.arange(k, device=device) * (vocab // k)) % vocab
    log_probs = torch.log_softmax(torch.randn(tokens, k, device=device) * 2, -1) + torch.log(torch.tensor(1 - TAIL))
    return SparseTeacher(ids, log_probs)


def loss_inputs(tokens: int, vocab: int, hidden: int, k: int, device="cpu") -> tuple:
    """(hidden states (N, H), head weight (V, H), targets (N,), teacher): what a variant's loss takes."""
    import torch

    h = (torch.randn(tokens, hidden, device=device) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    return h, w, targets, sparse_teacher(tokens, vocab, k, device)


def variant_loss(variant: str, h, w, targets, teacher):
    """The loss of one variant (``naive_dense``, ``naive_topk`` or ``chunked_C``) on :func:`loss_inputs`."""
    import torch
    import torch.nn.functional as F

    from kdsweep.losses import LossSpec, SparseTeacher, distillation_loss, loss_sums

    tokens, vocab, (ids, log_probs) = h.shape[0], w.shape[0], (teacher.ids, teacher.log_probs)
    if variant == "naive_dense":
        logits = h @ w.t()
        full = torch.full((tokens, vocab), TAIL / (vocab - ids.shape[1]), device=h.device)
        full.scatter_(-1, ids, log_probs.exp())
        kl = F.kl_div(F.log_softmax(logits / TEMPERATURE, -1), full, reduction="sum") / tokens
        return (1 - ALPHA) * F.cross_entropy(logits, targets) + ALPHA * TEMPERATURE**2 * kl
    chunk = int(variant.split("_")[1]) if "chunked" in variant else tokens
    spec = LossSpec(alpha=ALPHA, temperature=TEMPERATURE, chunk_size=chunk)
    if variant == "naive_topk":
        return loss_sums(h @ w.t(), targets, teacher, spec).total(tokens)
    fn = lambda a, b: SparseTeacher(ids[a:b], log_probs[a:b])  # noqa: E731
    return distillation_loss(h, w, targets, fn, spec).total(tokens)


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, k: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h, w, targets, teacher = loss_inputs(tokens, vocab, hidden, k)

    def loss_once() -> torch.Tensor:
        return variant_loss(variant, h, w, targets, teacher)

    times, peaks = [], []
    for _ in range(repeats):
        h.grad = w.grad = None
        before = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        start = time.perf_counter()
        loss = loss_once()
        loss.backward()
        times.append(time.perf_counter() - start)
        peaks.append(_status_mb("VmHWM") - before)
        value, grad_norm = float(loss), float(torch.cat([h.grad.flatten(), w.grad.flatten()]).norm())
        del loss
    return {
        "variant": variant,
        "extra_peak_mb": min(peaks),
        "seconds": min(times),
        "loss": value,
        "grad_norm": grad_norm,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=8 * 512, help="batch x sequence (default 8 x 512)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunks", default="128,256,1024", help="chunk sizes of the chunked variants")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-naive-dense", action="store_true", help="it needs ~5 x N x V x 4 bytes of free memory")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = ap.parse_args()
    shape = dict(
        tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, k=args.k, repeats=args.repeats, threads=args.threads
    )
    if args.variant:
        print(json.dumps(run_variant(args.variant, **shape)))
        return

    import psutil

    variants = (
        ([] if args.skip_naive_dense else ["naive_dense"])
        + ["naive_topk"]
        + [f"chunked_{c}" for c in args.chunks.split(",")]
    )
    nv_mb = args.tokens * args.vocab * 4 / 2**20
    print(
        f"# bench/loss.py: V={args.vocab:,}, N={args.tokens:,} tokens, hidden {args.hidden}, top-{args.k}, "
        f"threads {args.threads}, best of {args.repeats}; one N x V fp32 tensor = {nv_mb:,.0f} MB"
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        flush=True,
    )
    results = []
    for v in variants:
        if v == "naive_dense" and psutil.virtual_memory().available < 6.5 * nv_mb * 2**20:
            print(
                f"# skipped {v}: needs ~{6.5 * nv_mb / 1024:.1f} GiB free, "
                f"{psutil.virtual_memory().available / 2**30:.1f} GiB available"
            )
            continue
        cmd = [sys.executable, __file__, "--variant", v] + [f"--{key}={val}" for key, val in shape.items()]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        )
        if proc.returncode:
            print(f"# {v} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"#   {v}: done", flush=True)

    ref = next((r for r in results if r["variant"] == "naive_dense"), results[0])
    print(f"\n| variant | extra peak MB | vs {ref['variant']} | time s | vs {ref['variant']} | loss | grad norm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['variant']} | {r['extra_peak_mb']:,.0f} | {100 * r['extra_peak_mb'] / ref['extra_peak_mb']:.1f}% "
            f"| {r['seconds']:.2f} | {r['seconds'] / ref['seconds']:.2f}x | {r['loss']:.5f} | {r['grad_norm']:.5f} |"
        )


if __name__ == "__main__":
    main()
