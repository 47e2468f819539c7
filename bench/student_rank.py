"""Validation loss of the compressed student against wrapper rank, before and after distillation.

Runs on the embedded default's outputs (run `dvc repro student` first): for each rank, build
the student from models/teacher, evaluate it, distill it with params.yaml's settings (capped
at --steps), evaluate again, and print a table; also writes a PNG curve.

    python bench/student_rank.py --ranks 2 4 8 16 32 --steps 100 --png bench/student_rank.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kdsweep.config import load_params, validate
from kdsweep.stages import distill, student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--png", default="bench/student_rank.png")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_params(args.params).model_dump(mode="json")
    rows = []
    for rank in args.ranks:
        cfg = json.loads(json.dumps(base))
        cfg["student"]["wrapper_rank"] = rank
        cfg["training"].update(max_steps=args.steps, eval_steps=args.steps, logging_steps=args.steps)
        params = validate(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            s = student.main(params, out=tmp / "init", metrics_path=tmp / "student.json")
            m = distill.main(
                params,
                student_dir=tmp / "init",
                out=tmp / "student",
                metrics_path=tmp / "d.json",
                plots_dir=tmp / "plots",
                run_dir=tmp / "runs",
                checkpoint_dir=tmp / "ckpt",
            )
            init = [float(x) for x in (tmp / "plots/eval.csv").read_text().splitlines()[1].split(",")]
        rows.append(
            {
                "rank": rank,
                "expert_ratio": s["expert_parameter_ratio"],
                "params": s["student"]["total"],
                "teacher_val": s["val_loss"]["teacher"],
                "random_init_val": s["val_loss"].get("random_init_student"),
                "init_val": init[1],
                "init_kl": init[2],
                "distilled_val": m["val_loss"],
                "distilled_kl": m["val_kl"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    header = (
        "rank",
        "expert params",
        "student params",
        "val CE init",
        "val CE distilled",
        "val KL init",
        "val KL distilled",
        "random-init val CE",
        "teacher val CE",
        "seconds",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['rank']} | {r['expert_ratio']:.1%} | {r['params']:,} | {r['init_val']:.4f} | "
            f"{r['distilled_val']:.4f} | {r['init_kl']:.4f} | {r['distilled_kl']:.4f} | "
            f"{r['random_init_val']:.4f} | {r['teacher_val']:.4f} | {r['seconds']} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = [r["rank"] for r in rows]
    ax.plot(ranks, [r["init_val"] for r in rows], "o--", label="student at initialisation")
    ax.plot(ranks, [r["distilled_val"] for r in rows], "o-", label=f"after {args.steps} distillation steps")
    ax.axhline(rows[0]["teacher_val"], color="k", lw=0.8, label="teacher")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("wrapper rank")
    ax.set_ylabel("validation CE (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
