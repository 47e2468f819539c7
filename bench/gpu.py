"""GPU benchmark (issue 9): one table, at most 8 minutes on one GPU. Run it through ``bench/gpu.sh``.

    bash bench/gpu.sh                 # on a GPU machine: real sizes, bf16
    bash bench/gpu.sh --cpu-smoke     # every part at tiny sizes on the CPU: the script works

The smoke run is meant to take under 2 minutes; on a shared, loaded CPU the study part's tiny
pipeline (four stage processes, then two trials) takes longer, so its limit there is 7 minutes.

Parts, each in its own subprocess with its own time limit (a part that fails or runs out of
time gets a row that says so, and the others still run):

* ``loss``: the KD loss, forward + backward, at V = 151,936 and 8 x 512 tokens under bf16
  autocast: the naive full-vocabulary path against kdsweep's chunked loss (``bench/loss.py``'s
  variants ``naive_dense`` and ``chunked_256``). Peak memory is ``torch.cuda.max_memory_allocated``
  minus what was allocated before the loss (inputs not counted, gradients counted).
* ``cache``: cache generation against the teacher forward it rides on. A randomly initialised
  Qwen3 teacher (hidden 2,048, V = 151,936, bf16 weights): decoder once, then the LM head per
  chunk of positions (the cache's chunking), with and without the cache's per-position summary
  (``summarize_logits``: top-k, tail normaliser on the temperature grid) and its copy to the host.
* ``distill``: distillation steps (forward, chunked KD loss against a top-64 teacher, backward,
  AdamW) of a ~600M-parameter Qwen3 student (Qwen3-0.6B's shape) in bf16 autocast: tokens/s and
  model-FLOPs utilisation, 6 * parameters * tokens against the device's dense bf16 peak
  (attention's own FLOPs not counted, so MFU is slightly understated).
* ``study``: ``kdsweep run`` of a 2-trial study in a temporary copy of this repository on the
  tests' tiny pipeline (``tests/helpers.py``); the trials' distill runs on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdsweep.cache.format import summarize_logits, temperature_grid
from kdsweep.cache.writer import summary_chunk_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss import loss_inputs, sparse_teacher, variant_loss

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class Sizes:
    """Every size the parts use; ``FULL`` on a GPU, ``SMOKE`` for the CPU dry run."""

    vocab: int
    batch: int
    seq_len: int
    loss_hidden: int
    chunk: int
    top_k: int
    teacher_hidden: int
    teacher_layers: int
    teacher_intermediate: int
    student_hidden: int
    student_layers: int
    student_intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    steps: int
    repeats: int


FULL = Sizes(151_936, 8, 512, 2048, 256, 64, 2048, 4, 6144, 1024, 28, 3072, 16, 8, 128, 8, 3)
SMOKE = Sizes(4096, 2, 64, 64, 32, 16, 64, 2, 128, 64, 2, 128, 4, 2, 16, 2, 2)
LIMITS = {"loss": 90, "cache": 90, "distill": 150, "study": 120}  # seconds; 450 in all, under gpu.sh's 480
SMOKE_STUDY_LIMIT = 420  # a shared, loaded CPU can take minutes for the tiny pipeline's four stage processes


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up, in seconds (kernels loaded, allocator warm)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - start)
    return best


def peak_extra_mb(fn, dev: torch.device) -> float | None:
    """Peak device memory ``fn`` allocates beyond what existed before it; None on the CPU."""
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - before) / 2**20


def mb(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:,.0f} MB"


def qwen3(hidden: int, layers: int, intermediate: int, s: Sizes, dtype: torch.dtype, dev: torch.device, tied: bool):
    """A randomly initialised Qwen3 (dense) causal LM, built directly on the device."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=s.vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        max_position_embeddings=s.seq_len,
        tie_word_embeddings=tied,
    )
    with dev:
        return Qwen3ForCausalLM(config).to(dtype)


