"""Everything the sweep asks of DVC and git, except running a trial (that is :mod:`kdsweep.sweep.exprun`).

- ``-S`` values: a trial's params overrides in Hydra's override grammar (what ``dvc exp run -S``
  parses); before any trial the runner applies them with DVC's own code to a copy of
  ``params.yaml`` and checks that the result validates to exactly the intended params
  (:func:`roundtrip_problem`);
- experiment refs: after a trial, the experiment's files are read straight from its git ref
  (``refs/exps/<baseline>/<name>``) rather than through ``dvc exp show`` (2.5 s on this machine);
- ``dvc.lock``: did a trial rebuild an upstream stage;
- failed trials recorded as experiments, and what a killed ``dvc exp run --temp`` left behind;
- sharing experiments between clones: ``dvc exp push`` / ``dvc exp pull`` of one experiment.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from kdsweep.errors import UserError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Lock contention between concurrent `dvc exp run --temp` processes (git index, refs, DVC's
# repo lock): worth retrying. Anything else is the trial's own failure.
TRANSIENT = re.compile(
    r"Unable to acquire lock|Lock is already held|index\.lock|cannot lock ref|unable to create .*\.lock"
    r"|LockError|is locked|Resource temporarily unavailable|database is locked",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- -S values
def hydra_value(v: Any) -> str:
    """``v`` in Hydra's override grammar, the syntax of ``dvc exp run -S key=value``.

    Floats always carry a dot (Hydra reads ``1e-05`` as a string); strings are single-quoted,
    with backslashes doubled only before a quote or at the end (Hydra's rule) and ``${`` escaped
    (Hydra would interpolate it).
    """
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        s = repr(v)
        if "e" in s and "." not in s.split("e")[0]:
            s = s.replace("e", ".0e")
        return s
    if isinstance(v, str):
        s = re.sub(r"(\\*)'", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "'", v)
        s = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, s)
        return "'" + s.replace("${", "\\${") + "'"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        for k in v:
            if not isinstance(k, str) or not _IDENT.match(k):
                raise ValueError(f"mapping key {k!r} cannot be written in a -S value")
        return "{" + ", ".join(f"{k}: {hydra_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"cannot write {type(v).__name__} {v!r} as a -S value")


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """``-S`` arguments for ``dvc exp run`` (``++`` sets a key whether or not params.yaml has it)."""
    args = []
    for key, value in overrides.items():
        args += ["-S", f"params.yaml:++{key}={hydra_value(value)}"]
    return args


def apply_set_params(params_path: Path, overrides: dict[str, Any]) -> None:
    """Apply overrides to a params file exactly as ``dvc exp run -S`` does (DVC's own code)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(params_path, [a.split(":", 1)[1] for a in set_param_args(overrides)[1::2]])


def roundtrip_problem(params_text: str, overrides: dict[str, Any], expected) -> str | None:
    """Whether ``dvc exp run -S`` would give ``expected`` (a validated Params) from ``params_text``."""
    from kdsweep.config import Params, validate

    with tempfile.TemporaryDirectory(prefix="kdsweep-S-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(params_text)
        try:
            apply_set_params(path, overrides)
            got = validate(yaml.safe_load(path.read_text()), Params, "params.yaml after -S")
        except (ValueError, UserError, Exception) as e:  # DVC raises its own error classes
            return f"dvc exp run -S cannot carry these overrides: {type(e).__name__}: {e}"
    want, have = expected.model_dump(mode="json"), got.model_dump(mode="json")
    if want != have:
        diff = [k for k in want if want[k] != have.get(k)]
        return f"dvc exp run -S would change {', '.join(diff)} differently from the sampled values"
    return None


# --------------------------------------------------------------------------- experiment names
def experiment_name_problem(root: Path, name: str) -> str | None:
    """Why ``dvc exp run -n <name>`` would refuse ``name``, or None: DVC's own check (git's
    ``check-ref-format`` rules on ``refs/exps/<baseline>/<name>``, and no ``/``)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.repo.experiments.refs import ExpRefInfo
    from dvc.repo.experiments.utils import check_ref_format
    from scmrepo.git import Git

    scm = Git(str(root))
    try:
        # The baseline commit does not change whether a name is valid: any well-formed one will do.
        check_ref_format(scm, ExpRefInfo(baseline_sha="0" * 40, name=name))
    except InvalidArgumentError as e:
        return str(e)
    finally:
        scm.close()
    return None


# --------------------------------------------------------------------------- git
def git(root: Path, *args: str, check: bool = True, env: dict | None = None, input: str | None = None) -> str:
    """``git <args>`` in ``root``; its stdout (raises RuntimeError with git's message when ``check``)."""
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def repo_root(start: Path) -> Path:
    """The git repository holding ``start``; it must hold dvc.yaml and a first commit."""
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"{start}: not inside a git repository; DVC experiments need git (git init, then commit)")
    root = Path(r.stdout.strip())
    if not (root / "dvc.yaml").is_file():
        raise UserError(f"{root}: no dvc.yaml; run kdsweep from the pipeline's repository")
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        raise UserError(f"{root}: the repository has no commit yet; DVC experiments need one (git add -A; git commit)")
    ident = subprocess.run(["git", "var", "GIT_COMMITTER_IDENT"], cwd=root, capture_output=True, text=True)
    if ident.returncode != 0:
        raise UserError(
            "git has no identity, and every trial is a commit: set git config user.name and "
            "user.email (or GIT_COMMITTER_NAME / GIT_COMMITTER_EMAIL)"
        )
    return root


def is_untracked(root: Path, path: str) -> bool:
    """Whether ``path`` exists but git does not track it (a trial's temporary copy would miss it)."""
    return (root / path).exists() and subprocess.run(
        ["git", "ls-files", "--error-unmatch", path], cwd=root, capture_output=True
    ).returncode != 0


def exp_refs(root: Path) -> dict[str, tuple[str, str]]:
    """Experiment name -> (ref, commit) for every DVC experiment in the repository."""
    out = {}
    for line in git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/").splitlines():
        ref, sha = line.split()
        parts = ref.split("/")
        if len(parts) == 5 and parts[2] != "exec":  # refs/exps/ab/cdef.../<name>
            out[parts[4]] = (ref, sha)
    return out


def show(root: Path, rev: str, path: str) -> str | None:
    """The text of ``path`` at commit ``rev``, or None if it has none."""
    r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def remove_experiment(root: Path, name: str) -> None:
    """Delete an experiment's ref (what ``dvc exp remove`` does for a local experiment)."""
    refs = exp_refs(root)
    if name in refs:
        git(root, "update-ref", "-d", refs[name][0])


# --------------------------------------------------------------------------- dvc.lock
def lock_stages(text: str | None) -> dict[str, Any]:
    """The ``stages`` mapping of a ``dvc.lock`` text (empty for None)."""
    if not text:
        return {}
    # libyaml's parser: `best` and retention read one lock per trial, and the pure-Python one took
    # ~0.25 s per lock (most of `kdsweep best`'s time at 40 trials); same constructor, same result.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return (yaml.load(text, Loader=loader) or {}).get("stages") or {}


def upstream_problems(trial_lock: dict, before: dict, upstream: list[str], output: str) -> list[str]:
    """Signs that a trial rebuilt an upstream stage: DVC said it ran it, or its lock entry changed."""
    found = []
    for stage in upstream:
        if re.search(rf"Running stage '{re.escape(stage)}'", output):
            found.append(f"{stage} (DVC ran it)")
        elif stage in before and trial_lock.get(stage) != before[stage]:
            found.append(f"{stage} (its dvc.lock entry changed)")
    return found


@functools.lru_cache(maxsize=4096)
def exp_lock(root: Path, sha: str) -> dict[str, Any]:
    """The ``dvc.lock`` stages of an experiment commit (cached: a commit never changes; do not mutate)."""
    return lock_stages(show(root, sha, "dvc.lock"))


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------- failed trials
def record_failed(
    root: Path,
    name: str,
    baseline: str,
    params_text: str,
    overrides: dict[str, Any],
    metrics: dict,
    extra_files: dict[str, str],
) -> str:
    """Make a failed trial an experiment too, so ``dvc exp show`` lists it with its params and state.

    DVC keeps no commit for a run that failed, so this writes one the way DVC would have: the
    baseline's tree with the trial's ``params.yaml`` (applied by DVC's own ``-S`` code) and a
    ``metrics/distill.json`` saying ``state: failed``, under ``refs/exps/<baseline>/<name>``.
    The user's index and workspace are not touched (a private index file is used).
    """
    with tempfile.TemporaryDirectory(prefix="kdsweep-failed-") as tmp:
        params_path = Path(tmp) / "params.yaml"
        params_path.write_text(params_text)
        apply_set_params(params_path, overrides)
        files = {
            "params.yaml": params_path.read_text(),
            "metrics/distill.json": json.dumps(metrics, indent=2) + "\n",
            **extra_files,
        }
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(root, "read-tree", baseline, env=env)
        for path, text in files.items():
            blob = git(root, "hash-object", "-w", "--stdin", input=text).strip()
            git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = git(root, "write-tree", env=env).strip()
    commit = git(root, "commit-tree", tree, "-p", baseline, "-m", f"kdsweep: failed trial {name}").strip()
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    git(root, "update-ref", ref, commit)
    return commit


# --------------------------------------------------------------------------- temporary workspaces
def clean_tempdirs(root: Path, name: str) -> int:
    """Remove what a killed ``dvc exp run --temp`` for experiment ``name`` left behind
    (its temporary copy and run record); returns the bytes freed."""
    freed = 0
    run_dir = root / ".dvc" / "tmp" / "exps" / "run"
    for info in run_dir.glob("*/*.run"):
        try:
            data = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if data.get("name") != name:
            continue
        tmp = Path(data.get("root_dir") or "")
        if tmp.is_dir() and (root / ".dvc" / "tmp" / "exps") in tmp.parents:
            freed += dir_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(info.parent, ignore_errors=True)
    return freed


# --------------------------------------------------------------------------- sharing between clones
def _dvc_exp(root: Path, verb: str, remote: str, name: str, tries: int = 4) -> str | None:
    """``dvc exp <verb> <remote> <name>``, retried on lock contention; None when it worked, else why not.

    ``--wait-for-lock``: a ``dvc exp run`` of another trial may hold the repository's lock for a moment.
    """
    for attempt in range(tries):
        r = subprocess.run(
            ["dvc", "--wait-for-lock", "exp", verb, remote, name], cwd=root, capture_output=True, text=True
        )
        output = (r.stderr or r.stdout).strip()
        if r.returncode == 0:
            return None
        if not TRANSIENT.search(output) or attempt == tries - 1:
            return output[-1000:] or f"dvc exp {verb} exited {r.returncode}"
        time.sleep(1.0 + 2.0 * attempt)
    return None


def push_experiment(root: Path, remote: str, name: str) -> str | None:
    """Push experiment ``name``: its git ref to the git remote ``remote``, its outputs to the default
    DVC remote (``dvc exp push``). None when it worked, else DVC's message."""
    return _dvc_exp(root, "push", remote, name)


def pull_experiment(root: Path, remote: str, name: str) -> str | None:
    """Fetch experiment ``name`` that another clone pushed (``dvc exp pull``): None when it worked, else why not."""
    return _dvc_exp(root, "pull", remote, name)
