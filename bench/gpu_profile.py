"""Where the GPU time of the KD loss and of the cache summary goes: chunk sizes and a profile.

    python bench/gpu_profile.py               # on one GPU (about 2 minutes)
    python bench/gpu_profile.py --cpu-smoke   # tiny sizes on the CPU: checks that the script runs

``bench/gpu.sh`` found, on an H200, the chunked loss at 2.38x the naive path's time and the cache
summary at 41x the teacher forward. This script measures, at the same sizes:

* ``loss``: time and extra peak memory of ``kdsweep.losses`` at several ``chunk_size`` values
  against the naive full-vocabulary path (``bench/loss.py``'s variants), forward + backward
  under bf16 autocast; then the profiler's top operators of the chunk-256 loss.
* ``summary``: ``summarize_logits`` (top-64, 8-point grid) over 4,096 positions of bf16 logits
  cut into chunks of several sizes, each with and without the copy of its arrays to the host;
  then the profiler's top operators of the cache's default chunk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import sync, timed
from loss import loss_inputs, variant_loss

from kdsweep.cache.format import summarize_logits, temperature_grid


def peak_mb(fn, dev: torch.device) -> str:
    if dev.type != "cuda":
        return "n/a"
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return f"{(torch.cuda.max_memory_allocated(dev) - before) / 2**20:,.0f} MB"


def top_ops(fn, dev: torch.device, n: int = 8) -> str:
    """The profiler's ``n`` most expensive operators of one call, by device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=48)


def loss_part(tokens: int, vocab: int, hidden: int, k: int, chunks: list[int], dev: torch.device) -> None:
    inputs = loss_inputs(tokens, vocab, hidden, k, dev)

    def step(variant: str):
        inputs[0].grad = inputs[1].grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = variant_loss(variant, *inputs)
        loss.backward()

    print(f"\n## loss, fwd+bwd, V={vocab:,}, {tokens:,} tokens, hidden {hidden}, top-{k}, bf16 autocast\n")
    print("| variant | time | extra peak memory |\n|---|---|---|")
    for variant in ["naive_dense"] + [f"chunked_{c}" for c in chunks]:
        mem = peak_mb(lambda v=variant: step(v), dev)
        print(f"| {variant} | {1000 * timed(lambda v=variant: step(v), dev, 3):.1f} ms | {mem} |", flush=True)
    print(f"\nTop operators of chunked_{chunks[0]}:\n```\n{top_ops(lambda: step(f'chunked_{chunks[0]}'), dev)}\n```")


def summary_part(tokens: int, vocab: int, k: int, rows: list[int], dev: torch.device) -> None:
    logits = torch.randn(tokens, vocab, device=dev).mul_(3).to(torch.bfloat16)
    betas = 1.0 / temperature_grid(1.0, 4.0, 8)

    def run(chunk: int, to_host: bool):
        for start in range(0, tokens, chunk):
            out = summarize_logits(logits[start : start + chunk], k, betas)
            if to_host:
                for value in out.values():
                    value.cpu()

    print(f"\n## cache summary, {tokens:,} positions, V={vocab:,}, top-{k}, grid 8, bf16 logits\n")
    print("| chunk (positions) | summary only | summary + copy to host |\n|---|---|---|")
    for chunk in rows:
        bare, host = timed(lambda c=chunk: run(c, False), dev, 3), timed(lambda c=chunk: run(c, True), dev, 3)
        print(f"| {chunk:,} | {1000 * bare:.1f} ms | {1000 * host:.1f} ms |", flush=True)
    print(f"\nTop operators of one chunk of {rows[0]} positions:\n```")
    print(top_ops(lambda: summarize_logits(logits[: rows[0]], k, betas), dev) + "\n```")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# bench/gpu_profile.py on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    torch.manual_seed(0)
    if args.cpu_smoke:
        loss_part(256, 4096, 64, 16, [32, 128], dev)
        summary_part(256, 4096, 16, [64, 256], dev)
    else:
        loss_part(4096, 151_936, 2048, 64, [256, 1024, 4096], dev)
        summary_part(4096, 151_936, 64, [2**24 // 151_936, 2**27 // 151_936, 1024, 4096], dev)


if __name__ == "__main__":
    main()
