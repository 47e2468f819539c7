"""Result quality (issue 11): does a sweep pay, and which choices matter? Test-split numbers, 3 seeds.

    python bench/quality.py                 # the whole benchmark (~35 min alone on 2 cores)
    python bench/quality.py --calibrate     # the pipeline and the 8-random-config spread only
    python bench/quality.py --smoke         # everything at toy size (minutes), outputs under --work
    python bench/quality.py --repo DIR      # reuse (resume in) a repository this script built

Everything runs in a throwaway git + DVC repository built from this checkout as
bench/sweep.py builds one, through the command line a user has: `dvc repro` for the pipeline,
`dvc exp run --temp -S key=value ...` for every configuration (two at a time, one thread each),
`kdsweep run` for the studies, `kdsweep best --apply` and `dvc repro` for the reproduction. Every
number is read from the experiments' own `metrics/evaluate.json` (test split) and
`metrics/distill.json` (validation). An experiment that already exists in the repository is
read, not run again, so a second run with `--repo` resumes.

The setting (`bench/quality/params.yaml`, over the shipped params.yaml): a teacher trained 1.5x
longer than the demo's (600 steps), a student with a quarter of the demo student's expert capacity
(wrapper rank 2, 32-wide shared core, fitted to the teacher), trained 160 steps of 4 sequences
(under one pass over the training split). The reference point is the reference's recommended
starting point in that setting: alpha 0.5, T 2, top-64 cache with tail, forward KL, one phase, the
reference's LR multipliers, base LR 5e-4 (kdsweep's default: the reference's 5e-5 is for a 30B
model and barely moves this student in 160 steps).

Questions (each configuration with training.seed 0, 1, 2; test CE mean and min-max):
  a. alpha 0.5 (KD + CE) against alpha 0 (CE only) and alpha 1 (KD only), equal steps;
  b. loss.mode topk_tail against topk_renorm at teacher.top_k 64 and 8, and dense (live teacher);
  c. loss.direction forward against reverse against jsd;
  d. one phase against freeze-then-unfreeze (80 + 80 steps: experts only, then everything);
  e. the study `bench/quality/study.yaml` (16 trials, `kdsweep run`, selected on validation); its
     best config retrained with the 3 seeds against the reference point with the same seeds;
  f. reproduction: `kdsweep best quality --apply && dvc repro`, then `dvc repro --force
     --single-item distill` (a real retraining), against the best trial's validation loss.
The setting is checked too: the spread (worst - best) / best of the test CE of 8 random configs
of the study's search space (the `kdsweep run` random sampler, one seed) must be >= 5%.
The reference point is one run per seed shared by a, b (topk_tail k 64), c (forward), d (one
phase) and e. Outputs: markdown tables on stdout and in results.md, test CE per configuration
(seed min-max bars) in PNGs, every raw number in results.json; in bench/quality/ for the full
run, under the work directory otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
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
from sweep import BIN, ROOT, env, make_repo, run, table, trials

from kdsweep.fsio import atomic_path, write_json, write_text

HERE = ROOT / "bench" / "quality"
SEEDS = (0, 1, 2)
STUDY = "quality"
SPREAD = "quality-spread"
SPREAD_GOAL, BEST_GOAL, TAIL_GOAL, KD_GOAL, REPRO_GOAL = 0.05, 0.02, 0.01, 0.03, 0.005
# Lock contention between concurrent `dvc exp run --temp` processes: worth another try.
TRANSIENT = re.compile(r"lock|Resource temporarily unavailable", re.IGNORECASE)
FORCE_TRAINING = ("--force", "--downstream", "distill")
EXPERTS_THEN_ALL = [
    {"pattern": ".*shared_core.*|.*wrapper.*", "lr_multiplier": 1.0},
    {"pattern": ".*", "lr_multiplier": 0.0},
]


def configs(steps: int) -> dict[str, dict]:
    """Every configuration the questions compare: params overrides over the setting."""
    first = steps // 2
    return {
        "reference": {},
        "ce_only": {"loss.alpha": 0.0},
        "kd_only": {"loss.alpha": 1.0},
        "topk_renorm_k64": {"loss.mode": "topk_renorm"},
        "dense": {"loss.mode": "dense", "teacher.use_cached_logits": False},
        "topk_tail_k8": {"teacher.top_k": 8},  # run in the second pipeline copy, whose cache is top-8
        "topk_renorm_k8": {"teacher.top_k": 8, "loss.mode": "topk_renorm"},
        "reverse": {"loss.direction": "reverse"},
        "jsd": {"loss.direction": "jsd"},
        "freeze_then_unfreeze": {
            "stages.enabled": True,
            "stages.configs": [
                {"stage_name": "stage1_experts", "max_steps": first, "parameter_lr_multipliers": EXPERTS_THEN_ALL},
                {
                    "stage_name": "stage2_full",
                    "max_steps": steps - first,
                    "parameter_lr_multipliers": [{"pattern": ".*", "lr_multiplier": 1.0}],
                },
            ],
        },
    }


QUESTIONS = {
    "a": (
        "KD against CE-only and KD-only (T 2, equal steps)",
        [("alpha 0.5 (reference)", "reference"), ("alpha 0 (CE only)", "ce_only"), ("alpha 1 (KD only)", "kd_only")],
    ),
    "b": (
        "teacher targets: top-k + tail, renormalised top-k, dense (live teacher)",
        [
            ("topk_tail k=64 (reference)", "reference"),
            ("topk_renorm k=64", "topk_renorm_k64"),
            ("topk_tail k=8", "topk_tail_k8"),
            ("topk_renorm k=8", "topk_renorm_k8"),
            ("dense (live teacher)", "dense"),
        ],
    ),
    "c": (
        "KL direction",
        [("forward (reference)", "reference"), ("reverse", "reverse"), ("jsd (beta 0.5)", "jsd")],
    ),
    "d": (
        "phases at equal total steps",
        [("one phase (reference)", "reference"), ("freeze-then-unfreeze", "freeze_then_unfreeze")],
    ),
    "e": ("the study's best (selected on validation) against the reference point", []),
}


# --------------------------------------------------------------------------- setting
def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flat(d: dict, prefix: str = "") -> dict:
    """Nested params as dotted keys; lists and empty mappings stay whole values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def smoke_size(params: dict, spec: dict) -> tuple[dict, dict]:
    """The same benchmark at toy size: a few teacher and student steps, three-trial studies."""
    params = merge(
        params,
        {
            "teacher": {"train": {"max_steps": 10}},
            "training": {"max_steps": 6, "eval_steps": 3, "logging_steps": 3, "warmup_steps": 1},
            "evaluate": {"max_batches": 2},
        },
    )
    spec = copy.deepcopy(spec)
    spec["fixed"].update({"training.max_steps": 6, "training.eval_steps": 3, "training.logging_steps": 3})
    for phase in spec["stage_layouts"]["freeze_then_unfreeze"]:
        phase["max_steps"] = 3
    spec["pruner"]["min_resource"] = 3
    spec["budget"]["n_trials"] = 3
    return params, spec


