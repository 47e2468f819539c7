"""``kdsweep run experiments/<study>.yaml``: an Optuna study whose trials are DVC experiments.

    check the spec against params.yaml, dvc.yaml and the student            (preflight.py, plan.py)
    reproduce the upstream stages once, in the workspace, if they are stale
    create or load the study before any worker starts                       (no racing creates)
    resume: trials a killed runner left RUNNING are adopted, or failed and re-enqueued   (outcome.py)
    enqueue the baselines (first run of the study only)         (these three under the study's lock)
    `workers` threads, each: claim a trial within the study's budget, shared by every runner (budget.py)
        -> sample -> resolve overrides -> `dvc exp run --temp ...` -> tell -> push the experiment
    a heartbeat thread keeps this runner's trials alive; runners on other machines fail and retry
        a trial whose heartbeat stopped (its machine died)                          (budget.py, outcome.py)
    after each trial: upstream untouched? (else stop loudly); keep the best N trials' outputs (retention.py)

How one trial's ``dvc exp run`` is started, logged and stopped is in :mod:`kdsweep.sweep.exprun`,
how it reports to the pruner in :mod:`kdsweep.trial_hook`. Each trial's console output goes to
``studies/<study>/logs/<number>.log``; its TensorBoard run directory is ``runs/<study>/<number>``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from kdsweep import warm
from kdsweep.config import Params, validate
from kdsweep.dotted import get as dotted_get
from kdsweep.errors import UserError
from kdsweep.optuna_io import (
    StorageUnavailable,
    check_storage,
    display,
    make_pruner,
    open_storage,
    safe_url,
    storage_lock,
)
from kdsweep.sweep import dvcexp, exprun, selection
from kdsweep.sweep.budget import Heartbeats, StudyBudget, spent, study_start
from kdsweep.sweep.devices import DevicePool, device_sets
from kdsweep.sweep.outcome import Outcomes, backoff, out_of_retries, pause, retry_stale
from kdsweep.sweep.plan import StudyPlan
from kdsweep.sweep.preflight import Workspace, preflight
from kdsweep.sweep.record import StudyRecord, TrialRecord, classify, enqueue, interruption, records
from kdsweep.sweep.results import exp_show_command
from kdsweep.sweep.retention import Retention
from kdsweep.sweep.slurm import task_identity
from kdsweep.sweep.space import apply_overrides, optuna_suggest, resolve, sample
from kdsweep.sweep.spec import StudySpec, load_spec
from kdsweep.sweep.study import make_sampler, storage_url
from kdsweep.trial_hook import ENV as TRIAL_ENV


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the study like Ctrl-C: running trials are retried on resume


def open_study(spec: StudySpec, root: Path, url: str):
    """Create the study (or load it) before any worker exists; returns ``(study, storage)``.

    On a database server the storage has a connection per worker thread and Optuna's trial
    heartbeats (``execution.heartbeat_interval``, ``execution.grace_period``).
    """
    import optuna

    ex = spec.execution
    heartbeat = None if url.startswith("journal:") else (ex.heartbeat_interval, ex.grace_period)
    on_stale = functools.partial(retry_stale, ex.infra_retries)
    storage = open_storage(url, connections=spec.workers, heartbeat=heartbeat, on_stale=on_stale)
    direction = spec.objective.direction
    try:
        study = optuna.create_study(
            study_name=spec.study,
            storage=storage,
            direction=direction,
            pruner=make_pruner(spec.pruner.model_dump()),
            load_if_exists=True,
        )
    except ValueError as e:
        raise UserError(f"study {spec.study!r} in {display(url, root)}: {e}") from None
    check_objective(study, spec, display(url, root))
    study.sampler = make_sampler(spec.sampler.model_dump(), offset=len(study.trials))
    # The spec as the study keeps it: readers of the study need no password, so it is not stored.
    stored = json.loads(spec.model_dump_json(warnings=False)) | {"storage": spec.storage and safe_url(spec.storage)}
    StudyRecord.set_spec(study, stored, str(root))
    return study, storage


def check_objective(study, spec: StudySpec, where: str) -> None:
    """Store the study's objective when it is new; refuse a spec whose metric or direction differs
    from it (a resume would rank trials of two objectives together)."""
    new = {"metric": spec.objective.metric, "direction": spec.objective.direction}
    old = StudyRecord.of(study).objective or {"metric": new["metric"], "direction": study.direction.name.lower()}
    if old != new:
        raise UserError(
            f"study {spec.study!r} in {where} {old['direction']}s {old['metric']}; the spec's objective says "
            f"{new['direction']} {new['metric']}. Set objective back to metric: {old['metric']}, direction: "
            f"{old['direction']}, or use another study name"
        )
    StudyRecord.set_objective(study, new["metric"], new["direction"])


def enqueue_baselines(study, plan: StudyPlan) -> None:
    """Enqueue the spec's baselines, once per study."""
    if StudyRecord.of(study).baselines_enqueued:
        return
    for k, values in enumerate(plan.baselines):
        enqueue(study, values, baseline=k)
    StudyRecord.set_baselines_enqueued(study)


