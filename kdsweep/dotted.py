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
    """Set ``key`` to ``value`` in place; missing (or scalar) mappings on the way become ``{}``.

    Raises:
        KeyError: a part walks through something that is neither a mapping nor an in-range list index.
    """
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise KeyError(f"{key}: `{'.'.join(parts[:depth])}` is not a mapping or list")
