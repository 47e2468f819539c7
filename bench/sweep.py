"""Sweep benchmarks (issue 6): per-trial overhead, upstream recomputations, and whether pruning pays.

    python bench/sweep.py --make-demo      # time `make demo` (pipeline + demo sweep), then the rest
    python bench/sweep.py --repo DIR       # reuse a repository where `make demo` (or `dvc repro`) ran

Everything runs in a throwaway git + DVC repository (default: a new directory under /tmp)
built from this checkout's pipeline files, on the embedded default; nothing is run here.

- **overhead**: per trial, the wall time of its `dvc exp run` minus distill's training loop
  (`train_seconds`, which includes its evaluations): process start, imports, DVC (temporary
  copy, checkout, commit), Optuna, loading the cache and the student, saving it. Studies of
  short trials (8 steps) with 1 worker and with 2.
- **upstream recomputations**: "Running stage" lines of prepare/teacher/teacher_logits/student in
  every trial's log, and the runners' own count.
- **pruning pays**: the demo study (its pruner) against the same spec with `pruner: none`
  (same seed, same budget): best val_loss and total training steps.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UPSTREAM = ("prepare", "teacher", "teacher_logits", "student")
FILES = (
    "dvc.yaml",
    "params.yaml",
    "Makefile",
    "pyproject.toml",
    "README.md",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def env() -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def run(repo: Path, *cmd: str, log: Path | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if log:
        log.write_text(out)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}")
    return wall, out


def make_repo(work: Path) -> Path:
    """This checkout's pipeline in a fresh git repository (the venv linked, not copied)."""
    repo = work / "repo"
    shutil.copytree(ROOT / "kdsweep", repo / "kdsweep", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "experiments", repo / "experiments")
    for name in FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    (repo / ".venv").symlink_to(BIN.parent)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.name", "bench"],
        ["git", "config", "user.email", "bench@localhost"],
    ):
        subprocess.run(cmd, cwd=repo, check=True)
    (repo / ".git" / "info" / "exclude").write_text(".venv\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "bench"], cwd=repo, check=True, env=env())
    return repo


def study_spec(repo: Path, name: str, **changes) -> str:
    spec = yaml.safe_load((repo / "experiments" / "demo.yaml").read_text())
    spec.update(changes, study=name)
    path = repo / "experiments" / f"bench-{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path.relative_to(repo))


def trials(repo: Path, name: str) -> list:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(repo / "studies" / f"{name}.journal")))
    return optuna.load_study(study_name=name, storage=storage).trials


def recomputations(repo: Path, name: str, runner_output: str) -> tuple[int, int]:
    """(Running-stage lines of upstream stages in the trials' logs, the runner's own count)."""
    logs = "".join(p.read_text() for p in (repo / "studies" / name / "logs").glob("*.log"))
    in_logs = sum(len(re.findall(rf"Running stage '{s}'", logs)) for s in UPSTREAM)
    counted = sum(int(n) for n in re.findall(r"upstream recomputations: (\d+)", runner_output))
    return in_logs, counted


def overhead_rows(repo: Path, name: str, workers: int) -> list:
    """Per-trial overhead and where it goes; every column is a mean over the study's trials."""
    ts = [t for t in trials(repo, name) if "overhead_seconds" in t.user_attrs]

    def mean(key: str) -> float:
        return statistics.mean(t.user_attrs[key] for t in ts)

    o = [t.user_attrs["overhead_seconds"] for t in ts]
    setup, imports = mean("dvc_setup_seconds"), mean("distill_import_seconds")
    return [
        f"{workers}",
        len(ts),
        f"{statistics.mean(o):.2f}",
        f"{max(o):.2f}",
        f"{setup:.2f}",
        f"{imports:.2f}",
        f"{statistics.mean(o) - setup - imports:.2f}",
        f"{mean('train_seconds'):.2f}",
        "yes" if max(o) <= 5.0 else "no",
    ]