def run(spec_path: Path, *, workers: int | None = None, n_trials: int | None = None, check: bool = False) -> int:
    """``kdsweep run``: see the module docstring."""
    root = dvcexp.repo_root(Path.cwd())
    spec, _ = load_spec(spec_path)
    updates = {} if workers is None else {"workers": workers}
    if n_trials is not None:
        updates["budget"] = spec.budget.model_copy(update={"n_trials": n_trials})
    spec = spec.model_copy(update=updates)
    # The trials' warm process starts first: its imports (seconds) overlap the checks, the
    # upstream stages and opening the study, instead of delaying the first trial.
    zygote = warm.Zygote(spec.execution.warm_start and not check)
    try:
        return _run(spec, spec_path, root, zygote, check=check)
    finally:
        zygote.stop()


def _run(spec: StudySpec, spec_path: Path, root: Path, zygote: warm.Zygote, *, check: bool) -> int:
    devices = device_sets(spec)
    spec = spec.model_copy(update={"workers": devices.workers})
    ws = Workspace.read(root)
    plan, before = preflight(spec, spec_path, ws, check_only=check)
    plan.devices = devices
    print(plan.summary())
    if problems := check_storage(storage_url(spec, root)):
        raise UserError("\n".join(problems))
    if check:
        print("spec OK: nothing run (--check)")
        return 0
    copy_paths = [p for p in ("dvc.lock",) if dvcexp.is_untracked(root, p)]
    me = exprun.process_identity() | task_identity(os.environ)  # a Slurm task also names its job and task
    url = storage_url(spec, root)
    # Runners started together: one creates the study (and Optuna's tables), and baselines are enqueued once.
    with storage_lock(url, spec.study):
        study, storage = open_study(spec, root, url)
        started = study_start(study)
        outcomes = Outcomes(study, storage, url, spec, root, ws.params_text, copy_paths)
        outcomes.recover(me)
        outcomes.retry_abandoned()
        enqueue_baselines(study, plan)
        done = spent(records(study))
    n = spec.budget.n_trials
    print(
        f"study {spec.study} ({display(url, root)}): {done} finished"
        + (f", {max(0, n - done)} to run by this and any other runner" if n else "")
        + f", {spec.workers} worker(s) here"
    )
    return Runner(ws, plan, before, outcomes, url, me, copy_paths, (started, done), zygote).run()


