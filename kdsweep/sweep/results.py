"""What a study found: ``kdsweep best``, ``kdsweep report`` and ``kdsweep status``.

All three read the Optuna study (trial states, values, the user attributes the runner
wrote); ``best --apply`` and ``report`` also talk to DVC (``dvc exp apply``, ``dvc exp show``).
``best`` and ``report`` show the listed trials' test-split metrics beside the validation that
selected them (:mod:`kdsweep.sweep.testeval` evaluates kept checkpoints once and stores the numbers).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from kdsweep.dotted import get_or
from kdsweep.errors import UserError
from kdsweep.fsio import write_text
from kdsweep.optuna_io import display, open_storage
from kdsweep.sweep import dvcexp
from kdsweep.sweep.apply import apply_trial
from kdsweep.sweep.record import StudyRecord, TrialRecord, records
from kdsweep.sweep.selection import baseline, ranked
from kdsweep.sweep.selection import best as best_of
from kdsweep.sweep.slurm import describe_task
from kdsweep.sweep.spec import load_spec, parse_spec
from kdsweep.sweep.study import owner_gone, storage_url
from kdsweep.sweep.testeval import SELECTION_NOTE, TEST_KEYS, HeldOut, held_out

DISTILL_METRICS = "metrics/distill.json"  # the metrics file every trial writes (dvc.yaml's distill stage)
TEST_ROWS = 20  # trials whose test metrics `report` shows (as many as `kdsweep best` lists by default)
NONE = "\u2014"  # a metric a trial does not have (an em dash)


class StudyHandle:
    """An existing study, found from a spec path or a study name."""

    def __init__(self, study: str, storage: str | None = None):
        import optuna

        self.root = dvcexp.repo_root(Path.cwd())
        path = Path(study)
        if path.suffix in (".yaml", ".yml") or "/" in study:
            spec, _ = load_spec(path)  # a spec that does not exist is a UserError listing those that do
        elif (self.root / "experiments" / f"{study}.yaml").is_file():
            spec, _ = load_spec(self.root / "experiments" / f"{study}.yaml")
            if spec.study != study:
                spec = spec.model_copy(update={"study": study, "storage": None})
        else:
            spec = parse_spec({"study": study}, f"study name {study!r}")
        if storage:
            spec = spec.model_copy(update={"storage": storage})
        self.name = spec.study
        self.url = storage_url(spec, self.root)
        if self.url.startswith("journal:") and not Path(self.url[len("journal:") :]).is_file():
            raise UserError(
                f"no study {self.name!r}: {display(self.url, self.root)} does not exist "
                f"(run `kdsweep run experiments/{self.name}.yaml` first, or pass --storage)"
            )
        self.storage = open_storage(self.url)
        try:
            self.study = optuna.load_study(study_name=self.name, storage=self.storage)
        except KeyError:
            names = optuna.get_all_study_names(self.storage)
            raise UserError(
                f"no study {self.name!r} in {display(self.url, self.root)}; it has: {', '.join(names) or 'none'}"
            ) from None
        stored = StudyRecord.of(self.study)
        self.spec = stored.spec or json.loads(spec.model_dump_json(warnings=False))
        objective = stored.objective or self.spec["objective"]
        self.metric, self.direction = objective["metric"], objective["direction"]
        self.trials = records(self.study)
        self.removed = stored.removed

    def best(self) -> TrialRecord | None:
        """The best complete trial (:func:`kdsweep.sweep.selection.best`)."""
        return best_of(self.trials, self.direction)

    def outputs(self, t: TrialRecord) -> str:
        """Whether the trial's outputs are still in the DVC cache (retention removes all but the best)."""
        if not t.outputs_kept:
            return ""
        return "removed" if t.number in self.removed else "kept"

    def held_out(self, trials: list) -> dict[int, HeldOut]:
        """The test metrics of ``trials``, or why each has none (evaluated once, then read back)."""
        keep_best = (self.spec.get("retention") or {}).get("keep_best")
        return held_out(self.root, self.name, trials, self.removed, keep_best)

    def param_names(self) -> list[str]:
        names: list[str] = []
        for t in self.trials:
            names += [n for n in t.params if n not in names]
        return names


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return "" if v is None else str(v)


def table(header: list[str], rows: list[list[Any]], markdown: bool = False) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells])
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells])


def _short(name: str) -> str:
    return name.replace("lr_multiplier", "lr_mult").replace("stages[", "st[")


