"""Which subscribers an event type goes to: exact names and ``prefix.*`` wildcards."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Dotted names of letters, digits, `_` and `-`; a filter may end in `*` (`order.*`, or `*` alone).
_TYPE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
MAX_TYPE_LENGTH = 200


def type_problem(event_type: str) -> str | None:
    if not event_type:
        return "must not be empty"
    if len(event_type) > MAX_TYPE_LENGTH:
        return f"longer than {MAX_TYPE_LENGTH} characters"
    if not _TYPE.fullmatch(event_type):
        return "must be dot-separated names of letters, digits, '_' or '-'"
    return None


def filter_problem(pattern: str) -> str | None:
    if pattern == "*":
        return None
    if pattern.endswith(".*"):
        return type_problem(pattern[:-2])
    if "*" in pattern:
        return "a wildcard may only end a filter, as in 'order.*'"
    return type_problem(pattern)


def matches(patterns: Sequence[str], event_type: str) -> bool:
    """Empty patterns match all; ``order.*`` matches ``order.paid`` and ``order.item.added``."""
    if not patterns:
        return True
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False
