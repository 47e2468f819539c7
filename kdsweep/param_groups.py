"""Regex learning-rate multipliers: which parameters train, and how fast.

Rules are an ordered list of ``{pattern, lr_multiplier}``. Each parameter name is matched
with ``re.fullmatch`` against the patterns in order and **the first match wins**; a
parameter no rule matches gets ``default_multiplier`` (``training.default_lr_multiplier``,
1.0 unless set). A multiplier of 0 freezes the parameter: ``requires_grad=False`` and it is
left out of the optimizer entirely.

Mistakes are errors, not silence: a pattern that matches no parameter, or rules that
freeze everything, raise :class:`UserError`; a pattern whose every match was already taken
by earlier rules is reported as shadowed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kdsweep.errors import UserError

if TYPE_CHECKING:  # the sweep runner checks patterns with this module and must not pay torch's import
    import torch


@dataclass
class RuleMatch:
    """The parameters one rule (or the default) selected."""

    pattern: str  # "(default)" for unmatched parameters
    multiplier: float
    names: list[str] = field(default_factory=list)
    numel: int = 0


@dataclass
class GroupAssignment:
    groups: list[RuleMatch]
    shadowed: list[str]

    def multiplier_of(self) -> dict[str, float]:
        return {n: g.multiplier for g in self.groups for n in g.names}


def _literal_hint(pattern: str) -> str:
    """The pattern with regex syntax stripped, to compare against parameter names."""
    return re.sub(r"\\(.)", r"\1", re.sub(r"\.\*|\.\+|[\^\$\(\)\[\]\|\?\*\+]", "", pattern))


def closest_names(pattern: str, names: list[str], n: int = 3) -> list[str]:
    """Parameter names that look closest to what a non-matching pattern meant."""
    hint = _literal_hint(pattern)
    scored = sorted(
        names,
        key=lambda name: (
            -max(
                difflib.SequenceMatcher(None, hint, name[i : i + len(hint) + 2]).ratio()
                for i in range(0, max(1, len(name) - len(hint) + 1))
            )
        ),
    )
    return scored[:n]


def assign_groups(
    named_numel: list[tuple[str, int]],
    rules: list[tuple[str, float]],
    default_multiplier: float = 1.0,
    where: str = "parameter_lr_multipliers",
) -> GroupAssignment:
    """Assign each parameter to the first rule whose pattern fully matches its name.

    Args:
        named_numel: (name, number of elements) of every parameter, in model order.
        rules: ordered (pattern, multiplier) pairs.
        default_multiplier: for parameters no rule matches.
        where: the config key the rules came from, for error messages.
    Raises:
        UserError: a pattern matches nothing, or every parameter would be frozen.
    """
    compiled = [(re.compile(p), p, m) for p, m in rules]
    groups = [RuleMatch(p, m) for _, p, m in compiled]
    default = RuleMatch("(default)", default_multiplier)
    raw_hits = [0] * len(compiled)
    for name, numel in named_numel:
        chosen = None
        for i, (rx, _, _) in enumerate(compiled):
            if rx.fullmatch(name):
                raw_hits[i] += 1
                if chosen is None:
                    chosen = i
        g = groups[chosen] if chosen is not None else default
        g.names.append(name)
        g.numel += numel

    names = [n for n, _ in named_numel]
    problems = []
    for i, (_, pattern, _) in enumerate(compiled):
        if raw_hits[i] == 0:
            hint = ", ".join(closest_names(pattern, names))
            extra = ""
            if "layer\\." in pattern and any(".layers." in n for n in names):
                extra = " (Hugging Face names layers `model.layers.N.`: write `layers\\.` not `layer\\.`)"
            problems.append(f"  {where}.{i}.pattern: {pattern!r} matches no parameter{extra}; closest names: {hint}")
    if problems:
        raise UserError("learning-rate multipliers:\n" + "\n".join(problems))
    shadowed = [g.pattern for i, g in enumerate(groups) if raw_hits[i] and not g.names]
    all_groups = [g for g in groups + [default] if g.names]
    if all(g.multiplier == 0 for g in all_groups):
        unmatched = (
            f"; the {len(default.names)} unmatched parameters get the default {default_multiplier:g} "
            "(training.default_lr_multiplier)"
            if default.names
            else ""
        )
        raise UserError(
            f"{where}: every parameter has multiplier 0, so nothing would train{unmatched}; "
            "give some rule a multiplier > 0"
        )
    return GroupAssignment(all_groups, shadowed)


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Norm weights, biases and embeddings: excluded from weight decay by default."""
    import torch

    out = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            is_norm = "norm" in type(module).__name__.lower() or "norm" in mod_name.split(".")[-1]
            if p.ndim < 2 or p_name == "bias" or is_norm or isinstance(module, torch.nn.Embedding):
                out.add(full)
    return out


def build_param_groups(
    model: torch.nn.Module,
    assignment: GroupAssignment,
    base_lr: float,
    weight_decay: float,
    decay_everything: bool = False,
) -> list[dict]:
    """Apply the assignment to ``model`` and return optimizer parameter groups.

    Frozen parameters get ``requires_grad=False`` and appear in no group. Each group
    carries ``name`` (its pattern) and ``lr_multiplier``; the loop sets
    ``lr = base_lr * lr_multiplier * schedule(step)``.
    """
    params = dict(model.named_parameters())
    skip_decay = set() if decay_everything else no_decay_names(model)
    out = []
    for g in assignment.groups:
        for p_name in g.names:
            params[p_name].requires_grad_(g.multiplier > 0)
        if g.multiplier == 0:
            continue
        for decay in (True, False):
            members = [params[n] for n in g.names if (n not in skip_decay) == decay]
            if members:
                out.append(
                    {
                        "params": members,
                        "name": g.pattern,
                        "lr_multiplier": g.multiplier,
                        "lr": base_lr * g.multiplier,
                        "weight_decay": weight_decay if decay else 0.0,
                    }
                )
    return out


def format_assignment(assignment: GroupAssignment, base_lr: float) -> str:
    """The table printed (and logged) at the start of each training phase."""
    rows = [("pattern", "tensors", "parameters", "lr")]
    for g in assignment.groups:
        lr = "frozen" if g.multiplier == 0 else f"{base_lr * g.multiplier:.3g}"
        rows.append((g.pattern, str(len(g.names)), f"{g.numel:,}", lr))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for pattern in assignment.shadowed:
        lines.append(f"warning: {pattern!r} is shadowed: every parameter it matches is taken by an earlier rule")
    return "\n".join(lines)