def ranked_rows(h: StudyHandle, top: int | None = None) -> tuple[list[str], list[list[Any]], list]:
    params = h.param_names()
    header = ["rank", "trial", "experiment", "state", h.metric, "best_val_loss", "steps", "outputs"]
    header += [_short(p) for p in params]
    order = ranked(h.trials, h.direction)[:top]
    rows = [
        [
            i + 1,
            t.number,
            t.experiment,
            t.state.name.lower(),
            t.last_value,
            t.get("best_val_loss"),
            t.get("steps"),
            h.outputs(t),
        ]
        + [t.params.get(p) for p in params]
        for i, t in enumerate(order)
    ]
    return header, rows, order


def _test_rows(h: StudyHandle, order: list, scores: dict[int, HeldOut]) -> tuple[list[str], list[list[Any]]]:
    """The test metrics of the trials ``order`` lists, beside the validation value that ranked them."""
    header = ["rank", "trial", "experiment", h.metric, *TEST_KEYS, "note"]
    rows = []
    for i, t in enumerate(order):
        s = scores[t.number]
        values = [s.metrics[k] for k in TEST_KEYS] if s.metrics else [NONE] * len(TEST_KEYS)
        rows.append([i + 1, t.number, t.experiment, t.last_value, *values, s.why])
    return header, rows


def _against_baseline(h: StudyHandle, best_trial, scores: dict[int, HeldOut]) -> str:
    """One line: test CE of the best trial against the baseline's, with the relative difference."""
    head = "**Best against baseline** (test CE, lower is better):"
    base, what = baseline(h.trials)
    if best_trial is None or base is None:
        return f"{head} {NONE} (no {'complete trial' if best_trial is None else 'trial 0'})"
    if base.number == best_trial.number:
        ce = scores[base.number].metrics
        return f"{head} the best trial is trial {base.number} ({what}) itself" + (
            f", test CE {ce['test_ce']:.4f}" if ce else f"; {scores[base.number].why}"
        )
    missing = [(t, scores[t.number].why) for t in (best_trial, base) if not scores[t.number].metrics]
    if missing:
        return f"{head} {NONE} (" + "; ".join(f"trial {t.number}: {why}" for t, why in missing) + ")"
    b, r = scores[best_trial.number].metrics["test_ce"], scores[base.number].metrics["test_ce"]
    return (
        f"{head} trial {best_trial.number} (`{best_trial.experiment}`) {b:.4f} against trial "
        f"{base.number} (`{base.experiment}`, {what}) {r:.4f}: {100 * (b - r) / r:+.2f}%"
    )


def best(
    study: str,
    storage: str | None = None,
    top: int = 20,
    apply: bool = False,
    branch: str | None = None,
    force: bool = False,
) -> int:
    """Print the ranked trials; optionally apply the best to the workspace (:mod:`kdsweep.sweep.apply`)
    or branch it."""
    import optuna

    h = StudyHandle(study, storage)
    header, rows, order = ranked_rows(h, top)
    print(f"study {h.name}: {h.direction} {h.metric} ({display(h.url, h.root)})")
    print(table(header, rows) if rows else "no complete or pruned trial yet")
    for line in cause_lines(h.trials):
        print(line)
    if order:
        test_header, test_rows = _test_rows(h, order, h.held_out(order))
        print(SELECTION_NOTE.format(metric=h.metric))
        print(table(test_header, test_rows))
    print(f"the trials in DVC, best first: {_exp_show(h.spec)}")
    if not (apply or branch):
        return 0
    complete = [t for t in order if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError(f"study {h.name} has no complete trial to apply")
    winner = complete[0]
    name = winner.experiment
    remote = (h.spec.get("execution") or {}).get("push") or "origin"
    if name not in dvcexp.exp_refs(h.root) and (why := dvcexp.pull_experiment(h.root, remote, name)):
        raise UserError(f"experiment {name} of trial {winner.number} is not in this repository, nor in {remote}: {why}")
    if h.outputs(winner) == "removed":
        print(f"warning: trial {winner.number}'s outputs were removed by retention; `dvc repro` rebuilds them")
    if apply:
        changed = apply_trial(h.root, name, winner.overrides, force=force)
        print(
            f"applied {name} (trial {winner.number}, {h.metric} {winner.value:.4f}): dvc.lock, metrics and "
            f"models/student now hold it; params.yaml changed {', '.join(changed) or 'nothing'}"
        )
    if branch:
        _dvc(h.root, "exp", "branch", name, branch)
        print(f"branch {branch} holds {name}")
    return 0


def cause_lines(trials: list[TrialRecord]) -> list[str]:
    """One line per trial that failed or was interrupted: how it ended and why (its decisive line)."""
    out = []
    for t in trials:
        if t.ended == "failed":
            out.append(f"failed: trial {t.number} ({t.experiment}): {t.cause}")
        elif t.ended == "interrupted":
            kind = t.cause_kind or "runner"
            out.append(f"interrupted ({kind}, spent no budget): trial {t.number} ({t.experiment}): {t.cause}")
    return out


def _dvc(root: Path, *args: str) -> str:
    r = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"dvc {' '.join(args)} failed:\n{(r.stderr or r.stdout).strip()[-1500:]}")
    return r.stdout


