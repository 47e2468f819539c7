"""The code's shape, measured: stage deps cover the code each stage runs; no function or class grows too long.

Import closures are derived from the code with ``ast``: a stage's closure starts at the body of
its CLI command (``kdsweep <command>`` in ``dvc.yaml``) and follows every ``kdsweep`` import,
module-level or inside a function, transitively. The CLI modules themselves only parse
arguments and dispatch, so they are not deps (editing a help text must not re-run a teacher);
package ``__init__`` modules hold only a docstring (checked below), so they are not deps either.

One import is not followed, by rule: :data:`NOT_RESULTS` names the modules a stage imports that
do not change what it computes. ``kdsweep distill`` imports :mod:`kdsweep.trial_hook`, which
reports to the sweep's study through the storage code (``optuna_io.py``: journal repair,
database retries); a fix there must not make ``dvc repro`` retrain the student.

The record module is the only code that touches Optuna's user attributes (checked below).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from helpers import REPO

PACKAGE = REPO / "kdsweep"
CLI_MODULES = {"kdsweep/cli.py", "kdsweep/cache/cli.py", "kdsweep/sweep/cli.py"}
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 80, 250
NOT_RESULTS = {"kdsweep.trial_hook"}  # imported by a stage, not part of what it computes (module docstring)
RECORD_MODULE = "kdsweep/sweep/record.py"  # the one module that reads or writes Optuna's user attributes


def module_file(name: str) -> Path | None:
    """The file of a ``kdsweep`` module (``kdsweep.cache.reader``), or None for a name that is not one."""
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(nodes: list[ast.AST], package: str) -> set[str]:
    """Every ``kdsweep`` module that the statements import (``from kdsweep import x`` may name a module)."""
    found = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kdsweep"}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else _resolve_relative(node, package)
            if module.split(".")[0] != "kdsweep":
                continue
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names if module_file(f"{module}.{a.name}")}
    return {m for m in found if module_file(m)}


def _resolve_relative(node: ast.ImportFrom, package: str) -> str:
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*parts, node.module])


def closure(start: set[str]) -> set[str]:
    """The files (repo-relative) of ``start`` and of everything they import, without CLI and ``__init__`` files."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RESULTS:
            continue
        seen.add(name)
        path = module_file(name)
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(imported_modules(tree.body, package) - seen)
    files = {str(module_file(m).relative_to(REPO)) for m in seen}
    return {f for f in files if f not in CLI_MODULES and not f.endswith("__init__.py")}


def command_function(argv: list[str]) -> ast.FunctionDef:
    """The function behind ``kdsweep <argv...>``: found by its name in the CLI module of its group."""
    module = "kdsweep/cli.py" if len(argv) == 1 else f"kdsweep/{argv[0]}/cli.py"
    tree = ast.parse((REPO / module).read_text())
    names = {argv[-1], f"{argv[0]}_{argv[-1]}"}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            return node
    raise AssertionError(f"no command function for `kdsweep {' '.join(argv)}` in {module}")


def stage_closures() -> dict[str, tuple[set[str], set[str]]]:
    """For each dvc.yaml stage: (its import closure, the kdsweep/ files its deps list)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        argv = stage["cmd"].split()
        assert argv[0] == "kdsweep", f"stage {name}: cmd {stage['cmd']!r} is not a kdsweep command"
        fn = command_function([a for a in argv[1:] if not a.startswith("-")])
        out[name] = (
            closure(imported_modules(fn.body, "kdsweep")),
            {d for d in stage["deps"] if d.startswith("kdsweep/")},
        )
    return out


@pytest.mark.parametrize("stage", list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]))
def test_dvc_deps_cover_each_stage_import_closure(stage):
    needed, declared = stage_closures()[stage]
    assert needed, f"stage {stage}: found no kdsweep module behind its command"
    assert needed <= declared, f"dvc.yaml stage {stage}: deps miss {sorted(needed - declared)}"
    assert declared <= needed, f"dvc.yaml stage {stage}: deps list code it does not run: {sorted(declared - needed)}"


def test_compress_and_cache_are_in_the_stages_that_run_them():
    closures = stage_closures()
    for stage in ("student", "distill", "evaluate"):
        assert "kdsweep/compress.py" in closures[stage][0], stage
    assert any(f.startswith("kdsweep/cache") for f in closures["distill"][0])


def test_stages_do_not_import_the_sweep_package_or_each_other():
    for stage, (files, _) in stage_closures().items():
        assert not [f for f in files if f.startswith("kdsweep/sweep/")], f"stage {stage} imports the sweep package"
        others = [f for f in files if f.startswith("kdsweep/stages/") and Path(f).stem != stage]
        assert not others, f"stage {stage} imports another stage's module: {others}"


def test_distill_deps_leave_out_the_trial_hook_and_the_storage_code():
    distill = command_function(["distill"])
    assert "kdsweep.trial_hook" in imported_modules(distill.body, "kdsweep")  # reached, by the rule above
    hook = ast.parse((PACKAGE / "trial_hook.py").read_text())
    assert "kdsweep.optuna_io" in imported_modules(list(ast.walk(hook)), "kdsweep")
    needed, declared = stage_closures()["distill"]
    for storage_code in ("kdsweep/optuna_io.py", "kdsweep/trial_hook.py"):
        assert storage_code not in needed | declared, storage_code


@pytest.mark.slow
def test_editing_the_storage_code_leaves_distill_up_to_date(sweep_repo):
    from sweeprepo import sh

    sh(sweep_repo, "dvc", "repro", "distill")
    assert "distill" not in sh(sweep_repo, "dvc", "status", "--json").stdout
    with (sweep_repo / "kdsweep" / "optuna_io.py").open("a") as f:
        f.write("\n# a fix to the storage code\n")
    with (sweep_repo / "kdsweep" / "trial_hook.py").open("a") as f:
        f.write("\n# a fix to the trial hook\n")
    assert "distill" not in sh(sweep_repo, "dvc", "status", "--json").stdout
    with (sweep_repo / "kdsweep" / "losses.py").open("a") as f:
        f.write("\n# a change to the loss code\n")
    assert "distill" in sh(sweep_repo, "dvc", "status", "--json").stdout  # training code still counts


def test_only_the_record_module_touches_optuna_user_attributes():
    words = re.compile(r"\b(user_attrs|set_user_attr|set_trial_user_attr|enqueue_trial)\b")
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(REPO)) != RECORD_MODULE
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if words.search(line)
    ]
    assert not found, f"Optuna user attributes outside {RECORD_MODULE}: {found}"


def test_package_init_modules_hold_only_a_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        code = [
            n
            for n in body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (
                isinstance(n, ast.Assign) and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["__version__"]
            )
        ]
        assert not code, f"{init.relative_to(REPO)}: code in a package __init__ (it would hide from the stage deps)"


def test_the_sweep_package_index_names_every_module():
    index = ast.get_docstring(ast.parse((PACKAGE / "sweep" / "__init__.py").read_text()))
    modules = sorted(p.name for p in (PACKAGE / "sweep").glob("*.py") if p.name != "__init__.py")
    missing = [name for name in modules if f"``{name}``" not in index]
    assert not missing, f"kdsweep/sweep/__init__.py's index does not name {missing}"


def test_no_function_or_class_is_too_long():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.FunctionDef: MAX_FUNCTION_LINES, ast.AsyncFunctionDef: MAX_FUNCTION_LINES}.get(type(node))
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else limit
            if limit and node.end_lineno - node.lineno + 1 > limit:
                lines = node.end_lineno - node.lineno + 1
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines > {limit}")
    assert not too_long, "\n".join(too_long)
