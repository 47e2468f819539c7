"""KD position selection (issue 19, item 3): test CE at KD fractions f = 1, 0.5, 0.25, 3 seeds, and bytes per token.

    python bench/positions.py                  # the quality setting's pipeline, then 9 trainings (one at a time)
    python bench/positions.py --sampled        # also the one-temperature sampled cache (6 draws, T = 1) at f = 1, 0.5
    python bench/positions.py --work DIR       # resume in a work directory this script built (runs are reused)
    python bench/positions.py --smoke          # toy size: checks that every step runs

The setting is bench/quality.py's (bench/quality/params.yaml over the shipped params.yaml: a teacher
trained 600 steps, a weak compressed student trained 120 steps of 4 sequences), built the same way
(a throwaway git + DVC repository of this checkout, `dvc repro`, then `dvc exp run --temp -S ...
--force --downstream distill` per configuration, test CE read from each experiment's
metrics/evaluate.json). f = 1 is that benchmark's reference point: alpha 0.5, T 2, the fp16 top-64
+ tail cache ("the full cache"), KD on every position. f < 1 sets only `loss.kd_positions.fraction`:
the KD term covers the f share of each sequence's positions where the student's entropy (T = 1) is
highest, CE covers all of them. With ``--sampled``, top-64 + tail at T = 1 and the sampled q8 cache
for T = 1 only (6 draws, bench/quality.py's question s) run at f = 1 and 0.5.

The selection happens in training: every configuration reads the same cache file, so its bytes per
token do not change with f. They are measured (`bench/cache.py --sizes`: at the cache's vocabulary
and with the ids injected into 151,936) and printed with the table. Seconds per run are the whole
`dvc exp run` (about 10 s of it start-up), one run at a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import quality as q
import yaml
from cache import bench_sizes
from sweep import ROOT, run, table

from kdsweep.fsio import write_json

FRACTIONS = (1.0, 0.5, 0.25)
SAMPLED_FRACTIONS = (1.0, 0.5)
SAMPLED_COPY = "sampled-t1-d6"  # bench/quality.py's FIXED_T copy: sampled q8, 6 draws, T = 1 only


def name_of(fraction: float) -> str:
    """An experiment-name-safe fraction: 0.25 -> f025."""
    return f"f{round(fraction * 100):03d}"


def configs(sampled: bool) -> dict[str, tuple[str, dict]]:
    """Configuration name -> (table label, params overrides over the setting)."""
    out = {
        name_of(f): (f"top-64 + tail, T 2, f = {f:g}" + (" (reference: every position)" if f == 1 else ""), {})
        for f in FRACTIONS
    }
    for f in FRACTIONS:
        out[name_of(f)][1]["loss.kd_positions.fraction"] = f
    if sampled:
        for f in SAMPLED_FRACTIONS:
            out[f"t1-{name_of(f)}"] = (
                f"top-64 + tail, T 1, f = {f:g}",
                {"loss.temperature": 1.0, "loss.kd_positions.fraction": f},
            )
            out[f"sampled-t1-d6-{name_of(f)}"] = (
                f"sampled q8, 6 draws, T 1, f = {f:g}",
                {**q.FIXED_T[SAMPLED_COPY], "loss.kd_positions.fraction": f},
            )
    return out


def pipeline(work: Path, params: dict, spec: dict) -> Path:
    """The setting's repository with prepare .. student and the cache committed (built once)."""
    repo = work / "repo" if (work / "repo").exists() else q.build(work, params, spec, 0)
    run(repo, "dvc", "repro", "student", "teacher_logits", log=work / "pipeline.log")
    if run(repo, "git", "status", "--porcelain", "dvc.lock", "metrics")[1].strip():
        run(repo, "git", "add", "dvc.lock", "metrics")
        run(repo, "git", "commit", "-q", "-m", "pipeline outputs")
    return repo


def rows_of(runs: dict[str, dict], chosen: dict[str, tuple[str, dict]], seeds: tuple[int, ...], ref: str) -> list[list]:
    """bench/quality.py's question rows (test CE mean, min - max, vs ``ref``, ...) plus seconds per run."""
    by = [(label, [runs[f"pos-{c}-s{s}"] for s in seeds]) for c, (label, _) in chosen.items()]
    reference = q.stats([runs[f"pos-{ref}-s{s}"] for s in seeds])
    rows = q.question_rows(by, reference)
    for row, (_, rs) in zip(rows, by, strict=True):
        seconds = [r["seconds"] for r in rs if "seconds" in r]
        row.append(f"{sum(seconds) / len(seconds):.0f}" if seconds else "reused")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work directory (default: a new one under /tmp); reused if it exists")
    ap.add_argument("--sampled", action="store_true", help="also the sampled one-temperature cache at f = 1, 0.5")
    ap.add_argument("--smoke", action="store_true", help="toy size: checks that every step runs")
    ap.add_argument("--workers", type=int, default=1, help="trainings at once, one thread each")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = f"{platform.node()}, {platform.machine()}, nproc {os.cpu_count()}, python {platform.python_version()}"
    print(f"date: {date}; machine: {machine}; load average {os.getloadavg()[0]:.2f}", flush=True)

    params = q.merge(
        yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(q.HERE.joinpath("params.yaml").read_text())
    )
    spec = yaml.safe_load((q.HERE / "study.yaml").read_text())
    if args.smoke:
        params, spec = q.smoke_size(params, spec)
    seeds = q.SEEDS[:1] if args.smoke else q.SEEDS
    work = args.work or Path(f"/tmp/kdsweep-bench-positions-{int(time.time())}")
    work.mkdir(parents=True, exist_ok=True)
    repo = pipeline(work, params, spec)
    repos = {None: repo}
    if args.sampled:
        repos[SAMPLED_COPY] = q.cache_copy(repo, work, SAMPLED_COPY)
    chosen = configs(args.sampled)
    jobs = {f"pos-{c}-s{s}": {**o, "training.seed": s} for c, (_, o) in chosen.items() for s in seeds}
    runs = q.run_configs(repos, work / "logs", jobs, args.workers)

    header = [*q.HEADER, "seconds per run"]
    main_rows = {c: v for c, v in chosen.items() if not c.startswith(("t1-", "sampled-"))}
    print(f"\nKD position selection, quality setting, seeds {list(seeds)}; load average {os.getloadavg()[0]:.2f}\n")
    print(table(header, rows_of(runs, main_rows, seeds, name_of(1.0))), "\n")
    if args.sampled:
        t1_rows = {c: v for c, v in chosen.items() if c.startswith(("t1-", "sampled-"))}
        print(table(header, rows_of(runs, t1_rows, seeds, f"t1-{name_of(1.0)}")), "\n")
    print("Bytes per token of the caches the runs read (the same file at every f):\n", flush=True)
    bench_sizes([r / "data" / "teacher_logits" / "train.h5" for r in repos.values()])
    write_json(work / "positions.json", {"date": date, "machine": machine, "runs": runs})
    print(f"\nraw numbers: {work / 'positions.json'}")


if __name__ == "__main__":
    main()
