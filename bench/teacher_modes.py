"""Step throughput of distillation from the teacher-logit cache vs with the live teacher.

    .venv/bin/python bench/teacher_modes.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python bench/teacher_modes.py --steps 6 --rounds 1 --quick   # a smoke run

Builds a throwaway pipeline in a temporary directory with the real stages: ``prepare``
(builtin corpus, vocab 4096, 128 tokens), the embedded ``teacher`` at a larger shape
(trained for one step: speed does not depend on its weights), its top-64 ``teacher_logits``
cache, and a smaller Qwen3-MoE student saved with ``save_pretrained``. Then it runs
``kdsweep.stages.distill.main`` unchanged for the same steps: for a student trained in fp32
(``training.bf16: false``, the CPU default) and one under bf16 autocast (``bf16: true``, the
reference's setting), from the cache and with the live teacher, which runs in bf16
(``teacher.dtype: bfloat16``; ``auto`` would be fp32 on a CPU) and, for the all-fp32
comparison, in fp32. Throughput is tokens/s of the training steps (``plots/distill/train.csv``,
which excludes evaluation), without the first logging window (warm-up). The modes run in
``--rounds`` interleaved rounds and each keeps its best round, so load from other processes on
a shared machine moves the ratios less. The speed-up compares each mode with the cached mode of the same student
precision.

Compute is counted as forward FLOPs per token = 2 x active parameters (attention and
router, the routed experts' share, the LM head); attention scores are left out (128 tokens).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from contextlib import chdir, redirect_stderr, redirect_stdout
from pathlib import Path

TEACHER = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 512,
}
STUDENT = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
}


def active_params_per_token(arch: dict, vocab: int) -> int:
    """Weights a token passes through: attention, router, top-k of the experts, LM head."""
    h, d = arch["hidden_size"], arch["head_dim"]
    attn = h * d * (2 * arch["num_attention_heads"] + 2 * arch["num_key_value_heads"])
    experts = arch["num_experts_per_tok"] * 3 * h * arch["moe_intermediate_size"]
    return arch["num_hidden_layers"] * (attn + h * arch["num_experts"] + experts) + h * vocab


def tokens_per_s(train_csv: Path) -> float:
    with train_csv.open() as f:
        rows = list(csv.DictReader(f))
    rows = rows[1:] or rows  # the first window pays warm-up
    return sum(float(r["tokens_per_s"]) for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller models (a smoke run, not the benchmark)")
    args = ap.parse_args()

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from kdsweep.config import validate
    from kdsweep.stages import distill, prepare, teacher, teacher_logits

    torch.set_num_threads(args.threads)
    teacher_arch, student_arch = dict(TEACHER), dict(STUDENT)
    if args.quick:
        teacher_arch.update(hidden_size=128, num_hidden_layers=2, moe_intermediate_size=128)
        student_arch.update(hidden_size=64, num_hidden_layers=1, moe_intermediate_size=64)
    base = {
        "dataset": {"max_samples": 24},
        "teacher": {"arch": teacher_arch, "train": {"max_steps": 1}, "top_k": 64},
        "training": {
            "max_steps": args.steps,
            "per_device_train_batch_size": 8,
            "logging_steps": 5,
            "eval_steps": 10**6,
            "eval_max_batches": 1,
            "threads": args.threads,
            "warmup_steps": 2,
        },
        "parameter_lr_multipliers": [{"pattern": ".*", "lr_multiplier": 1.0}],
    }
    live = {"use_cached_logits": False, "dtype": "bfloat16"}
    modes = [
        ("fp32", "cache", {}, "-"),
        ("fp32", "live", {"teacher": live}, "bf16"),
        ("fp32", "live", {"teacher": {**live, "dtype": "float32"}}, "fp32"),
        ("bf16", "cache", {"training": {"bf16": True}}, "-"),
        ("bf16", "live", {"teacher": live, "training": {"bf16": True}}, "bf16"),
    ]
    root = Path(tempfile.mkdtemp(prefix="kdsweep-bench-"))
    log = (root / "stages.log").open("w")
    print(
        f"# bench/teacher_modes.py --steps {args.steps} --rounds {args.rounds} --threads {args.threads}"
        f"{' --quick' if args.quick else ''}"
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; pipeline in {root}",
        flush=True,
    )

    def merge(a: dict, b: dict) -> dict:
        return {
            k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
            for k, v in {**a, **b}.items()
        }

    params = validate(base)
    with chdir(root), redirect_stdout(log), redirect_stderr(log):
        prepare.main(params)
        teacher.main(params)
        teacher_logits.main(params)
        vocab = int(__import__("json").loads(Path("data/prepared/meta.json").read_text())["tokenizer"]["vocab_size"])
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                vocab_size=vocab,
                intermediate_size=2 * student_arch["moe_intermediate_size"],
                tie_word_embeddings=False,
                **student_arch,
            )
        ).save_pretrained("models/student_init")
    t_flops, s_flops = (2 * active_params_per_token(a, vocab) for a in (teacher_arch, student_arch))
    print(
        f"# teacher {t_flops / 1e6:.1f} MFLOP/token forward, student {s_flops / 1e6:.1f}: "
        f"teacher = {t_flops / s_flops:.1f}x the student's compute",
        flush=True,
    )

    best = [0.0] * len(modes)
    for r in range(args.rounds):
        for i, (student_dtype, name, override, dtype) in enumerate(modes):
            with chdir(root), redirect_stdout(log), redirect_stderr(log):
                distill.main(validate(merge(base, override)), run_dir=root / "runs" / f"{student_dtype}-{name}-{dtype}")
            tps = tokens_per_s(root / "plots/distill/train.csv")
            best[i] = max(best[i], tps)
            print(f"#   round {r + 1}: student {student_dtype}, {name} {dtype}: {tps:,.0f} tokens/s", flush=True)
    results = [(s, name, dtype, tps) for (s, name, _, dtype), tps in zip(modes, best)]

    cached = {s: tps for s, name, _, tps in results if name == "cache"}
    print("\n| student | teacher | live teacher dtype | tokens/s | s/step (8 x 127 tokens) | cache speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for student_dtype, name, dtype, tps in results:
        print(
            f"| {student_dtype} | {name} | {dtype} | {tps:,.0f} | {8 * 127 / tps:.3f} | "
            f"{cached[student_dtype] / tps:.2f}x |"
        )


if __name__ == "__main__":
    main()