# --------------------------------------------------------------------------- parts
def part_loss(s: Sizes, dev: torch.device) -> list[list[str]]:
    tokens = s.batch * s.seq_len
    inputs = loss_inputs(tokens, s.vocab, s.loss_hidden, s.top_k, dev)
    results = {}
    for variant in ("naive_dense", f"chunked_{s.chunk}"):

        def step(variant=variant):
            inputs[0].grad = inputs[1].grad = None
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = variant_loss(variant, *inputs)
            loss.backward()

        results[variant] = (peak_extra_mb(step, dev), timed(step, dev, s.repeats))
    (naive_mb, naive_s), (chunk_mb, chunk_s) = results.values()
    shape = f"V={s.vocab:,}, {s.batch}x{s.seq_len} tokens, hidden {s.loss_hidden}, bf16 autocast"
    share = f" ({100 * chunk_mb / naive_mb:.1f}% of naive)" if naive_mb else ""
    return [
        ["loss", f"naive full-vocabulary, fwd+bwd ({shape})", f"{mb(naive_mb)}; {1000 * naive_s:.1f} ms", ""],
        [
            "loss",
            f"chunked (chunk {s.chunk}, top-{s.top_k} + tail)",
            f"{mb(chunk_mb)}{share}; {1000 * chunk_s:.1f} ms",
            f"time {chunk_s / naive_s:.2f}x naive",
        ],
    ]


def part_cache(s: Sizes, dev: torch.device) -> list[list[str]]:
    dtype = torch.bfloat16
    teacher = qwen3(s.teacher_hidden, s.teacher_layers, s.teacher_intermediate, s, dtype, dev, tied=False).eval()
    ids = torch.randint(0, s.vocab, (s.batch, s.seq_len), device=dev)
    betas = 1.0 / temperature_grid(1.0, 4.0, 8)
    chunk = summary_chunk_tokens(s.vocab, dev.type)  # the cache writer's chunk on this device
    head = teacher.get_output_embeddings()

    @torch.no_grad()
    def forward(summarize: bool):
        hidden = teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.reshape(-1, s.teacher_hidden)
        for start in range(0, hidden.shape[0], chunk):
            logits = head(hidden[start : start + chunk])
            if summarize:
                for value in summarize_logits(logits, s.top_k, betas).values():
                    value.cpu()  # the writer needs them on the host

    t_fwd = timed(lambda: forward(False), dev, s.repeats)
    t_gen = timed(lambda: forward(True), dev, s.repeats)
    tokens = s.batch * s.seq_len
    params = sum(p.numel() for p in teacher.parameters()) / 1e6
    what = f"{s.teacher_layers}-layer Qwen3, hidden {s.teacher_hidden}, V={s.vocab:,}, {params:,.0f}M params, bf16"
    return [
        ["cache", f"teacher forward, {tokens:,} tokens ({what})", f"{1000 * t_fwd:.1f} ms", f"chunk {chunk} positions"],
        [
            "cache",
            f"teacher forward + cache summary (top-{s.top_k}, grid 8) + copy to host",
            f"{1000 * t_gen:.1f} ms",
            f"overhead {100 * (t_gen / t_fwd - 1):.0f}%, {1e6 * (t_gen - t_fwd) / tokens:.2f} us/token",
        ],
    ]