# --------------------------------------------------------------------------- dvc exp show, params.yaml
def exp_show_command(study: str, storage: str | None = None) -> str:
    """One ``dvc exp show`` command that lists the study's trials one per row, best first.

    Its columns are the experiment, distill's ``state`` and ``val_loss`` (and the objective, if
    another metric), the params the spec's ``space`` sweeps and, with phase layouts,
    ``stages.enabled``; everything else is dropped, so the table fits a 120-column terminal.
    Trials of other studies from the same commit are listed too: DVC has no filter by name.
    """
    return _exp_show(StudyHandle(study, storage).spec)


def _exp_show(spec: dict[str, Any]) -> str:
    objective = spec["objective"]
    metrics = dict.fromkeys(["state", "val_loss", objective["metric"]])
    # DVC names a column `file:name` only when two files have the name (teacher.json has val_loss).
    columns = ["Experiment"] + [f"({re.escape(DISTILL_METRICS)}:)?{m}" for m in metrics]
    columns += [re.escape(key) for key in spec.get("space") or {}]
    if spec.get("stage_layouts"):
        columns.append(r"stages\.enabled")  # which layout; the layouts themselves are lists, too wide to show
    order = "asc" if objective["direction"] == "minimize" else "desc"
    return shlex.join(
        ["dvc", "exp", "show", "--hide-workspace", "--sort-by", f"{DISTILL_METRICS}:{objective['metric']}"]
        + ["--sort-order", order, "--drop", ".*", "--keep", "^(" + "|".join(columns) + ")$"]
    )


def status(study: str, storage: str | None = None) -> int:
    """Progress of a study: finished, running, waiting; the best so far; an estimate of what is left."""
    import optuna

    TS = optuna.trial.TrialState
    h = StudyHandle(study, storage)
    n = (h.spec.get("budget") or {}).get("n_trials")
    by = {s: [t for t in h.trials if t.state == s] for s in TS}
    ended = {e: sum(t.ended == e for t in h.trials) for e in ("complete", "pruned", "failed", "interrupted")}
    finished = ended["complete"] + ended["pruned"] + ended["failed"]
    print(
        f"study {h.name} ({display(h.url, h.root)}): {finished}" + (f" of {n}" if n else "") + " finished: "
        f"{ended['complete']} complete, {ended['pruned']} pruned, {ended['failed']} failed; "
        f"{len(by[TS.RUNNING])} running, {len(by[TS.WAITING])} waiting"
        + (f"; {ended['interrupted']} interrupted (spent no budget)" if ended["interrupted"] else "")
    )
    for line in cause_lines(h.trials):
        print(line)
    b = h.best()
    print(f"best: trial {b.number} ({b.experiment}) {h.metric} {b.value:.4f}" if b else "best: none yet")
    now = time.time()
    for t in by[TS.RUNNING]:
        step = max(t.intermediate_values) if t.intermediate_values else None
        since = (now - t.datetime_start.timestamp()) if t.datetime_start else 0
        at = (
            f"step {step}, {h.spec['objective'].get('report') or 'val_loss'} {t.intermediate_values[step]:.4f}"
            if step is not None
            else "starting"
        )
        gone = "; owner gone; resumes on the next run" if owner_gone(t, now) else ""
        where = describe_task(t.owner)
        print(
            f"running: trial {t.number} ({t.experiment}): {at}, {since:.0f} s{gone}" + (f"; {where}" if where else "")
        )
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in h.trials
        if t.datetime_complete and t.datetime_start and t.state in (TS.COMPLETE, TS.PRUNED, TS.FAIL)
    ]
    if n and durations and finished < n:
        workers = h.spec.get("workers") or 1
        left = (n - finished) * (sum(durations) / len(durations)) / workers
        print(
            f"about {left / 60:.1f} min left ({n - finished} trials of ~{sum(durations) / len(durations):.0f} s, "
            f"{workers} worker(s))"
        )
    print(f"the trials in DVC, best first: {_exp_show(h.spec)}")
    return 0


