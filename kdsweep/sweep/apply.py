"""``kdsweep best --apply``: bring a trial into the workspace without losing what the user wrote.

    edits = hand_edits(root)                 # dotted keys where params.yaml differs from HEAD's
    if edits and not force: UserError        # names them; --force keeps them (except swept keys)
    dvc exp apply <experiment>               # dvc.lock, metrics, outputs of the trial
    params.yaml = before + trial overrides   # only the keys the trial set change; comments stay

``dvc exp apply`` writes the experiment's whole ``params.yaml`` anew, which would revert an
uncommitted edit of any key (swept or not) and drop comments; so the file is rewritten from
the text it had before, with only the trial's overrides (its ``overrides`` attribute) set, and
with ruamel.yaml, so comments, quotes and layout of everything else stay.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kdsweep.config import parse_yaml, read_text_file
from kdsweep.dotted import set_ as dotted_set
from kdsweep.errors import UserError
from kdsweep.fsio import write_text

PARAMS = "params.yaml"
_MISSING = object()


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: scalar}`` of nested mappings and lists (an empty mapping or list is a leaf)."""
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data:
        return {k: v for i, value in enumerate(data) for k, v in leaves(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def changed_keys(before: Any, after: Any) -> list[str]:
    """The dotted keys whose value differs between two parsed YAML documents (added and removed too)."""
    a, b = leaves(before), leaves(after)
    return [k for k in dict.fromkeys([*a, *b]) if not _same_leaf(a.get(k, _MISSING), b.get(k, _MISSING))]


def _same_leaf(a: Any, b: Any) -> bool:
    return _same(a, b) or (type(a) is type(b) and isinstance(a, (dict, list)) and a == b)


def hand_edits(root: Path) -> list[str]:
    """The dotted keys where the workspace's ``params.yaml`` differs from the committed one (HEAD's).

    Raises:
        UserError: the workspace's ``params.yaml`` is missing, binary or not valid YAML.
    """
    path = root / PARAMS
    workspace = parse_yaml(read_text_file(path, f"`git checkout {PARAMS}` restores the committed one"), path)
    r = subprocess.run(["git", "show", f"HEAD:{PARAMS}"], cwd=root, capture_output=True, text=True)
    committed = parse_yaml(r.stdout, f"HEAD:{PARAMS}") if r.returncode == 0 else {}
    return changed_keys(committed, workspace)


def apply_trial(root: Path, experiment: str, overrides: dict[str, Any], force: bool = False) -> list[str]:
    """``dvc exp apply experiment``, then ``params.yaml`` as it was with only ``overrides`` set.

    Returns the dotted keys whose value changed in ``params.yaml``.

    Raises:
        UserError: ``params.yaml`` has uncommitted changes (unless ``force``), or DVC failed.
    """
    edits = hand_edits(root)
    if edits and not force:
        raise UserError(
            f"{root / PARAMS} has uncommitted changes to {', '.join(edits)}; `best --apply` would set the "
            f"trial's values over them: commit them (`git commit {PARAMS}`), `git stash` them, or pass --force "
            f"(keeps the edits the trial does not set)"
        )
    path = root / PARAMS
    before = path.read_text(encoding="utf-8")
    old = parse_yaml(before, path)
    new = _with_overrides(old, overrides)
    r = subprocess.run(["dvc", "exp", "apply", experiment], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        write_text(path, before)  # DVC may have written the file before failing
        raise UserError(f"dvc exp apply {experiment} failed:\n{(r.stderr or r.stdout).strip()[-1500:]}")
    text = edit_yaml(before, new)
    if yaml.safe_load(text) != new:
        text = yaml.safe_dump(new, sort_keys=False)
        print(f"note: {PARAMS}'s comments and layout could not be kept; it is rewritten in full")
    write_text(path, text)
    overwritten = [k for k in edits if k in changed_keys(old, new)]
    if overwritten:
        print(f"note: --force: the trial's values replaced your uncommitted {', '.join(overwritten)}")
    return changed_keys(old, new)


def _with_overrides(data: Any, overrides: dict[str, Any]) -> Any:
    import copy

    out = copy.deepcopy(data) if isinstance(data, dict) else {}
    for key, value in overrides.items():
        dotted_set(out, key, copy.deepcopy(value))
    return out


def edit_yaml(text: str, data: Any) -> str:
    """``text`` (YAML) edited to hold ``data``: comments, quotes and layout of unchanged values stay."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        """Writes None as ``null`` (ruamel's default writes nothing) and floats as PyYAML reads them
        (``1.0e-05``: PyYAML, which the stages use, reads ruamel's ``1e-05`` as a string)."""

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    pyyaml = yaml.representer.SafeRepresenter()
    Representer.add_representer(
        float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", pyyaml.represent_float(v).value)
    )
    rt = YAML()
    rt.Representer = Representer
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    mapping, offset = _indents(text)
    rt.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    doc = rt.load(text)
    _merge(doc, data)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def _indents(text: str) -> tuple[int, int]:
    """(mapping indent, offset of a block list's dash) as ``text`` writes them; (2, 0) where it shows none."""
    mapping = offset = None
    lines = [re.sub(r"\s+#.*$", "", line) for line in text.splitlines() if line.strip() and line.lstrip()[0] != "#"]
    for parent, line in zip(lines, lines[1:]):
        depth = (len(line) - len(line.lstrip())) - (len(parent) - len(parent.lstrip()))
        if parent.endswith(":") and depth >= 0:
            if line.lstrip().startswith("- "):
                offset = depth if offset is None else offset
            elif depth > 0:
                mapping = depth if mapping is None else mapping
    return mapping or 2, offset or 0


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same YAML type (``1`` is not ``1.0``, ``true`` is not ``1``)."""
    kinds = (bool, int, float, str, type(None))
    kind = next((k for k in kinds if isinstance(a, k)), None)
    return kind is not None and isinstance(b, kind) and (kind is not int or not isinstance(b, bool)) and a == b


def _merge(node: Any, new: Any) -> None:
    """Make ``node`` (a ruamel mapping or list) hold ``new``, assigning only the values that differ
    (a list keeps its common head item by item, so the comments on those items stay)."""
    if isinstance(node, dict):
        for key in [k for k in node if k not in new]:
            del node[key]
        items = [(k, v, k in node) for k, v in new.items()]
    else:
        del node[len(new) :]
        items = [(i, v, i < len(node)) for i, v in enumerate(new)]
    for key, value, present in items:
        old = node[key] if present else None
        if present and any(isinstance(old, kind) and isinstance(value, kind) for kind in (dict, list)):
            _merge(old, value)
        elif not present and isinstance(node, list):
            node.append(value)  # the missing indices are the tail, in order
        elif not (present and _same(old, value)):
            node[key] = value
