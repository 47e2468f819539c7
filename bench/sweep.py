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

- **levers** (``--levers``): the 1-worker overhead with DVC's cache copied, then linked
  (``cache.type``), then with warm trial processes (``execution.warm_start``), and what the final
  checkpoint and loading cost in each.
- **scale** (``--scale [--trials 200]``): trials of 2 steps, 1 worker, retention on; the overhead
  per band of 20 trials; the wall time of ``kdsweep status``, ``best``, ``report`` and of the
  ``dvc exp show`` command the runner prints, at 10, 50 and the last trial count; the bytes
  ``.git`` and ``.dvc/cache`` grew by per trial.
- **end to end** (``--end-to-end``, also part of the default run): a 6-trial study of 2-step
  trials with 1 worker, ``kdsweep run``'s whole wall time / 6, with the load average.

    python bench/sweep.py --repo DIR --overhead     # only the overhead tables
    python bench/sweep.py --repo DIR --scale --trials 40

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
        f"{mean('distill_save_seconds'):.2f}",
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


def load() -> str:
    """The 1-minute load average, for every timed number (the machine is shared)."""
    return f"{os.getloadavg()[0]:.2f}"


def short_spec(repo: Path, base: dict, name: str, *, steps: int, n_trials: int, workers: int, **changes) -> str:
    """A fresh study (its journal and logs removed) of ``n_trials`` trials of ``steps`` steps, no pruning."""
    (repo / "studies" / f"{name}.journal").unlink(missing_ok=True)
    shutil.rmtree(repo / "studies" / name, ignore_errors=True)
    return study_spec(
        repo,
        name,
        fixed={
            **base["fixed"],
            "training.max_steps": steps,
            "training.eval_steps": steps,
            "training.logging_steps": steps,
            "training.warmup_steps": min(2, steps - 1),
            # one batch per evaluation: evaluations count as training, not overhead, and would
            # otherwise take most of a short trial's time on a loaded machine
            "training.eval_max_batches": 1,
        },
        stage_layouts=None,
        baselines=[],
        pruner={"type": "none"},
        budget={"n_trials": n_trials},
        workers=workers,
        **changes,
    )


def set_cache_type(repo: Path, kind: str) -> None:
    """``cache.type`` of the bench repository, committed: ``--temp`` trial copies read the committed config."""
    run(repo, "dvc", "config", "cache.type", kind)
    subprocess.run(["git", "commit", "-q", "-m", kind, ".dvc/config"], cwd=repo, env=env(), capture_output=True)


def overhead_study(
    repo: Path, base: dict, name: str, workers: int, threads: int | None, warm: bool = True, steps: int = 8
) -> list:
    """Short trials (``steps`` steps, one evaluation): the overhead row of ``name``."""
    spec_path = short_spec(
        repo,
        base,
        name,
        steps=steps,
        n_trials=(4 if workers == 1 else 6) if steps == 8 else 3,
        workers=workers,
        retention={"keep_best": 1},
        execution={"threads_per_trial": threads, "warm_start": warm},
    )
    run(repo, str(BIN / "kdsweep"), "run", spec_path)
    return overhead_rows(repo, name, workers)


OVERHEAD_HEADER = [
    "workers",
    "trials",
    "overhead mean (s)",
    "overhead max (s)",
    "DVC: temporary copy, checkout (s)",
    "distill process: start, imports, Optuna, load cache + student (s)",
    "rest: save, exit, DVC commit (s)",
    "training loop incl. evals (s)",
    "of the rest: saving model + checkpoint (s)",
    "goal (<= 3 s at 1 worker, <= 4 s at 2)",
    "load",
]


def overhead(repo: Path, base: dict) -> list:
    """The overhead table as the issue measures it: 1 worker (2 threads) and 2 workers (1 thread each)."""
    rows = []
    for workers, threads, goal in ((1, None, 3.0), (2, 1, 4.0)):
        row = overhead_study(repo, base, f"overhead-{workers}w", workers, threads)
        rows.append(row + ["met" if float(row[2]) <= goal else "NOT met", load()])
    print(table(OVERHEAD_HEADER, rows), flush=True)
    return rows


def levers(repo: Path, base: dict) -> list:
    """Each lever's share of the 1-worker overhead: copied cache and cold processes, then links, then warm
    (3 trials of 2 steps each: the overhead leaves the training loop out)."""
    rows = []
    for label, kind, warm in (
        ("cache copied, cold process", "copy", False),
        ("cache linked, cold process", "hardlink,symlink", False),
        ("cache linked, warm process", "hardlink,symlink", True),
    ):
        set_cache_type(repo, kind)
        row = overhead_study(repo, base, f"lever-{len(rows)}", 1, None, warm, steps=2)
        rows.append([label] + row[1:] + [load()])
    set_cache_type(repo, "hardlink,symlink")
    print(table(["configuration (1 worker)"] + OVERHEAD_HEADER[1:-2] + ["load"], rows), flush=True)
    return rows