# --------------------------------------------------------------------------- report
def _exp_show_rows(h: StudyHandle) -> tuple[list[str], list[list[Any]]]:
    """This study's rows of ``dvc exp show``: name, state, metrics, and the params that vary."""
    data = json.loads(_dvc(h.root, "exp", "show", "--json"))
    prefix = f"{h.name}-"
    rows = []
    for commit in data:
        for exp in commit.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            name = exp.get("name") or rev.get("name") or ""
            if not (name.startswith(prefix) and name[len(prefix) :].isdigit()):
                continue
            d = rev.get("data") or {}
            params = ((d.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = ((d.get("metrics") or {}).get(DISTILL_METRICS) or {}).get("data") or {}
            rows.append((int(name[len(prefix) :]), name, params, metrics))
    rows.sort()
    keys: list[str] = []
    for t in h.trials:
        keys += [k for k in t.overrides if k not in keys]
    scalar = [k for k in keys if all(not isinstance(get_or(p, k), (dict, list)) for _, _, p, _ in rows)]
    header = ["Experiment", "state", "val_loss", "best_val_loss", "steps"] + scalar
    return header, [
        [name, m.get("state"), m.get("val_loss"), m.get("best_val_loss"), m.get("steps")]
        + [get_or(p, k) for k in scalar]
        for _, name, p, m in rows
    ]


def report(study: str, storage: str | None = None, out_dir: Path | None = None) -> Path:
    """Write ``reports/<study>/report.md`` with PNG plots and the ``dvc exp show`` table."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    TS = optuna.trial.TrialState
    h = StudyHandle(study, storage)
    out = Path(out_dir) if out_dir else h.root / "reports" / h.name
    out.mkdir(parents=True, exist_ok=True)
    complete = [t for t in h.trials if t.state == TS.COMPLETE]
    plots: list[tuple[str, str, str]] = []  # (title, file, note)

    def save(title: str, file: str, draw) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = draw()
            fig = (
                result.figure
                if hasattr(result, "figure")
                else (result.flat[0].figure if hasattr(result, "flat") else plt.gcf())
            )
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            fig.tight_layout()
            fig.savefig(out / file, dpi=100)
            plt.close("all")
            plots.append((title, file, ""))
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as e:
            plt.close("all")
            plots.append((title, "", f"not drawn: {e}"))

    vis = optuna.visualization.matplotlib
    save("Optimisation history", "optimization_history.png", lambda: vis.plot_optimization_history(h.study))
    save("Learning curves of all trials", "learning_curves.png", lambda: _learning_curves(h, plt))
    if len(complete) >= 2:
        save("Parameter importances", "param_importances.png", lambda: vis.plot_param_importances(h.study))
    else:
        plots.append(("Parameter importances", "", "needs at least 2 complete trials"))
    save("Parallel coordinates", "parallel_coordinates.png", lambda: vis.plot_parallel_coordinate(h.study))
    save("alpha x temperature", "alpha_temperature.png", lambda: _alpha_temperature(h, plt))

    order = ranked(h.trials, h.direction)[:TEST_ROWS]
    compared = [t for t in (h.best(), baseline(h.trials)[0]) if t is not None]
    scores = h.held_out(list({t.number: t for t in order + compared}.values()))
    lines = _report_lines(h, plots, order, scores)
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    print(
        f"wrote {path.relative_to(h.root) if h.root in path.parents else path} "
        f"({sum(bool(f) for _, f, _ in plots)} plots)"
    )
    return path


def _report_lines(
    h: StudyHandle, plots: list[tuple[str, str, str]], order: list, scores: dict[int, HeldOut]
) -> list[str]:
    """report.md's lines: the summary, the best trial against the baseline, the plots, the test metrics
    of the best trials (``order``), the ranked, failed and DVC tables."""
    import optuna

    TS = optuna.trial.TrialState
    complete = [t for t in h.trials if t.state == TS.COMPLETE]
    header, rows, _ = ranked_rows(h)
    exp_header, exp_rows = _exp_show_rows(h)
    failed = [t for t in h.trials if t.ended == "failed"]
    interrupted = sum(t.ended == "interrupted" for t in h.trials)
    lines = [
        f"# Study `{h.name}`",
        "",
        f"{h.direction.capitalize()} `{h.metric}` over {len(h.trials)} trials "
        f"({len(complete)} complete, {sum(t.state == TS.PRUNED for t in h.trials)} pruned, {len(failed)} failed, "
        f"{interrupted} interrupted by the infrastructure); storage `{display(h.url, h.root)}`.",
        "",
    ]
    b = h.best()
    if b is not None:
        lines += [
            f"**Best**: trial {b.number} (`{b.experiment}`), {h.metric} = {b.value:.4f}: "
            + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in b.params.items()),
            "",
            f"Reproduce it: `kdsweep best {h.name} --apply` (runs `dvc exp apply {b.experiment}`).",
            "",
        ]
    lines += [_against_baseline(h, b, scores), "", SELECTION_NOTE.format(metric=h.metric).capitalize() + ".", ""]
    for title, file, note in plots:
        lines += [f"## {title}", "", f"![{title}]({file})" if file else f"_{note}_", ""]
    if order:
        test_header, test_rows = _test_rows(h, order, scores)
        lines += ["## Test metrics of the best trials", "", table(test_header, test_rows, markdown=True), ""]
    lines += ["## Trials, ranked", "", table(header, rows, markdown=True), ""]
    causes = cause_lines(h.trials)
    if causes:
        lines += ["## Failed and interrupted trials", "", *(f"- {line}" for line in causes), ""]
    lines += [
        "## `dvc exp show`",
        "",
        "This study's experiments as DVC records them (metrics/distill.json and the params each trial set):",
        "",
        table(exp_header, exp_rows, markdown=True),
        "",
    ]
    return lines


def _learning_curves(h: StudyHandle, plt):
    """Every trial's reported values by step (what the pruner saw), pruned and failed ones included."""
    import optuna

    TS = optuna.trial.TrialState
    styles = {
        TS.COMPLETE: ("tab:blue", "-", "complete"),
        TS.PRUNED: ("tab:red", "--", "pruned"),
        TS.FAIL: ("tab:gray", ":", "failed"),
        TS.RUNNING: ("tab:green", "-.", "running"),
    }
    curves = [t for t in h.trials if t.intermediate_values and t.state in styles]
    if not curves:
        raise ValueError("no trial reported a value yet")
    best_number = b.number if (b := h.best()) else None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    labelled = set()
    for t in curves:
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        color, style, label = styles[t.state]
        is_best = t.number == best_number
        ax.plot(
            steps,
            values,
            color="black" if is_best else color,
            linestyle=style,
            linewidth=2.5 if is_best else 1.2,
            marker="o",
            markersize=3,
            alpha=1.0 if is_best else 0.7,
            zorder=3 if is_best else 2,
            label=f"best (trial {t.number})" if is_best else (None if label in labelled else label),
        )
        labelled.add("best" if is_best else label)
        ax.annotate(str(t.number), (steps[-1], values[-1]), textcoords="offset points", xytext=(4, 0), fontsize=7)
    pruned = sum(t.state == TS.PRUNED for t in curves)
    ax.set_xlabel("step")
    ax.set_ylabel(h.spec["objective"].get("report") or "val_loss")
    ax.set_title(f"{h.name}: learning curves of {len(curves)} trials ({pruned} pruned)")
    ax.legend(loc="best")
    return ax


def _alpha_temperature(h: StudyHandle, plt):
    """Each trial at its (alpha, T), coloured by the objective; pruned trials hollow."""
    import optuna

    TS = optuna.trial.TrialState
    pts = []
    for t in h.trials:
        o = t.overrides
        a, temp = o.get("loss.alpha"), o.get("loss.temperature")
        v = t.last_value
        if (
            isinstance(a, (int, float))
            and isinstance(temp, (int, float))
            and v is not None
            and math.isfinite(v)
            and t.state in (TS.COMPLETE, TS.PRUNED)
        ):
            pts.append((a, temp, v, t.state == TS.PRUNED, t.number))
    if not pts:
        raise ValueError("no trial sets both loss.alpha and loss.temperature")
    fig, ax = plt.subplots(figsize=(7, 5))
    done = [p for p in pts if not p[3]]
    vmin, vmax = min(p[2] for p in pts), max(p[2] for p in pts)
    if done:
        sc = ax.scatter(
            [p[0] for p in done],
            [p[1] for p in done],
            c=[p[2] for p in done],
            cmap="viridis_r",
            vmin=vmin,
            vmax=vmax,
            s=80,
            edgecolors="k",
            label="complete",
        )
        fig.colorbar(sc, ax=ax, label=h.metric)
    pruned = [p for p in pts if p[3]]
    if pruned:
        ax.scatter(
            [p[0] for p in pruned],
            [p[1] for p in pruned],
            facecolors="none",
            edgecolors="tab:red",
            s=80,
            label="pruned (last value)",
        )
    for a, temp, _, _, n in pts:
        ax.annotate(str(n), (a, temp), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("loss.alpha")
    ax.set_ylabel("loss.temperature (KD)")
    ax.set_title(f"{h.name}: alpha x temperature")
    ax.legend(loc="best")
    return ax