def peak_flops(dev: torch.device) -> tuple[str, float | None]:
    if dev.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(dev)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def part_distill(s: Sizes, dev: torch.device) -> list[list[str]]:
    from kdsweep.losses import LossSpec, SparseTeacher, student_loss

    student = qwen3(s.student_hidden, s.student_layers, s.student_intermediate, s, torch.float32, dev, tied=True)
    student.train()
    n_params = sum(p.numel() for p in student.parameters())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ids = torch.randint(0, s.vocab, (s.batch, s.seq_len), device=dev)
    teacher = sparse_teacher(s.batch * (s.seq_len - 1), s.vocab, s.top_k, dev)
    spec = LossSpec(alpha=0.5, temperature=2.0, chunk_size=s.chunk)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = student_loss(student, ids, lambda a, b: SparseTeacher(teacher.ids[a:b], teacher.log_probs[a:b]), spec)
        out.total(out.num_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state is allocated in the first step
    seconds = timed(lambda: [step() for _ in range(s.steps)], dev, 1) / s.steps
    tokens = s.batch * s.seq_len
    name, peak = peak_flops(dev)
    achieved = 6 * n_params * tokens / seconds
    mfu = f"{100 * achieved / peak:.1f}%" if peak else "unknown (device not in the peak table)"
    memory = mb(torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None)
    return [
        [
            "distill",
            f"step of a {n_params / 1e6:,.1f}M-param Qwen3 student, {s.batch}x{s.seq_len} tokens, bf16 autocast, AdamW",
            f"{tokens / seconds:,.0f} tokens/s; {1000 * seconds:.0f} ms/step",
            f"mean of {s.steps} steps; peak memory {memory}",
        ],
        ["distill", f"model-FLOPs utilisation (6 N tokens) on {name}", mfu, f"{achieved / 1e12:.1f} TFLOP/s achieved"],
    ]


def part_study(s: Sizes, dev: torch.device) -> list[list[str]]:
    work = Path(tempfile.mkdtemp(prefix="kdsweep-bench-gpu-"))
    try:
        return study_rows(work, dev)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def study_rows(work: Path, dev: torch.device) -> list[list[str]]:
    """A 2-trial ``kdsweep run`` in a new repository under ``work``: wall time, states, overhead."""
    import yaml
    from sweep import BIN, make_repo, run, trials

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_params_dict

    repo = make_repo(work)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    run(repo, "git", "commit", "-q", "-am", "tiny pipeline")
    upstream_s, _ = run(repo, "dvc", "repro", "student", "teacher_logits")
    spec = {
        "study": "gpu",
        "fixed": {"training.max_steps": 8, "training.eval_steps": 4, "training.bf16": dev.type == "cuda"},
        "space": {"loss.alpha": {"type": "float", "low": 0.1, "high": 0.9}},
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "none"},
        "budget": {"n_trials": 2},
        "workers": 1,
    }
    (repo / "experiments" / "gpu.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    study_s, out = run(repo, str(BIN / "kdsweep"), "run", "experiments/gpu.yaml")
    done = trials(repo, "gpu")
    states = ", ".join(f"{t.number}: {t.state.name.lower()}" for t in done)
    overhead = [t.user_attrs["overhead_seconds"] for t in done if "overhead_seconds" in t.user_attrs]
    _, where = run(repo, sys.executable, "-c", "from kdsweep.models import default_device; print(default_device())")
    recomputed = out.split("upstream recomputations: ")[-1].split(";")[0] if "recomputations" in out else "?"
    return [
        [
            "study",
            f"`kdsweep run`, 2 trials x 8 steps, tiny pipeline, trials on {where.strip()}",
            f"{study_s:.1f} s",
            f"trials {states}; overhead/trial {sum(overhead) / max(len(overhead), 1):.1f} s; "
            f"upstream recomputations {recomputed}; upstream `dvc repro` {upstream_s:.0f} s",
        ]
    ]


PARTS = {"loss": part_loss, "cache": part_cache, "distill": part_distill, "study": part_study}


# --------------------------------------------------------------------------- driver
def start_part(name: str, smoke: bool) -> tuple[subprocess.Popen, float]:
    """One part in a fresh process: no allocator state or memory peak carries over between parts."""
    cmd = [sys.executable, __file__, "--part", name] + (["--cpu-smoke"] if smoke else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, time.perf_counter()


def finish_part(name: str, proc: subprocess.Popen, started: float, limit: float) -> list[list[str]]:
    """The part's rows, or one row saying it failed or ran out of its time limit."""
    try:
        out, err = proc.communicate(timeout=max(1.0, limit - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):  # kdsweep run, dvc, distill
            child.kill()
        proc.kill()
        proc.communicate()
        return [[name, "timed out", f"> {limit:.0f} s", "no result"]]
    took = f"part took {time.perf_counter() - started:.0f} s"
    if proc.returncode != 0:
        last = (err or out).strip().splitlines()[-1:] or ["no output"]
        return [[name, f"failed (exit {proc.returncode})", "-", f"{last[0][:200]}; {took}"]]
    return [[*r[:3], f"{r[3]}; {took}" if r[3] else took] for r in json.loads(out.strip().splitlines()[-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # internal: one part, print JSON
    args = ap.parse_args()
    sizes = SMOKE if args.cpu_smoke else FULL
    dev = torch.device("cpu") if args.cpu_smoke else device()
    if args.part:
        torch.manual_seed(0)
        print(json.dumps(PARTS[args.part](sizes, dev)))
        return
    if dev.type != "cuda" and not args.cpu_smoke:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --cpu-smoke to check the script on the CPU")
    name, _ = peak_flops(dev)
    mode = "CPU smoke run (tiny sizes; not a GPU result)" if args.cpu_smoke else f"GPU run on {name}"
    print(f"# bench/gpu.sh: {mode}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"# {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"# sizes: {json.dumps(asdict(sizes))}", flush=True)
    # The smoke run overlaps the study with the other parts (its numbers are not results); a GPU
    # run measures one part at a time.
    early = {"study": start_part("study", True)} if args.cpu_smoke else {}
    limits = {**LIMITS, "study": SMOKE_STUDY_LIMIT} if args.cpu_smoke else LIMITS
    rows = []
    for part in PARTS:
        rows += finish_part(part, *(early.get(part) or start_part(part, args.cpu_smoke)), limits[part])
    print("\n| part | what | result | notes |\n|---|---|---|---|")
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))


if __name__ == "__main__":
    main()