def end_to_end(repo: Path, base: dict) -> dict:
    """A 6-trial study of 2-step trials, 1 worker: the whole ``kdsweep run`` wall time per trial."""
    before = load()
    spec_path = short_spec(repo, base, "e2e", steps=2, n_trials=6, workers=1, retention={"keep_best": 3})
    wall, _ = run(repo, str(BIN / "kdsweep"), "run", spec_path)
    complete = sum(t.state.name == "COMPLETE" for t in trials(repo, "e2e"))
    out = {"per_trial": wall / 6, "wall": wall, "complete": complete, "load_before": before, "load_after": load()}
    met = "met" if wall / 6 <= 4 and complete == 6 else "NOT met"
    print(
        f"end to end: 6 trials of 2 steps, 1 worker, {complete} complete: {wall:.1f} s, {wall / 6:.2f} s per trial "
        f"(goal <= 4 s: {met}); load average {before} before, {out['load_after']} after",
        flush=True,
    )
    return out


def du(path: Path) -> int:
    """Bytes under ``path`` (files counted once per inode: the cache's hard links are not double-counted)."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def timed_commands(repo: Path, name: str, spec_path: str) -> dict[str, float]:
    """Wall time of ``kdsweep status``, ``best``, ``report`` and of the ``dvc exp show`` the runner prints."""
    from kdsweep.sweep.results import exp_show_command

    out = {}
    # The first `best` after new trials evaluates the kept best trials on the test split (once; stored).
    for label, command in (("status", "status"), ("best, first", "best"), ("best", "best"), ("report", "report")):
        out[label] = run(repo, str(BIN / "kdsweep"), command, spec_path)[0]
    cwd = os.getcwd()
    os.chdir(repo)  # the study's storage path is relative to the repository
    try:
        show = exp_show_command(spec_path)
    finally:
        os.chdir(cwd)
    out["dvc exp show"] = run(repo, "bash", "-c", show)[0]
    return out


def scale(repo: Path, base: dict, n_trials: int) -> dict:
    """Trials of 2 steps, 1 worker, retention on, run in legs to 10, 50 and ``n_trials`` trials."""
    name = "scale"
    # Micro-batches of 2 sequences: what a trial trains does not matter here, only what surrounds it.
    small = {**base, "fixed": {**base["fixed"], "training.per_device_train_batch_size": 2}}
    spec_path = short_spec(repo, small, name, steps=2, n_trials=n_trials, workers=1, retention={"keep_best": 3})
    git0, cache0 = du(repo / ".git"), du(repo / ".dvc" / "cache")
    points, disk = {}, {}
    for n in sorted({min(10, n_trials), min(50, n_trials), n_trials}):
        run(repo, str(BIN / "kdsweep"), "run", spec_path, "--n-trials", str(n))
        git, cache = du(repo / ".git") - git0, du(repo / ".dvc" / "cache") - cache0
        disk[n] = {"git_per_trial": git / n, "cache_per_trial": cache / n}
        points[n] = timed_commands(repo, name, spec_path) | {"load": load()}
        print(f"scale: {n} trials; {points[n]}; {disk[n]}", flush=True)
    ts = sorted((t for t in trials(repo, name) if "overhead_seconds" in t.user_attrs), key=lambda t: t.number)
    # The runner's own time between one trial's end and the next one's start (1 worker): bookkeeping, retention.
    # (Not across the pauses at 10 and 50 trials, where the commands above ran.)
    gaps = {
        b.number: (b.datetime_start - a.datetime_complete).total_seconds()
        for a, b in zip(ts, ts[1:])
        if b.number not in points
    }
    bands = []
    for lo in range(0, len(ts), 20):
        band = ts[lo : lo + 20]
        o = [t.user_attrs["overhead_seconds"] for t in band]
        g = [gaps[t.number] for t in band if t.number in gaps]
        bands.append(
            [f"{lo + 1}-{lo + len(band)}", f"{statistics.mean(o):.2f}", f"{max(o):.2f}"]
            + [f"{statistics.mean(t.user_attrs['wall_seconds'] for t in band):.2f}"]
            + [f"{statistics.mean(g):.2f}" if g else "-"]
        )
    first, last = float(bands[0][1]), float(bands[-1][1])
    header = ["trials", "overhead mean (s)", "overhead max (s)", "`dvc exp run` wall (s)", "runner between trials (s)"]
    print(table(header, bands))
    print(f"last band against the first: {last / first - 1:+.0%} (goal: within 20%)")
    rows = [[n] + [f"{v:.2f}" for k, v in p.items() if k != "load"] + [p["load"]] for n, p in points.items()]
    header = ["trials", "status (s)", "best, first: test-split evaluations (s)", "best (s)", "report (s)"]
    print(table(header + ["dvc exp show (s)", "load"], rows))
    rows = [[n, f"{d['git_per_trial'] / 1e3:.0f}", f"{d['cache_per_trial'] / 1e3:.0f}"] for n, d in disk.items()]
    print(table(["trials", ".git growth per trial (kB)", ".dvc/cache growth per trial (kB)"], rows))
    return {"bands": bands, "commands": points, "disk": disk}


def pruning(repo: Path, spec: dict, n_trials: int | None) -> tuple[str, dict, dict]:
    """The demo study (its pruner) against no pruning, same seed and budget."""
    budget = {"n_trials": n_trials or spec["budget"]["n_trials"]}
    if not (repo / "studies" / "demo.journal").exists() or n_trials:
        name = "demo" if not n_trials else "demo-pruned"
        run(repo, str(BIN / "kdsweep"), "run", study_spec(repo, name, budget=budget))
    else:
        name = "demo"
    nopruning = study_spec(repo, "demo-nopruning", pruner={"type": "none"}, budget=budget)
    run(repo, str(BIN / "kdsweep"), "run", nopruning)
    p, n = summary(repo, name), summary(repo, "demo-nopruning")
    header = ["study (same seed, budget)", "trials", "complete", "pruned", "failed", "best val_loss"]
    header += ["total training steps", "first start to last end (s)"]
    rows = [
        [
            label,
            x["trials"],
            x["complete"],
            x["pruned"],
            x["failed"],
            f"{x['best']:.4f}",
            x["steps"],
            f"{x['span']:.0f}",
        ]
        for label, x in ((f"{name} (pruner: {spec['pruner']['type']})", p), ("demo-nopruning", n))
    ]
    print(table(header, rows), flush=True)
    gap, ratio = (p["best"] - n["best"]) / n["best"], p["steps"] / n["steps"]
    print(
        f"pruning: best val_loss {gap:+.2%} against no pruning (goal: within 1%) {'met' if gap <= 0.01 else 'NOT met'}"
    )
    print(f"pruning: {ratio:.0%} of the training steps (goal: <= 50%) {'met' if ratio <= 0.5 else 'NOT met'}")
    return name, p, n


def new_repo(args) -> Path:
    """A fresh bench repository with the upstream stages reproduced (or ``make demo`` timed)."""
    work = args.work or Path(f"/tmp/kdsweep-bench-sweep-{int(time.time())}")
    work.mkdir(parents=True, exist_ok=True)
    repo = make_repo(work)
    print(f"repository: {repo}")
    if args.make_demo:
        wall, _ = run(repo, "make", "-o", ".venv/.installed", "demo", log=work / "make-demo.log")
        print(f"`make demo` (pipeline + demo sweep): {wall / 60:.1f} min ({work / 'make-demo.log'})", flush=True)
    else:
        run(repo, "dvc", "repro", "student", "teacher_logits")
    return repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, help="reuse this repository (its upstream stages reproduced)")
    ap.add_argument("--work", type=Path, default=None, help="where to build the repository (default: under /tmp)")
    ap.add_argument("--make-demo", action="store_true", help="time `make demo` in the new repository first")
    ap.add_argument("--trials", type=int, default=None, help="budget of the pruning comparison / the scale run")
    ap.add_argument("--overhead", action="store_true", help="only the overhead table and the end-to-end number")
    ap.add_argument("--levers", action="store_true", help="only each lever's share of the 1-worker overhead")
    ap.add_argument("--end-to-end", action="store_true", help="only the 6-trial end-to-end number")
    ap.add_argument("--scale", action="store_true", help="only the scaling run (default 200 trials)")
    args = ap.parse_args()

    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {platform.node()}, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load()}; python {platform.python_version()}"
    )
    repo = args.repo or new_repo(args)
    spec = yaml.safe_load((repo / "experiments" / "demo.yaml").read_text())
    results: dict = {}
    if args.scale:
        results["scale"] = scale(repo, spec, args.trials or 200)
    elif args.levers:
        results["levers"] = levers(repo, spec)
    elif args.end_to_end:
        results["end_to_end"] = end_to_end(repo, spec)
    else:
        if not args.overhead:
            results["pruning"] = pruning(repo, spec, args.trials)
        results["overhead"] = overhead(repo, spec)
        results["end_to_end"] = end_to_end(repo, spec)
        logs = list((repo / "studies").glob("*/logs/*.log"))
        recomputed = sum(len(re.findall(rf"Running stage '{s}'", p.read_text())) for p in logs for s in UPSTREAM)
        print(f"\nupstream recomputations: {recomputed} Running-stage lines in {len(logs)} trial logs (goal: 0)")
    print(f"\nload average at the end: {load()}; repository: {repo}")
    (repo / "bench-sweep.json").write_text(json.dumps(results, default=str, indent=2))


if __name__ == "__main__":
    main()
