"""Dotted keys (``loss.alpha``, ``parameter_lr_multipliers.0.lr_multiplier``) into nested data.

One convention everywhere a key names a place in ``params.yaml``: parts are separated by
dots, and a part that indexes a list is its decimal index.
"""

from __future__ import annotations

from typing import Any


def get(data: Any, key: str) -> Any:
    """The value at ``key``; raises ``KeyError`` (or ``IndexError``) when it is not there."""
    node = data
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def get_or(data: Any, key: str, default: Any = None) -> Any:
    """The value at ``key``, or ``default`` when any part of the path is missing."""
    try:
        return get(data, key)
    except (KeyError, IndexError, ValueError, TypeError):
        return default


def set_(data: Any, key: str, value: Any) -> None:
    """Set ``key`` to ``value`` in place, creating missing mappings on the way."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