class Runner:
    """The study loop: ``workers`` threads, each running trials until the budget is spent or a stop."""

    def __init__(
        self,
        ws: Workspace,
        plan: StudyPlan,
        before: dict,
        outcomes: Outcomes,
        url: str,
        me: dict,
        copy_paths: list[str],
        progress: tuple[float, int],
        zygote: warm.Zygote,
    ):
        self.ws, self.root, self.plan, self.spec = ws, ws.root, plan, plan.spec
        self.name = self.spec.study
        self.before = before  # upstream stages' dvc.lock entries, which every trial must keep
        self.outcomes, self.study, self.storage = outcomes, outcomes.study, outcomes.storage
        self.url, self.me, self.copy_paths = url, me, copy_paths
        self.zygote = zygote  # the trials' distill processes fork from it (kdsweep.warm)
        self.retention = Retention(
            self.root, self.name, self.spec.retention.keep_best, self.spec.objective.direction, plan.run_stages
        )
        self.logs = self.root / "studies" / self.name / "logs"
        self.lock = threading.Lock()
        self.stop: str | None = None  # "interrupt", or why the study must stop
        self.storage_lost = False  # the study's storage took no writes even after retries
        self.in_flight: set[int] = set()  # trial numbers being run
        started, done = progress  # the study's start (unix time), trials that count toward the budget
        self.finished_here = 0
        self.recomputed = 0
        self.active = self.spec.workers  # worker threads still running
        execution = self.spec.execution
        self.devices = DevicePool(plan.devices)  # at least one device set per worker (devices.device_sets)
        self.heartbeats = Heartbeats(outcomes.beat, execution.heartbeat_interval)
        self.budget = StudyBudget(
            self.study,
            url,
            self.spec.budget,
            started,
            reap=lambda: outcomes.reap(me),
            own=self._own,
            poll_s=min(execution.heartbeat_interval, 10),
        )
        n = self.spec.budget.n_trials
        self.bar = tqdm(
            total=n, initial=min(done, n or done), desc=self.name, unit="trial", dynamic_ncols=True, file=sys.stderr
        )

    def run(self) -> int:
        """Run the workers until the budget, the timeout or a stop; then report. Ctrl-C re-raises."""
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        workers = [threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True) for i in range(self.active)]
        try:
            for w in workers:
                w.start()
            # Not Thread.join(): a KeyboardInterrupt inside join() can leave a running thread
            # looking stopped (CPython < 3.13); sleeping is safe to interrupt.
            while self.active:
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.stop = self.stop or "interrupt"
            tqdm.write("interrupted: stopping the running trials (they are retried when you run this again)")
            deadline = time.monotonic() + 60
            while self.active and time.monotonic() < deadline:
                time.sleep(0.2)  # each worker stops its trial's processes and re-enqueues the trial
            raise
        finally:
            signal.signal(signal.SIGTERM, old_term)
            self.heartbeats.close()
            self.bar.close()
        if self.storage_lost:  # nothing more can be written: say why, and leave the rest to the resume
            raise UserError(f"study {self.name} stopped: {self.stop}")
        self.retention.retain(self.study)
        return self.summarise()

    def _worker(self) -> None:
        import optuna

        try:
            while True:
                trial = self.budget.claim(self._mine, lambda: self.stop is not None)
                if trial is None:
                    return
                self.bar.n = self.budget.counted
                self.bar.refresh()
                try:
                    with self.devices.take(trial.number):
                        attempt = self._run_trial(trial)
                    if attempt:
                        pause(backoff(attempt - 1), lambda: self.stop is not None)
                except StorageUnavailable as e:  # nothing more can be recorded: stop; a resume retries the trial
                    self.stop = self.stop or str(e)
                    self.storage_lost = True
                except optuna.exceptions.UpdateFinishedTrialError:
                    tqdm.write(
                        f"trial {trial.number}: another runner failed it (no heartbeat from this one for the grace "
                        f"period) and runs its params again; this run's result is dropped"
                    )
                except Exception as e:  # a bug or an I/O error in the runner itself: fail the trial, stop the study
                    self._fail(trial, f"kdsweep runner error: {type(e).__name__}: {e}")
                    self.stop = self.stop or f"runner error in trial {trial.number}: {e}"
                finally:
                    self.heartbeats.discard(trial)
                    with self.lock:
                        self.in_flight.discard(trial.number)
        finally:
            with self.lock:
                self.active -= 1

    def _own(self, trial) -> None:
        """A trial this runner just claimed: its owner and first heartbeat, then one every interval."""
        with self.lock:
            self.in_flight.add(trial.number)
        self.outcomes.own(trial, self.me)
        self.heartbeats.add(trial)

    def _mine(self) -> set[int]:
        with self.lock:
            return set(self.in_flight)

    def _run_trial(self, trial) -> int | None:
        """Run one trial to its end in the study; returns the attempt number of its retry when the
        infrastructure interrupted it (the worker backs off before its next claim), else None."""
        name = f"{self.name}-{trial.number}"
        overrides = resolve(self.spec, self.ws.params_data, sample(optuna_suggest(trial), self.plan.space.dims))
        self.outcomes.set(trial, experiment=name, overrides=json.loads(json.dumps(overrides, default=str)))
        try:
            params = validate(apply_overrides(self.ws.params_data, overrides), Params, f"trial {trial.number} params")
        except (UserError, KeyError) as e:
            return self._fail(trial, str(e), overrides=overrides)
        why = dvcexp.roundtrip_problem(self.ws.params_text, overrides, params)
        if why:
            return self._fail(trial, why, overrides=overrides)
        if name in dvcexp.exp_refs(self.root):
            tqdm.write(
                f"trial {trial.number}: experiment {name} exists from an earlier study of this name; replacing it"
            )
            dvcexp.remove_experiment(self.root, name)
        dumped = params.model_dump(mode="json")
        run = exprun.run_experiment(
            self.zygote.command(exprun.exp_run_command(name, overrides, self.plan.run_stages, self.copy_paths)),
            root=self.root,
            env=self._trial_env(trial, {k: dotted_get(dumped, k) for k in overrides}),
            log=self.logs / f"{trial.number}.log",
            name=name,
            retries=self.spec.execution.retries,
            watch=exprun.Watch(
                started=lambda child: self.outcomes.set(trial, child=child),
                stopping=lambda: self.stop == "interrupt",
            ),
        )
        if self.stop == "interrupt":
            cause = interruption("runner", "the runner was stopped (Ctrl-C or SIGTERM); retried on resume")
            self.outcomes.interrupt(trial, name, cause, cause.line)
            return None
        refs = dvcexp.exp_refs(self.root)
        if name not in refs:
            reason = exprun.tail(run.output) or f"dvc exp run exited {run.rc}"
            cause = classify(reason)
            if cause.infra:
                return self._interrupted(trial, name, cause, reason)
            return self._fail(trial, reason, overrides=overrides, wall=run.wall)
        rebuilt = dvcexp.upstream_problems(
            dvcexp.exp_lock(self.root, refs[name][1]), self.before, self.plan.upstream, run.output
        )
        if rebuilt:
            self.recomputed += len(rebuilt)
            self.stop = f"trial {trial.number} rebuilt upstream stage(s): {', '.join(rebuilt)}"
            return self._fail(trial, self.stop)
        text = dvcexp.show(self.root, refs[name][1], "metrics/distill.json")
        metrics = json.loads(text) if text else {}
        self.outcomes.set(trial, **exprun.timings(run, metrics))
        self.outcomes.tell_from_metrics(trial, metrics, refs[name][1])
        self._finished(trial)
        return None

    def _interrupted(self, trial, name: str, cause, reason: str) -> int | None:
        """An infrastructure interruption: retried, or past ``execution.infra_retries`` the study stops."""
        attempt = self.outcomes.interrupt(trial, name, cause, reason)
        if attempt == 0:
            self.stop = self.stop or out_of_retries(trial.number, name, self.spec.execution.infra_retries, cause)
        return attempt or None

    def _trial_env(self, trial, expected: dict) -> dict[str, str]:
        """The environment of a trial's ``dvc exp run``: its Optuna context, its own output directories and devices."""
        ctx = {
            "storage": self.url,
            "study": self.name,
            "trial_id": trial._trial_id,
            "number": trial.number,
            "pruner": self.spec.pruner.model_dump(),
            "metric": self.spec.objective.report_metric,
            "grace_period": self.spec.execution.grace_period,
            "runner_pid": self.me["pid"],
            "runner_started": self.me["started"],
            "expected": expected,
        }
        env = {
            **os.environ,
            TRIAL_ENV: json.dumps(ctx),
            "KDSWEEP_RUN_DIR": str(self.root / "runs" / self.name / str(trial.number)),
            "KDSWEEP_CHECKPOINT_DIR": str(self.root / "checkpoints" / self.name / str(trial.number)),
            "KDSWEEP_HPARAM_KEYS": ",".join(self.plan.hparam_keys),
        }
        if self.spec.execution.threads_per_trial:
            env["OMP_NUM_THREADS"] = str(self.spec.execution.threads_per_trial)
        return env | self.zygote.env | self.devices.env(trial.number)

    def _fail(self, trial, reason: str, *, overrides: dict | None = None, wall: float | None = None) -> None:
        self.outcomes.fail(trial, reason, overrides=overrides, wall=wall)
        self._finished(trial, failed=True)

    def _finished(self, trial, failed: bool = False) -> None:
        with self.lock:
            self.finished_here += 1
        if not failed:
            done = TrialRecord.of(self.storage.get_trial(trial._trial_id))
            tqdm.write(_result_line(done, self.spec.objective.metric))
        self.bar.update(1)
        best = selection.best(records(self.study), self.spec.objective.direction)
        if best is not None:
            self.bar.set_postfix(best=f"{best.value:.4f} (trial {best.number})", running=len(self.in_flight) - 1)
        self.retention.retain(self.study)

    def summarise(self) -> int:
        """Print the study's totals and its best trial; a stop other than Ctrl-C is an error."""
        trials = records(self.study)
        by = {s: sum(t.ended == s for t in trials) for s in ("complete", "pruned", "failed", "interrupted")}
        print(
            f"study {self.name}: {by['complete']} complete, {by['pruned']} pruned, {by['failed']} failed"
            + (f", {by['interrupted']} interrupted (spent no budget)" if by["interrupted"] else "")
            + f"; {self.finished_here} run now; upstream recomputations: {self.recomputed}; "
            f"retention freed {self.retention.freed / 2**20:.1f} MB"
        )
        best = selection.best(trials, self.spec.objective.direction)
        if best is not None:
            print(
                f"best: trial {best.number} ({best.experiment}) "
                f"{self.spec.objective.metric} {best.value:.4f}; `kdsweep best {self.name}` ranks them"
            )
            print(f"the trials in DVC, best first: {exp_show_command(self.name, self.spec.storage)}")
        else:
            print("no complete trial yet")
        if self.stop and self.stop != "interrupt":
            raise UserError(f"study {self.name} stopped: {self.stop}")
        return 0


def _result_line(t: TrialRecord, metric: str) -> str:
    """One finished trial's line: state, objective (else its last report), steps and time."""
    v = t.last_value if t.last_value is not None else float("nan")
    return (
        f"trial {t.number} ({t.experiment}): {t.get('state')} "
        f"{metric} {v:.4f} after {t.get('steps')} steps; "
        f"{t.get('wall_seconds', 0):.1f} s "
        f"(training {t.get('train_seconds', 0):.1f} s)"
    )