def summary(repo: Path, name: str) -> dict:
    ts = trials(repo, name)
    done = [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]
    complete = [t for t in ts if t.state.name == "COMPLETE"]
    times = [(t.datetime_start, t.datetime_complete) for t in done if t.datetime_complete]
    return {
        "trials": len(done),
        "complete": len(complete),
        "pruned": len(done) - len(complete),
        "failed": sum(t.state.name == "FAIL" for t in ts),
        "best": min(t.value for t in complete) if complete else float("nan"),
        "steps": sum(int(t.user_attrs.get("steps", 0)) for t in done),
        "span": (max(b for _, b in times) - min(a for a, _ in times)).total_seconds() if times else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, help="reuse this repository (its upstream stages reproduced)")
    ap.add_argument("--work", type=Path, default=None, help="where to build the repository (default: under /tmp)")
    ap.add_argument("--make-demo", action="store_true", help="time `make demo` in the new repository first")
    ap.add_argument("--trials", type=int, default=None, help="budget of the pruning comparison (default: the demo's)")
    args = ap.parse_args()

    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {platform.node()}, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; python {platform.python_version()}"
    )
    repo = args.repo
    results: list[tuple[str, str]] = []
    total_recomputed = [0, 0]
    if repo is None:
        work = args.work or Path(f"/tmp/kdsweep-bench-sweep-{int(time.time())}")
        work.mkdir(parents=True, exist_ok=True)
        repo = make_repo(work)
        print(f"repository: {repo}")
        if args.make_demo:
            wall, out = run(repo, "make", "-o", ".venv/.installed", "demo", log=work / "make-demo.log")
            results.append(("`make demo` (pipeline + demo sweep), minutes", f"{wall / 60:.1f}"))
            a, b = recomputations(repo, "demo", out)
            total_recomputed[0] += a
            total_recomputed[1] += b
            print(f"make demo: {wall / 60:.1f} min ({work / 'make-demo.log'})", flush=True)
        else:
            run(repo, "dvc", "repro", "student", "teacher_logits")

    spec = yaml.safe_load((repo / "experiments" / "demo.yaml").read_text())
    budget = {"n_trials": args.trials or spec["budget"]["n_trials"]}

    # Pruning pays: the demo study (its pruner) against no pruning, same seed and budget.
    if not (repo / "studies" / "demo.journal").exists() or args.trials:
        name = "demo" if not args.trials else "demo-pruned"
        wall, out = run(repo, str(BIN / "kdsweep"), "run", study_spec(repo, name, budget=budget))
        a, b = recomputations(repo, name, out)
        total_recomputed[0] += a
        total_recomputed[1] += b
        pruned_name = name
    else:
        pruned_name = "demo"
    wall, out = run(
        repo, str(BIN / "kdsweep"), "run", study_spec(repo, "demo-nopruning", pruner={"type": "none"}, budget=budget)
    )
    a, b = recomputations(repo, "demo-nopruning", out)
    total_recomputed[0] += a
    total_recomputed[1] += b
    p, n = summary(repo, pruned_name), summary(repo, "demo-nopruning")
    gap = (p["best"] - n["best"]) / n["best"]
    ratio = p["steps"] / n["steps"]

    # Overhead: short trials (8 steps, one evaluation), 1 worker (2 threads) and 2 workers (1 thread each).
    rows = []
    for workers, n_trials, threads in ((1, 4, None), (2, 6, 1)):
        name = f"overhead-{workers}w"
        (repo / "studies" / f"{name}.journal").unlink(missing_ok=True)  # a fresh study on every bench run
        shutil.rmtree(repo / "studies" / name, ignore_errors=True)
        spec_path = study_spec(
            repo,
            name,
            fixed={
                **spec["fixed"],
                "training.max_steps": 8,
                "training.eval_steps": 8,
                "training.logging_steps": 8,
                "training.warmup_steps": 2,
            },
            stage_layouts=None,
            baselines=[],
            pruner={"type": "none"},
            budget={"n_trials": n_trials},
            workers=workers,
            retention={"keep_best": 1},
            execution={"threads_per_trial": threads},
        )
        wall, out = run(repo, str(BIN / "kdsweep"), "run", spec_path)
        a, b = recomputations(repo, name, out)
        total_recomputed[0] += a
        total_recomputed[1] += b
        rows.append(overhead_rows(repo, name, workers))

    logs = list((repo / "studies").glob("*/logs/*.log"))
    all_logs = sum(len(re.findall(rf"Running stage '{s}'", p.read_text())) for p in logs for s in UPSTREAM)
    n_logs = len(logs)
    print()
    print(
        table(
            [
                "workers",
                "trials",
                "overhead mean (s)",
                "overhead max (s)",
                "DVC: temporary copy, checkout (s)",
                "distill process: start, imports, Optuna, load cache + student (s)",
                "rest: save, exit, DVC commit (s)",
                "training loop incl. evals (s)",
                "max <= 5 s",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            [
                "study (same seed, budget)",
                "trials",
                "complete",
                "pruned",
                "failed",
                "best val_loss",
                "total training steps",
                "first start to last end (s)",
            ],
            [
                [
                    f"{pruned_name} (pruner: {spec['pruner']['type']})",
                    p["trials"],
                    p["complete"],
                    p["pruned"],
                    p["failed"],
                    f"{p['best']:.4f}",
                    p["steps"],
                    f"{p['span']:.0f}",
                ],
                [
                    "demo-nopruning",
                    n["trials"],
                    n["complete"],
                    n["pruned"],
                    n["failed"],
                    f"{n['best']:.4f}",
                    n["steps"],
                    f"{n['span']:.0f}",
                ],
            ],
        )
    )
    print()
    results += [
        ("pruning: best val_loss vs no pruning", f"{gap:+.2%} (goal: within 1%) {'met' if gap <= 0.01 else 'NOT met'}"),
        ("pruning: training steps vs no pruning", f"{ratio:.0%} (goal: <= 50%) {'met' if ratio <= 0.5 else 'NOT met'}"),
        (
            "upstream recomputations: Running-stage lines in every trial log / runners' count",
            f"{all_logs} in {n_logs} trial logs / {total_recomputed[1]} (goal: 0)",
        ),
    ]
    print(table(["goal", "measured"], [list(r) for r in results]))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; repository: {repo}")
    (repo / "bench-sweep.json").write_text(
        json.dumps(
            {"rows": rows, "pruned": p, "nopruning": n, "results": results},
            default=str,
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