def spread_spec(spec: dict, n: int) -> dict:
    """The study's search space sampled at random, no pruning, each trial also evaluated on test."""
    spec = copy.deepcopy(spec)
    spec.update(
        study=SPREAD,
        description="random configurations of the quality study's space (the benchmark's spread check)",
        baselines=[],
        sampler={"type": "random", "seed": 1},
        pruner={"type": "none"},
        budget={"n_trials": n},
        retention={"keep_best": 1},
        execution={"stages": ["distill", "evaluate"], "threads_per_trial": 1},
    )
    return spec


def build(work: Path, params: dict, spec: dict, n_spread: int) -> Path:
    """A git + DVC repository of this checkout with the benchmark's params.yaml and study specs."""
    repo = make_repo(work)
    write_text(repo / "experiments" / f"{SPREAD}.yaml", yaml.safe_dump(spread_spec(spec, n_spread), sort_keys=False))
    write_text(
        repo / "params.yaml",
        "# bench/quality.py: the shipped params.yaml with bench/quality/params.yaml\n"
        + yaml.safe_dump(params, sort_keys=False),
    )
    write_text(repo / "experiments" / f"{STUDY}.yaml", yaml.safe_dump(spec, sort_keys=False))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "quality benchmark setting")
    return repo


# --------------------------------------------------------------------------- experiments
def hydra(v) -> str:
    """``v`` in the override grammar of ``dvc exp run -S`` (Hydra's); strings hold no quote or backslash."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {hydra(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(hydra(x) for x in v) + "]"
    if isinstance(v, str):
        if "'" in v or "\\" in v:
            raise ValueError(f"{v!r}: quotes and backslashes are not written here")
        return f"'{v}'"
    text = json.dumps(v)  # null, true, false, ints, floats
    return text.replace("e", ".0e") if isinstance(v, float) and "e" in text and "." not in text else text


def experiments(repo: Path) -> dict[str, str]:
    """Experiment name -> its git ref."""
    out = run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps/")[1]
    return {ref.split("/")[-1]: ref for ref in out.split() if len(ref.split("/")) == 5 and "/exec/" not in ref}


def exp_file(repo: Path, ref: str, path: str) -> dict | None:
    proc = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=repo, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def metrics(repo: Path, name: str) -> dict | None:
    """Test and validation numbers of one experiment, from its own metrics files."""
    ref = experiments(repo).get(name)
    ev = exp_file(repo, ref, "metrics/evaluate.json") if ref else None
    if ev is None:
        return None
    di = exp_file(repo, ref, "metrics/distill.json") or {}
    keys = ("test_ce", "test_kl", "test_top1_agreement", "val_loss")
    return {**{k: ev.get(k) for k in keys}, "state": di.get("state"), "steps": di.get("global_step")}


def exp_run(repo: Path, logs: Path, name: str, overrides: dict, *options: str) -> dict:
    """One `dvc exp run --temp -n NAME -S key=value ... OPTIONS` (skipped when NAME exists); its metrics."""
    if name in experiments(repo):
        return {"name": name, "overrides": overrides, "reused": True, **(metrics(repo, name) or {})}
    cmd = ["dvc", "exp", "run", "--temp", "-n", name]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={hydra(value)}"]
    cmd += list(options)
    t0 = time.perf_counter()
    for attempt in range(4):
        proc = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        write_text(logs / f"{name}.log", " ".join(cmd) + "\n" + out)
        if proc.returncode == 0 or not TRANSIENT.search(out) or attempt == 3:
            break
        time.sleep(3 + 5 * attempt)
    rebuilt = [s for s in ("prepare", "teacher", "student") if f"Running stage '{s}'" in out]
    result = {"name": name, "overrides": overrides, "seconds": round(time.perf_counter() - t0, 1)}
    result["upstream_rebuilt"] = rebuilt
    if proc.returncode != 0:
        print(f"  {name}: FAILED (exit {proc.returncode}, {logs / (name + '.log')})", flush=True)
        return {**result, "error": out[-2000:]}
    m = metrics(repo, name) or {}
    print(f"  {name}: test_ce {m.get('test_ce', float('nan')):.4f} ({result['seconds']:.0f} s)", flush=True)
    return {**result, **m}


def run_configs(repos: dict[int | None, Path], logs: Path, jobs: dict[str, dict], workers: int) -> dict[str, dict]:
    """Every named job, ``workers`` at a time, each in the repository whose cache has its top_k (None: the setting's).

    A job trains and evaluates with ``--force --downstream distill``: DVC's run-cache never
    stands in for a training (a study trial with the same params may be in it), and upstream
    stages are taken as committed, never rebuilt.
    """
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {
            pool.submit(exp_run, repos[o.get("teacher.top_k")], logs, n, o, *FORCE_TRAINING): n for n, o in jobs.items()
        }
        return {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}


def second_cache(repo: Path, work: Path, top_k: int) -> Path:
    """A copy of the pipeline whose cache holds the teacher's top ``top_k`` (same teacher, not retrained)."""
    other = work / f"repo-k{top_k}"
    if not other.exists():
        shutil.copytree(repo, other, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
        params = yaml.safe_load((other / "params.yaml").read_text())
        params["teacher"]["top_k"] = top_k
        write_text(other / "params.yaml", yaml.safe_dump(params, sort_keys=False))
        out = run(other, "dvc", "repro", "teacher_logits", log=work / f"pipeline-k{top_k}.log")[1]
        if "Running stage 'teacher'" in out:
            raise SystemExit(f"{other}: dvc repro retrained the teacher for top_k {top_k}; it must not")
        run(other, "git", "add", "params.yaml", "dvc.lock", "metrics")
        run(other, "git", "commit", "-q", "-m", f"teacher_logits at top_k {top_k}")
    return other


# --------------------------------------------------------------------------- studies
def study_numbers(repo: Path, name: str) -> list[dict]:
    """Each trial of a study: state, validation value, params, and test CE where the trial evaluated."""
    refs = experiments(repo)
    rows = []
    for t in trials(repo, name):
        exp = f"{name}-{t.number}"
        m = metrics(repo, exp) if exp in refs else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "experiment": exp,
                **({"test_ce": m["test_ce"], "val_loss": m["val_loss"]} if m else {}),
            }
        )
    return rows


