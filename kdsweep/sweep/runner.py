"""``kdsweep run experiments/<study>.yaml``: an Optuna study whose trials are DVC experiments.

    check the spec against params.yaml, dvc.yaml and the student            (plan.py)
    reproduce the upstream stages once, in the workspace, if they are stale
    create or load the study before any worker starts                       (FACTS: no racing creates)
    resume: trials a killed runner left RUNNING are marked failed and re-enqueued
    enqueue the baselines (first run of the study only)
    `workers` threads, each: ask -> sample -> resolve overrides -> `dvc exp run --temp ...` -> tell
    after each trial: upstream untouched? (else stop loudly); keep the best N trials' outputs

How a trial runs is in :mod:`kdsweep.sweep.dvcexp`, how it reports to the pruner in
:mod:`kdsweep.trial_hook`. Each trial's console output goes to
``studies/<study>/logs/<number>.log``; its TensorBoard run directory is ``runs/<study>/<number>``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from kdsweep.config import Params, validate
from kdsweep.dotted import get as dotted_get
from kdsweep.errors import UserError
from kdsweep.optuna_io import check_storage, display, make_pruner, open_storage
from kdsweep.sweep import dvcexp
from kdsweep.sweep.plan import Plan, build_plan
from kdsweep.sweep.space import apply_overrides, optuna_suggest, resolve, sample
from kdsweep.sweep.spec import StudySpec, load_spec
from kdsweep.sweep.study import (
    EXPERIMENT,
    FAIL_REASON,
    INTERRUPTED,
    OUTPUTS,
    OVERRIDES,
    REMOVED,
    RETRY_OF,
    counts_toward_budget,
    headline,
    make_sampler,
    ranked,
    storage_url,
)
from kdsweep.trial_hook import ENV as TRIAL_ENV

HEARTBEAT_S = 30.0  # a RUNNING trial's owner refreshes its heartbeat this often
STALE_AFTER_S = 300.0  # a trial owned by another machine is stale after this long without one


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the study like Ctrl-C: running trials are retried on resume


def _me() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(pid: int | None, started: float | None) -> bool:
    import psutil

    if pid is None:
        return False
    try:
        return started is None or abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def _kill_group(pid: int, proc: subprocess.Popen | None = None, grace: float = 10.0) -> None:
    """SIGINT a trial's process group (DVC then removes its temporary copy), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our child: a zombie still counts as a member of the group
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def student_parameter_names(root: Path, student_dir: Path, key: str) -> list[str]:
    """Parameter names of the student as the training loop sees them (built on the meta device),
    cached per ``models/student_init`` hash in ``studies/.student-params/``."""
    cache = root / "studies" / ".student-params" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import kdsweep.compress  # noqa: F401  (registers the compressed student with the Auto classes)

    try:
        config = AutoConfig.from_pretrained(str(student_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{student_dir}: cannot read the student's config to check patterns: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_parameters()]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(names))
    return names


def _tail(output: str, lines: int = 12, chars: int = 1500) -> str:
    """The informative end of a failed run's output: progress bars and repeats dropped."""
    keep = []
    for line in output.replace("\r", "\n").splitlines():
        s = line.strip()
        if not s or "it/s]" in s or "step/s" in s or "batch/s" in s or s.startswith(("Loading weights", "Writing")):
            continue
        keep.append(s)
    return "\n".join(list(dict.fromkeys(keep))[-lines:])[-chars:]


@dataclass
class TrialRun:
    """What one attempt of ``dvc exp run`` printed, with timings of its phases."""

    rc: int
    output: str
    wall: float
    marks: dict[str, float] = field(default_factory=dict)


class Runner:
    """One ``kdsweep run``: the study, its workers and the trials they run."""

    def __init__(
        self, spec_path: Path, *, workers: int | None = None, n_trials: int | None = None, check_only: bool = False
    ):
        import optuna

        self.optuna = optuna
        self.root = dvcexp.repo_root(Path.cwd())
        spec, _ = load_spec(spec_path)
        updates = {}
        if workers is not None:
            updates["workers"] = workers
        if n_trials is not None:
            updates["budget"] = spec.budget.model_copy(update={"n_trials": n_trials})
        self.spec: StudySpec = spec.model_copy(update=updates)
        self.spec_path = spec_path
        self.check_only = check_only
        self.name = self.spec.study
        self.params_text = (self.root / "params.yaml").read_text()
        self.params_data = yaml.safe_load(self.params_text)
        self.dvc_yaml = yaml.safe_load((self.root / "dvc.yaml").read_text()) or {}
        self.lock = threading.Lock()
        self.retention_lock = threading.Lock()
        self.stop: str | None = None
        self.in_flight: dict[int, int | None] = {}  # trial number -> pid of its dvc process
        self.recomputed = 0
        self.freed = 0
        self.finished_here = 0
        self.logs = self.root / "studies" / self.name / "logs"
        self._locks_by_sha: dict[str, dict] = {}

    # ----------------------------------------------------------------- setup
    def prepare(self) -> Plan:
        """Validate, bring the upstream stages up to date, validate again with the student."""
        static = build_plan(self.spec, self.params_data, self.dvc_yaml, None, source=str(self.spec_path))
        if not self.check_only:
            self._repro_upstream(static.upstream)
        lock_path = self.root / "dvc.lock"
        lock = dvcexp.lock_stages(lock_path.read_text() if lock_path.exists() else None)
        student = self.root / "models" / "student_init"
        names = None
        if student.exists():
            key = next(
                (
                    o.get("md5", "").replace(".dir", "")
                    for st in lock.values()
                    for o in st.get("outs") or []
                    if o.get("path") == "models/student_init"
                ),
                "unknown",
            )
            names = student_parameter_names(self.root, student, key)
        elif not self.check_only:
            raise UserError(f"{student}: missing after `dvc repro`; the sweep needs the student's parameter names")
        else:
            print("note: models/student_init does not exist yet, so patterns were not checked against the student")
        self.plan = build_plan(
            self.spec,
            self.params_data,
            self.dvc_yaml,
            names,
            source=str(self.spec_path),
            check_encoding=lambda o, p: dvcexp.roundtrip_problem(self.params_text, o, p),
        )
        stale = [s for s in self.plan.upstream if s not in lock]
        if stale and not self.check_only:
            raise UserError(f"dvc.lock has no entry for upstream stage(s) {', '.join(stale)}: run `dvc repro` first")
        self.before = {s: lock[s] for s in self.plan.upstream if s in lock}
        return self.plan

    def _repro_upstream(self, upstream: list[str]) -> None:
        """``dvc repro`` of the upstream stages in the workspace (a no-op when up to date)."""
        if not upstream:
            return
        r = subprocess.run(["dvc", "repro", *upstream], cwd=self.root, capture_output=True, text=True)
        ran = [line for line in r.stdout.splitlines() if line.startswith("Running stage")]
        if r.returncode != 0:
            raise UserError(f"dvc repro {' '.join(upstream)} failed before the study:\n{_tail(r.stdout + r.stderr)}")
        if ran:
            print(f"upstream: reproduced before the study: {', '.join(s.split(chr(39))[1] for s in ran)}")
        else:
            print(f"upstream: up to date ({', '.join(upstream)}); trials reuse them")

    def open_study(self):
        """Create the study (or load it) before any worker exists."""
        optuna = self.optuna
        self.url = storage_url(self.spec, self.root)
        self.storage = open_storage(self.url)
        direction = self.spec.objective.direction
        try:
            study = optuna.create_study(
                study_name=self.name,
                storage=self.storage,
                direction=direction,
                pruner=make_pruner(self.spec.pruner.model_dump()),
                load_if_exists=True,
            )
        except ValueError as e:
            raise UserError(f"study {self.name!r} in {display(self.url, self.root)}: {e}") from None
        if study.direction.name.lower() != direction:
            raise UserError(
                f"study {self.name!r} already exists in {display(self.url, self.root)} and "
                f"{study.direction.name.lower()}s; the spec says {direction}. Use another study name."
            )
        study.sampler = make_sampler(self.spec.sampler.model_dump(), offset=len(study.trials))
        study.set_user_attr("spec", json.loads(self.spec.model_dump_json(warnings=False)))
        study.set_user_attr("root", str(self.root))
        self.study = study
        return study

    def recover(self) -> None:
        """Trials left RUNNING by a runner that is gone: adopt a recorded result, else fail and retry."""
        TS = self.optuna.trial.TrialState
        me = self.me
        for t in self.study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
            owner = t.user_attrs.get("runner") or {}
            if owner.get("host") == me["host"]:
                if _alive(owner.get("pid"), owner.get("started")) and owner.get("pid") != me["pid"]:
                    continue  # another live runner on this machine owns it
            elif time.time() - t.user_attrs.get("heartbeat", 0) < STALE_AFTER_S:
                continue  # another machine's runner, recently alive
            child = t.user_attrs.get("child") or {}
            if owner.get("host") == me["host"] and _alive(child.get("pid"), child.get("started")):
                _kill_group(child["pid"])
            name = t.user_attrs.get(EXPERIMENT, f"{self.name}-{t.number}")
            if self._adopt(t, name):
                continue
            freed = dvcexp.clean_tempdirs(self.root, name)
            self.storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
            self.storage.set_trial_user_attr(
                t._trial_id,
                FAIL_REASON,
                "interrupted: the runner stopped during this trial (Ctrl-C or killed); it is retried as a new trial",
            )
            self.study.tell(t.number, state=TS.FAIL)
            self.study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number})
            tqdm.write(
                f"resume: trial {t.number} ({name}) was interrupted; marked failed and re-enqueued"
                + (f" (removed its temporary copy, {freed / 2**20:.1f} MB)" if freed else "")
            )

    def _adopt(self, t, name: str) -> bool:
        """A killed runner's trial whose experiment DVC did record: keep its result."""
        refs = dvcexp.exp_refs(self.root)
        if name not in refs:
            return False
        text = dvcexp.show(self.root, refs[name][1], "metrics/distill.json")
        metrics = json.loads(text) if text else {}
        if metrics.get("state") not in ("complete", "pruned"):
            return False
        self._tell_from_metrics(t.number, t._trial_id, metrics, refs[name][1])
        tqdm.write(f"resume: trial {t.number} ({name}) finished before the runner stopped; result kept")
        return True

    def enqueue_baselines(self) -> None:
        if self.study.user_attrs.get("baselines_enqueued"):
            return
        for k, values in enumerate(self.plan.baselines):
            self.study.enqueue_trial(values, user_attrs={"baseline": k})
        self.study.set_user_attr("baselines_enqueued", True)

    # ----------------------------------------------------------------- the study loop
    def run(self) -> int:
        plan = self.prepare()
        print(plan.summary())
        if self.check_only:
            if problems := check_storage(storage_url(self.spec, self.root)):
                raise UserError("\n".join(problems))
            print("spec OK: nothing run (--check)")
            return 0
        self.copy_paths = [p for p in ("dvc.lock",) if dvcexp.is_untracked(self.root, p)]
        self.baseline_rev = dvcexp.git(self.root, "rev-parse", "HEAD").strip()
        self.cache = Path(self._cache_dir())
        self.me = _me()
        self.open_study()
        self.recover()
        self.enqueue_baselines()
        trials = self.study.get_trials(deepcopy=False)
        self.done = sum(counts_toward_budget(t) for t in trials)
        n = self.spec.budget.n_trials
        self.deadline = time.monotonic() + self.spec.budget.timeout if self.spec.budget.timeout else None
        print(
            f"study {self.name} ({display(self.url, self.root)}): {self.done} finished"
            + (f", {max(0, n - self.done)} to run" if n else "")
            + f", {self.spec.workers} worker(s)"
        )
        self.bar = tqdm(
            total=n,
            initial=min(self.done, n or self.done),
            desc=self.name,
            unit="trial",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        workers = [
            threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True) for i in range(self.spec.workers)
        ]
        self.active = len(workers)
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
            self.bar.close()
        self.retain()
        return self.summarise()

    def _budget_left(self) -> float:
        n = self.spec.budget.n_trials
        return float("inf") if n is None else n - self.done - len(self.in_flight)

    def _worker(self) -> None:
        try:
            while True:
                with self.lock:
                    if self.stop or self._budget_left() <= 0 or (self.deadline and time.monotonic() > self.deadline):
                        return
                    trial = self.study.ask()
                    self.in_flight[trial.number] = None
                try:
                    self._run_trial(trial)
                except Exception as e:  # a bug or an I/O error in the runner itself: fail the trial, stop the study
                    self._fail(trial, f"kdsweep runner error: {type(e).__name__}: {e}", record=False)
                    self.stop = self.stop or f"runner error in trial {trial.number}: {e}"
                finally:
                    with self.lock:
                        self.in_flight.pop(trial.number, None)
        finally:
            with self.lock:
                self.active -= 1

    def _run_trial(self, trial) -> None:
        name = f"{self.name}-{trial.number}"
        values = sample(optuna_suggest(trial), self.plan.space.dims)
        overrides = resolve(self.spec, self.params_data, values)
        store = self.storage
        store.set_trial_user_attr(trial._trial_id, EXPERIMENT, name)
        store.set_trial_user_attr(trial._trial_id, OVERRIDES, json.loads(json.dumps(overrides, default=str)))
        store.set_trial_user_attr(trial._trial_id, "runner", self.me)
        store.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
        try:
            params = validate(apply_overrides(self.params_data, overrides), Params, f"trial {trial.number} params")
        except (UserError, KeyError) as e:
            return self._fail(trial, str(e), overrides=overrides)
        why = dvcexp.roundtrip_problem(self.params_text, overrides, params)
        if why:
            return self._fail(trial, why, overrides=overrides)
        dumped = params.model_dump(mode="json")
        expected = {k: dotted_get(dumped, k) for k in overrides}

        refs = dvcexp.exp_refs(self.root)
        if name in refs:
            tqdm.write(
                f"trial {trial.number}: experiment {name} exists from an earlier study of this name; replacing it"
            )
            dvcexp.remove_experiment(self.root, name)
        cmd = dvcexp.exp_run_command(name, overrides, self.plan.run_stages, self.copy_paths)
        env = self._trial_env(trial, expected)
        run = None
        for attempt in range(self.spec.execution.retries + 1):
            run = self._exec(trial, cmd, env, attempt)
            if self.stop == "interrupt":
                return self._interrupted(trial, name)
            if run.rc == 0 or name in dvcexp.exp_refs(self.root):
                break
            if not dvcexp.TRANSIENT.search(run.output) or attempt == self.spec.execution.retries:
                break
            dvcexp.clean_tempdirs(self.root, name)
            tqdm.write(f"trial {trial.number}: transient git/DVC lock error; retrying ({attempt + 1})")
            time.sleep(1.0 + attempt * 2.0)
        refs = dvcexp.exp_refs(self.root)
        if name not in refs:
            return self._fail(
                trial, _tail(run.output) or f"dvc exp run exited {run.rc}", overrides=overrides, wall=run.wall
            )
        sha = refs[name][1]
        lock = self._exp_lock(sha)
        rebuilt = dvcexp.upstream_problems(lock, self.before, self.plan.upstream, run.output)
        if rebuilt:
            self.recomputed += len(rebuilt)
            self.stop = f"trial {trial.number} rebuilt upstream stage(s): {', '.join(rebuilt)}"
            return self._fail(trial, self.stop, record=False)
        text = dvcexp.show(self.root, sha, "metrics/distill.json")
        metrics = json.loads(text) if text else {}
        self._timings(trial, run, metrics)
        self._tell_from_metrics(trial.number, trial._trial_id, metrics, sha)
        self._finished(trial)

    def _trial_env(self, trial, expected: dict) -> dict[str, str]:
        n = trial.number
        ctx = {
            "storage": self.url,
            "study": self.name,
            "trial_id": trial._trial_id,
            "number": n,
            "pruner": self.spec.pruner.model_dump(),
            "metric": self.spec.objective.report_metric,
            "runner_pid": self.me["pid"],
            "runner_started": self.me["started"],
            "expected": expected,
        }
        env = {
            **os.environ,
            TRIAL_ENV: json.dumps(ctx),
            "KDSWEEP_RUN_DIR": str(self.root / "runs" / self.name / str(n)),
            "KDSWEEP_CHECKPOINT_DIR": str(self.root / "checkpoints" / self.name / str(n)),
            "KDSWEEP_HPARAM_KEYS": ",".join(self.plan.hparam_keys),
        }
        if self.spec.execution.threads_per_trial:
            env["OMP_NUM_THREADS"] = str(self.spec.execution.threads_per_trial)
        return env

    def _exec(self, trial, cmd: list[str], env: dict, attempt: int) -> TrialRun:
        """Run ``dvc exp run``; log its output with timestamps; keep the trial's heartbeat."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{trial.number}.log").open("a")
        log.write(f"# attempt {attempt + 1}: {' '.join(cmd)}\n")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        import psutil

        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = None
        self.storage.set_trial_user_attr(trial._trial_id, "child", {"pid": proc.pid, "started": started})
        with self.lock:
            self.in_flight[trial.number] = proc.pid
        chunks: list[str] = []
        marks: dict[str, float] = {}

        def read() -> None:
            for line in proc.stdout:
                now = time.monotonic() - t0
                chunks.append(line)
                log.write(f"{now:8.2f} {line}")
                for key, text in (
                    ("distill_start", "Running stage 'distill'"),
                    ("reporter", "reports " + self.spec.objective.report_metric + " at every"),
                    ("first_eval", "Step 0: Val Loss"),
                    ("done", "Ran experiment"),
                ):
                    if text in line and key not in marks:
                        marks[key] = now

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        last_beat = time.monotonic()
        while proc.poll() is None:
            if self.stop == "interrupt":
                _kill_group(proc.pid, proc)
                break
            time.sleep(0.2)
            if time.monotonic() - last_beat > HEARTBEAT_S:
                self.storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
                last_beat = time.monotonic()
        rc = proc.wait()
        reader.join(timeout=10)
        wall = time.monotonic() - t0
        log.write(f"# exit {rc} after {wall:.1f} s\n")
        log.close()
        return TrialRun(rc, "".join(chunks), wall, marks)

    def _timings(self, trial, run: TrialRun, metrics: dict) -> None:
        """Where a trial's time went; ``overhead`` is everything but distill's training loop."""
        train = float(metrics.get("train_seconds") or 0.0)
        attrs = {
            "wall_seconds": round(run.wall, 2),
            "train_seconds": train,
            "overhead_seconds": round(run.wall - train, 2),
        }
        m = run.marks
        if "distill_start" in m:
            attrs["dvc_setup_seconds"] = round(m["distill_start"], 2)  # DVC: temporary copy, checkout
        if "distill_start" in m and "reporter" in m:  # process start, imports, params, Optuna
            attrs["distill_import_seconds"] = round(m["reporter"] - m["distill_start"], 2)
        for k, v in attrs.items():
            self.storage.set_trial_user_attr(trial._trial_id, k, v)

    def _tell_from_metrics(self, number: int, trial_id: int, metrics: dict, sha: str) -> None:
        TS = self.optuna.trial.TrialState
        store = self.storage
        for k in ("state", "val_loss", "best_val_loss", "steps"):
            if k in metrics:
                store.set_trial_user_attr(trial_id, k, metrics[k])
        store.set_trial_user_attr(trial_id, "experiment_rev", sha)
        store.set_trial_user_attr(trial_id, OUTPUTS, "kept")
        state = metrics.get("state")
        value = metrics.get(self.spec.objective.metric)
        if state == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
            self.study.tell(number, float(value))
        elif state == "pruned":
            self.study.tell(number, state=TS.PRUNED)
        else:
            store.set_trial_user_attr(
                trial_id, FAIL_REASON, f"distill ended in state {state!r} ({self.spec.objective.metric} = {value!r})"
            )
            self.study.tell(number, state=TS.FAIL)

    def _fail(
        self, trial, reason: str, *, overrides: dict | None = None, wall: float | None = None, record: bool = True
    ) -> None:
        """Mark a trial failed with its reason; record it as a DVC experiment so exp show lists it."""
        TS = self.optuna.trial.TrialState
        self.storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason[-2000:])
        self.storage.set_trial_user_attr(trial._trial_id, "state", "failed")
        if wall is not None:
            self.storage.set_trial_user_attr(trial._trial_id, "wall_seconds", round(wall, 2))
        if record and overrides is not None:
            name = f"{self.name}-{trial.number}"
            try:
                extra = {"dvc.lock": (self.root / "dvc.lock").read_text()} if self.copy_paths else {}
                dvcexp.record_failed(
                    self.root,
                    name,
                    self.baseline_rev,
                    self.params_text,
                    overrides,
                    {"state": "failed", "reason": headline(reason)[:300]},
                    extra,
                )
            except Exception as e:  # recording is a convenience; the study has the reason either way
                tqdm.write(f"trial {trial.number}: could not record the failed experiment: {e}")
        with contextlib.suppress(RuntimeError, ValueError):  # the trial may already be finished
            self.study.tell(trial.number, state=TS.FAIL)
        tqdm.write(f"trial {trial.number} ({self.name}-{trial.number}): failed: {headline(reason)[:200]}")
        self._finished(trial, failed=True)

    def _interrupted(self, trial, name: str) -> None:
        TS = self.optuna.trial.TrialState
        dvcexp.clean_tempdirs(self.root, name)
        self.storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        self.storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, "interrupted (Ctrl-C); retried on resume")
        self.study.tell(trial.number, state=TS.FAIL)
        self.study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})

    def _finished(self, trial, failed: bool = False) -> None:
        with self.lock:
            self.done += 1
            self.finished_here += 1
        t = self.storage.get_trial(trial._trial_id)
        number = t.number
        if not failed:
            v = (
                t.value
                if t.value is not None
                else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else float("nan"))
            )
            tqdm.write(
                f"trial {number} ({t.user_attrs.get(EXPERIMENT)}): {t.user_attrs.get('state')} "
                f"{self.spec.objective.metric} {v:.4f} after {t.user_attrs.get('steps')} steps; "
                f"{t.user_attrs.get('wall_seconds', 0):.1f} s "
                f"(training {t.user_attrs.get('train_seconds', 0):.1f} s)"
            )
        self.bar.update(1)
        try:
            best = self.study.best_trial
            self.bar.set_postfix(best=f"{best.value:.4f} (trial {best.number})", running=len(self.in_flight) - 1)
        except ValueError:
            pass
        self.retain()

    # ----------------------------------------------------------------- retention
    def _cache_dir(self) -> str:
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            return repo.cache.local.path

    def _exp_lock(self, sha: str) -> dict:
        if sha not in self._locks_by_sha:
            self._locks_by_sha[sha] = dvcexp.lock_stages(dvcexp.show(self.root, sha, "dvc.lock"))
        return self._locks_by_sha[sha]

    def retain(self) -> None:
        """Keep the best ``retention.keep_best`` trials' outputs; drop the others' from the DVC cache."""
        keep = self.spec.retention.keep_best
        if keep is None:
            return
        with self.retention_lock:
            trials = ranked(self.study.get_trials(deepcopy=False), self.spec.objective.direction)
            removed = set(self.study.user_attrs.get(REMOVED, []))  # finished trials' attrs are frozen
            drop = [t for t in trials[keep:] if t.user_attrs.get(OUTPUTS) == "kept" and t.number not in removed]
            if not drop:
                return
            refs = dvcexp.exp_refs(self.root)
            dropped_names = {t.user_attrs.get(EXPERIMENT) for t in drop}
            protected = []
            for text in (
                (self.root / "dvc.lock").read_text() if (self.root / "dvc.lock").exists() else None,
                dvcexp.show(self.root, "HEAD", "dvc.lock"),
            ):
                lock = dvcexp.lock_stages(text)
                protected += dvcexp.cached_outs(lock, list(lock))
            for name, (_ref, sha) in refs.items():
                if name not in dropped_names:
                    lock = self._exp_lock(sha)
                    protected += dvcexp.cached_outs(lock, list(lock))
            hashes = []
            for t in drop:
                name = t.user_attrs.get(EXPERIMENT)
                if name in refs:
                    hashes += dvcexp.cached_outs(self._exp_lock(refs[name][1]), self.plan.run_stages)
            freed = dvcexp.delete_objects(
                self.cache, dvcexp.objects(self.cache, hashes) - dvcexp.objects(self.cache, protected)
            )
            for t in drop:
                ckpt = self.root / "checkpoints" / self.name / str(t.number)
                freed += dvcexp.dir_size(ckpt)
                shutil.rmtree(ckpt, ignore_errors=True)
            self.study.set_user_attr(REMOVED, sorted(removed | {t.number for t in drop}))
            self.freed += freed
            kept = ", ".join(str(t.number) for t in trials[:keep])
            tqdm.write(
                f"retention: keeping the outputs of the best {keep} (trials {kept}); removed trials "
                f"{', '.join(str(t.number) for t in drop)}: freed {freed / 2**20:.1f} MB"
            )

    # ----------------------------------------------------------------- the end
    def summarise(self) -> int:
        TS = self.optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        by = {s: sum(t.state == s for t in trials) for s in (TS.COMPLETE, TS.PRUNED, TS.FAIL)}
        interrupted = sum(bool(t.user_attrs.get(INTERRUPTED)) for t in trials)
        print(
            f"study {self.name}: {by[TS.COMPLETE]} complete, {by[TS.PRUNED]} pruned, "
            f"{by[TS.FAIL] - interrupted} failed"
            + (f", {interrupted} interrupted and retried" if interrupted else "")
            + f"; {self.finished_here} run now; upstream recomputations: {self.recomputed}; "
            f"retention freed {self.freed / 2**20:.1f} MB"
        )
        try:
            best = self.study.best_trial
            print(
                f"best: trial {best.number} ({best.user_attrs.get(EXPERIMENT)}) "
                f"{self.spec.objective.metric} {best.value:.4f}; `kdsweep best {self.name}` ranks them, "
                f"`dvc exp show` lists them"
            )
        except ValueError:
            print("no complete trial yet")
        if self.stop and self.stop != "interrupt":
            raise UserError(f"study {self.name} stopped: {self.stop}")
        return 0


def run(spec_path: Path, *, workers: int | None = None, n_trials: int | None = None, check: bool = False) -> int:
    """``kdsweep run``: see the module docstring."""
    return Runner(spec_path, workers=workers, n_trials=n_trials, check_only=check).run()
