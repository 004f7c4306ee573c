"""Walking key paths of decoded JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def dicts_at(obj: dict[str, Any], *paths: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The dict found at each key path of `obj`, in order, skipping paths that hold none."""
    for path in paths:
        node: Any = obj
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            yield node