def best_overrides(repo: Path, base: dict, experiment: str) -> dict:
    """The dotted params.yaml keys where the experiment differs from the setting."""
    ref = experiments(repo)[experiment]
    text = subprocess.run(["git", "show", f"{ref}:params.yaml"], cwd=repo, capture_output=True, text=True).stdout
    theirs, ours = flat(yaml.safe_load(text)), flat(base)
    return {k: v for k, v in theirs.items() if ours.get(k, object()) != v}


def reproduce(repo: Path, work: Path, best: dict) -> dict:
    """`kdsweep best --apply && dvc repro`, then distill retrained, against the trial's validation loss."""
    run(repo, str(BIN / "kdsweep"), "best", STUDY, "--apply", log=work / "best-apply.log")
    run(repo, "dvc", "repro", log=work / "repro.log")
    applied = json.loads((repo / "metrics" / "distill.json").read_text())["val_loss"]
    t0 = time.perf_counter()
    run(repo, "dvc", "repro", "--force", "--single-item", "distill", log=work / "repro-retrain.log")
    seconds = time.perf_counter() - t0
    retrained = json.loads((repo / "metrics" / "distill.json").read_text())["val_loss"]
    trial = best["value"]
    return {
        "trial": best["number"],
        "trial_val_loss": trial,
        "apply_repro_val_loss": applied,
        "retrained_val_loss": retrained,
        "retrain_seconds": round(seconds, 1),
        "difference": (retrained - trial) / trial,
        "difference_apply": (applied - trial) / trial,
    }


