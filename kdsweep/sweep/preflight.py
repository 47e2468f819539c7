"""Before the first trial of ``kdsweep run``: check the spec, bring the upstream stages up to date.

plan without the student (spec vs params.yaml and dvc.yaml)           (plan.py)
`dvc repro <upstream stages>` in the workspace, if stale               (not with --check)
read the student's parameter names (built on the meta device, cached per student hash)
plan again, now checking patterns against the student and `-S` encodings with DVC's code
remember the upstream stages' dvc.lock entries: a trial must leave them unchanged
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdsweep.config import nonempty, parse_yaml, read_text_file
from kdsweep.errors import UserError
from kdsweep.fsio import write_text
from kdsweep.sweep import dvcexp
from kdsweep.sweep.exprun import tail
from kdsweep.sweep.plan import StudyPlan, build_plan
from kdsweep.sweep.spec import StudySpec

STUDENT = "models/student_init"


@dataclass
class Workspace:
    """The repository a study runs in, and the pipeline files it read at the start."""

    root: Path
    params_text: str
    params_data: Any
    dvc_yaml: dict

    @classmethod
    def read(cls, root: Path) -> Workspace:
        """Read ``params.yaml`` and ``dvc.yaml`` of the repository at ``root``."""
        fix = "run kdsweep from the pipeline's repository, or restore it: `git checkout -- {}`"
        params_text = read_text_file(root / "params.yaml", fix.format("params.yaml"))
        params = nonempty(parse_yaml(params_text, root / "params.yaml"), root / "params.yaml")
        dvc_path = root / "dvc.yaml"
        dvc_yaml = nonempty(parse_yaml(read_text_file(dvc_path, fix.format("dvc.yaml")), dvc_path), dvc_path)
        if not isinstance(dvc_yaml, dict) or not isinstance(dvc_yaml.get("stages"), dict):
            raise UserError(
                f"{dvc_path}: needs a `stages:` mapping of stage names to stages (see DVC's dvc.yaml format)"
            )
        return cls(root, params_text, params, dvc_yaml)


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
    write_text(cache, json.dumps(names))
    return names


def repro_upstream(root: Path, upstream: list[str]) -> None:
    """``dvc repro`` of the upstream stages in the workspace (a no-op when up to date)."""
    if not upstream:
        return
    # Another runner of this clone may be reproducing them right now: wait for its lock, then find them up to date.
    r = subprocess.run(["dvc", "--wait-for-lock", "repro", *upstream], cwd=root, capture_output=True, text=True)
    ran = [line for line in r.stdout.splitlines() if line.startswith("Running stage")]
    if r.returncode != 0:
        raise UserError(f"dvc repro {' '.join(upstream)} failed before the study:\n{tail(r.stdout + r.stderr)}")
    if ran:
        print(f"upstream: reproduced before the study: {', '.join(s.split(chr(39))[1] for s in ran)}")
    else:
        print(f"upstream: up to date ({', '.join(upstream)}); trials reuse them")


def _student_names(ws: Workspace, lock: dict, check_only: bool) -> list[str] | None:
    """The student's parameter names, or None (with a note) under ``--check`` before it exists."""
    student = ws.root / STUDENT
    if student.exists():
        key = next(
            (
                o.get("md5", "").replace(".dir", "")
                for st in lock.values()
                for o in st.get("outs") or []
                if o.get("path") == STUDENT
            ),
            "unknown",
        )
        return student_parameter_names(ws.root, student, key)
    if not check_only:
        raise UserError(f"{student}: missing after `dvc repro`; the sweep needs the student's parameter names")
    print(f"note: {STUDENT} does not exist yet, so patterns were not checked against the student")
    return None


def preflight(spec: StudySpec, spec_path: Path, ws: Workspace, *, check_only: bool) -> tuple[StudyPlan, dict]:
    """Validate, bring the upstream stages up to date, validate again with the student.

    Returns the plan and the upstream stages' ``dvc.lock`` entries every trial must keep.
    """
    if why := dvcexp.experiment_name_problem(ws.root, f"{spec.study}-0"):
        raise UserError(f"{spec_path}: study {spec.study!r} cannot name its trials' DVC experiments ({why}); rename it")
    static = build_plan(spec, ws.params_data, ws.dvc_yaml, None, source=str(spec_path))
    if not check_only:
        repro_upstream(ws.root, static.upstream)
    lock_path = ws.root / "dvc.lock"
    lock = dvcexp.lock_stages(lock_path.read_text() if lock_path.exists() else None)
    plan = build_plan(
        spec,
        ws.params_data,
        ws.dvc_yaml,
        _student_names(ws, lock, check_only),
        source=str(spec_path),
        check_encoding=lambda o, p: dvcexp.roundtrip_problem(ws.params_text, o, p),
    )
    stale = [s for s in plan.upstream if s not in lock]
    if stale and not check_only:
        raise UserError(f"dvc.lock has no entry for upstream stage(s) {', '.join(stale)}: run `dvc repro` first")
    return plan, {s: lock[s] for s in plan.upstream if s in lock}