# --------------------------------------------------------------------------- report
def stats(runs: list[dict], key: str = "test_ce") -> dict:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return {"n": 0, "mean": float("nan"), "min": float("nan"), "max": float("nan"), "values": []}
    return {"n": len(values), "mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values}


def question_rows(rows: list[tuple[str, list[dict]]], ref: dict) -> list[list]:
    out = []
    for label, runs in rows:
        s = stats(runs)
        out.append(
            [
                label,
                f"{s['mean']:.4f}",
                f"{s['min']:.4f} - {s['max']:.4f}",
                f"{(s['mean'] - ref['mean']) / ref['mean']:+.2%}",
                f"{stats(runs, 'val_loss')['mean']:.4f}",
                f"{stats(runs, 'test_kl')['mean']:.4f}",
                f"{stats(runs, 'test_top1_agreement')['mean']:.3f}",
                f"{s['n']}",
            ]
        )
    return out


HEADER = [
    "configuration",
    "test CE mean",
    "test CE min - max",
    "vs reference",
    "val CE mean",
    "test KL mean",
    "test top-1 agreement",
    "seeds",
]


def plot(path: Path, title: str, rows: list[tuple[str, list[dict]]]) -> None:
    """Mean test CE per configuration with its seeds' min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [stats(runs) for _, runs in rows]
    means = [x["mean"] for x in s]
    err = [[x["mean"] - x["min"] for x in s], [x["max"] - x["mean"] for x in s]]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(rows)), 3.6))
    ax.bar(range(len(rows)), means, yerr=err, capsize=6, color="#4c72b0")
    for i, x in enumerate(s):
        ax.scatter([i] * len(x["values"]), x["values"], color="black", s=10, zorder=3)
    lo, hi = min(x["min"] for x in s), max(x["max"] for x in s)
    pad = max(hi - lo, 1e-3) * 0.4
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("test CE (nats/token)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def goal(text: str, measured: str, met: bool) -> list:
    return [text, measured, "met" if met else "**not met**"]


def spread_of(rows: list[dict]) -> dict:
    values = [r["test_ce"] for r in rows if r.get("test_ce") is not None]
    if not values:
        return {"n": 0, "spread": float("nan")}
    return {
        "n": len(values),
        "best": min(values),
        "worst": max(values),
        "spread": (max(values) - min(values)) / min(values),
    }


def knobs(params: dict) -> str:
    """A trial's sampled values in one markdown table cell."""
    text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return text.replace("lr_multiplier", "mult").replace("|", "\\|")


def spread_table(rows: list[dict]) -> str:
    body = []
    for r in sorted(rows, key=lambda r: r.get("test_ce") or float("inf")):
        body.append(
            [
                r["number"],
                r["state"],
                f"{r.get('test_ce', float('nan')):.4f}",
                f"{r.get('val_loss', float('nan')):.4f}",
                knobs(r["params"]),
            ]
        )
    return table(["trial", "state", "test CE", "val CE", "configuration"], body)


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy size: checks that every step runs (minutes)")
    ap.add_argument("--calibrate", action="store_true", help="only the pipeline and the 8-random-config spread")
    ap.add_argument("--repo", type=Path, help="a repository this script built (experiments that exist are reused)")
    ap.add_argument("--work", type=Path, help="where to build the repository (default: under /tmp)")
    ap.add_argument("--workers", type=int, default=2, help="configurations trained at once, one thread each")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # two one-thread trainings on two cores (bench/sweep.py's finding)
    t_start = time.perf_counter()
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = f"{platform.node()}, {platform.machine()}, nproc {os.cpu_count()}, python {platform.python_version()}"
    print(f"date: {date}; machine: {machine}; load average {os.getloadavg()[0]:.2f}", flush=True)

    setting = yaml.safe_load((HERE / "params.yaml").read_text())
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), setting)
    spec = yaml.safe_load((HERE / "study.yaml").read_text())
    n_spread = 8
    if args.smoke:
        params, spec = smoke_size(params, spec)
        n_spread = 3
    seeds = SEEDS[:1] if args.smoke else SEEDS
    repo = args.repo
    if repo is None:
        work = args.work or Path(f"/tmp/kdsweep-bench-quality-{int(time.time())}")
        work.mkdir(parents=True, exist_ok=True)
        repo = build(work, params, spec, n_spread)
    else:
        work = repo.parent
        # A finished run left the best trial applied in the workspace: back to the setting.
        run(repo, "git", "reset", "-q", "--hard")
        run(repo, "dvc", "checkout", "--force", "-q", "prepare", "teacher", "teacher_logits", "student")
        if yaml.safe_load((repo / "params.yaml").read_text()) != params:
            raise SystemExit(f"{repo}/params.yaml is not this setting: build a new repository (omit --repo)")
    out_dir = HERE if not (args.smoke or args.calibrate) else work / "out"
    logs = work / "logs"
    print(f"repository: {repo}; outputs: {out_dir}", flush=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    run(repo, "dvc", "repro", "student", "teacher_logits", log=work / "pipeline.log")
    # Committed with their metrics (not DVC-cached): a temporary experiment copy without them
    # would rebuild the stages that write them, the teacher included.
    if run(repo, "git", "status", "--porcelain", "dvc.lock", "metrics")[1].strip():
        run(repo, "git", "add", "dvc.lock", "metrics")
        run(repo, "git", "commit", "-q", "-m", "pipeline outputs")
    times["pipeline (prepare, teacher, teacher_logits, student)"] = time.perf_counter() - t0
    teacher = json.loads((repo / "metrics" / "teacher.json").read_text())
    student = json.loads((repo / "metrics" / "student.json").read_text())
    print(f"pipeline: {times['pipeline (prepare, teacher, teacher_logits, student)']:.0f} s", flush=True)

    t0 = time.perf_counter()
    run(repo, str(BIN / "kdsweep"), "run", f"experiments/{SPREAD}.yaml", log=work / "spread.log")
    spread_rows = study_numbers(repo, SPREAD)
    spread = spread_of(spread_rows)
    times[f"spread check ({n_spread} random configs)"] = time.perf_counter() - t0
    result = {
        "date": date,
        "machine": machine,
        "setting": setting,
        "smoke": args.smoke,
        "teacher": teacher,
        "student": student,
        "spread": {**spread, "trials": spread_rows},
    }
    sections = [
        f"Setting check: {n_spread} random configurations of the study's search space (one seed, test split)\n\n"
        + spread_table(spread_rows)
        + f"\n\nspread (worst - best) / best: **{spread['spread']:.2%}** (goal >= {SPREAD_GOAL:.0%})"
    ]
    print("\n" + sections[0] + "\n", flush=True)
    if args.calibrate:
        finish(out_dir, result, sections, times, t_start)
        return

    t0 = time.perf_counter()
    run(repo, str(BIN / "kdsweep"), "run", f"experiments/{STUDY}.yaml", log=work / "study.log")
    run(repo, str(BIN / "kdsweep"), "best", STUDY, log=work / "best.log")
    study_rows = study_numbers(repo, STUDY)
    best = min((r for r in study_rows if r["state"] == "COMPLETE"), key=lambda r: r["value"])
    overrides = best_overrides(repo, params, best["experiment"])
    times["study (kdsweep run)"] = time.perf_counter() - t0
    print(f"study best: trial {best['number']} val_loss {best['value']:.4f}; overrides {overrides}", flush=True)

    t0 = time.perf_counter()
    configs_ = {**configs(params["training"]["max_steps"]), "study_best": overrides}
    jobs = {f"q-{c}-s{s}": {**o, "training.seed": s} for c, o in configs_.items() for s in seeds}
    runs = run_configs({None: repo, 8: second_cache(repo, work, 8)}, logs, jobs, args.workers)
    times[f"configurations ({len(jobs)} runs, {args.workers} at a time)"] = time.perf_counter() - t0
    by_config = {c: [runs[f"q-{c}-s{s}"] for s in seeds] for c in configs_}

    t0 = time.perf_counter()
    repro = reproduce(repo, work, best)
    times["reproduction"] = time.perf_counter() - t0

    ref = stats(by_config["reference"])
    questions = {q: (title, [(label, by_config[c]) for label, c in rows]) for q, (title, rows) in QUESTIONS.items()}
    questions["e"] = (
        QUESTIONS["e"][0],
        [
            ("reference point", by_config["reference"]),
            (f"study best (trial {best['number']})", by_config["study_best"]),
        ],
    )
    for q, (title, rows) in questions.items():
        text = f"{q}. {title} (test split, seeds {', '.join(map(str, seeds))})\n\n" + table(
            HEADER, question_rows(rows, ref)
        )
        plot(out_dir / f"{q}.png", f"{q}. {title}", rows)
        sections.append(text)
        print(text + "\n", flush=True)
    sections.append(study_section(study_rows, best, overrides))
    sections.append(repro_section(repro))
    goals = goal_rows(spread, by_config, repro)
    sections.append("Goals\n\n" + table(["goal", "measured", ""], goals))
    print("\n".join(sections[-3:]), flush=True)
    result.update(
        study={"trials": study_rows, "best": best, "best_overrides": overrides},
        runs=runs,
        by_config={
            c: {"overrides": configs_[c], "test_ce": stats(r), "val_loss": stats(r, "val_loss")}
            for c, r in by_config.items()
        },
        reproduction=repro,
        goals=goals,
        upstream_rebuilt=sorted({s for r in runs.values() for s in r.get("upstream_rebuilt", [])}),
    )
    finish(out_dir, result, sections, times, t_start)


def study_section(rows: list[dict], best: dict, overrides: dict) -> str:
    body = [
        [
            r["number"],
            r["state"],
            f"{r['value']:.4f}" if r["value"] is not None else "-",
            knobs(r["params"]),
        ]
        for r in sorted(rows, key=lambda r: (r["state"] != "COMPLETE", r["value"] or float("inf")))
    ]
    keys = ", ".join(f"`{k}`" for k in overrides)
    return (
        f"Study `{STUDY}` ({len(rows)} trials; value = final validation CE, pruned: last reported)\n\n"
        + table(["trial", "state", "val CE", "configuration"], body)
        + f"\n\nbest: trial {best['number']}; its config differs from the setting in {keys}"
    )


def repro_section(r: dict) -> str:
    return table(
        ["f. reproduction of the best trial", "validation CE", "vs the trial"],
        [
            ["the trial (in the study)", f"{r['trial_val_loss']:.6f}", ""],
            [
                "`kdsweep best --apply && dvc repro`",
                f"{r['apply_repro_val_loss']:.6f}",
                f"{r['difference_apply']:+.4%}",
            ],
            [
                "then `dvc repro --force --single-item distill` (retrained)",
                f"{r['retrained_val_loss']:.6f}",
                f"{r['difference']:+.4%}",
            ],
        ],
    )


def goal_rows(spread: dict, by: dict, repro: dict) -> list[list]:
    ref, best = stats(by["reference"]), stats(by["study_best"])
    tail, dense, ce = stats(by["reference"]), stats(by["dense"]), stats(by["ce_only"])
    gain = (ref["mean"] - best["mean"]) / ref["mean"]
    apart = best["max"] < ref["min"]
    tail_gap = (tail["mean"] - dense["mean"]) / dense["mean"]
    kd_gain = (ce["mean"] - ref["mean"]) / ce["mean"]
    return [
        goal(
            f"setting: spread of {spread['n']} random configs >= {SPREAD_GOAL:.0%} of test CE",
            f"{spread['spread']:.2%}",
            spread["spread"] >= SPREAD_GOAL,
        ),
        goal(
            f"study best beats the reference point by >= {BEST_GOAL:.0%} test CE, ranges apart",
            f"{gain:+.2%} (best {best['min']:.4f}-{best['max']:.4f}, reference {ref['min']:.4f}-{ref['max']:.4f}; "
            f"ranges {'apart' if apart else 'overlap'})",
            gain >= BEST_GOAL and apart,
        ),
        goal(
            f"topk_tail k=64 within {TAIL_GOAL:.0%} of dense on test CE",
            f"{tail_gap:+.2%} ({tail['mean']:.4f} vs {dense['mean']:.4f})",
            abs(tail_gap) <= TAIL_GOAL,
        ),
        goal(
            f"KD (alpha 0.5) beats CE-only by >= {KD_GOAL:.0%} test CE",
            f"{kd_gain:+.2%} (KD {ref['min']:.4f}-{ref['max']:.4f}, CE-only {ce['min']:.4f}-{ce['max']:.4f})",
            kd_gain >= KD_GOAL,
        ),
        goal(
            f"reproduction within {REPRO_GOAL:.1%} of the trial's validation CE",
            f"{repro['difference']:+.4%} retrained ({repro['difference_apply']:+.4%} after apply + repro)",
            abs(repro["difference"]) <= REPRO_GOAL,
        ),
    ]


def finish(out_dir: Path, result: dict, sections: list[str], times: dict, t_start: float) -> None:
    """Write results.md and results.json; print where the time went."""
    times["total"] = time.perf_counter() - t_start
    timing = table(["phase", "minutes"], [[k, f"{v / 60:.1f}"] for k, v in times.items()])
    print("\n" + timing, flush=True)
    header = f"date: {result['date']}; machine: {result['machine']}\n\ncommand: `python {' '.join(sys.argv)}`"
    write_text(out_dir / "results.md", "\n\n".join([header, *sections, timing]) + "\n")
    write_json(out_dir / "results.json", {**result, "minutes": {k: v / 60 for k, v in times.items()}})
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
