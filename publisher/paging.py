"""Page tokens of the listing RPCs, bound to the listing and the filters they came from.

A token is opaque to callers: base64 of the listing's name, its filters and the key
of the last row listed. Given to another listing, or with other filters, a bare key
would go on somewhere else and skip or repeat rows without a word; such a token is
refused with INVALID_ARGUMENT naming ``page_token`` instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from typing import Protocol

from common import errors

FIELD = "page_token"
# Keys this service gives have none; PostgreSQL refuses a NUL in a query's text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Row(Protocol):
    @property
    def id(self) -> str: ...


def token(listing: str, filters: Sequence[str], after: str) -> str:
    """The token of the page after the row whose key is ``after``."""
    text = json.dumps([listing, list(filters), after], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def next_token(listing: str, filters: Sequence[str], page: Sequence[_Row], limit: int) -> str:
    """The token of the page after ``page``; empty when ``page`` was the last (not full)."""
    return token(listing, filters, page[-1].id) if len(page) == limit else ""


def after(value: str, listing: str, filters: Sequence[str]) -> str:
    """The key a page goes on after, from a token ``token`` gave for ``listing`` and
    ``filters``; empty for the first page."""
    if not value:
        return ""
    try:
        padded = value + "=" * (-len(value) % 4)
        decoded = json.loads(base64.b64decode(padded, altchars=b"-_", validate=True))
    except (ValueError, binascii.Error, RecursionError):  # Recursion: "[[[[...", nested deep.
        raise errors.InvalidArgument(FIELD, "not a page token this service gave") from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 3
        or not isinstance(decoded[2], str)
        or not decoded[2]
        or _CONTROL.search(decoded[2])
    ):
        raise errors.InvalidArgument(FIELD, "not a page token this service gave")
    if decoded[:2] != [listing, list(filters)]:
        raise errors.InvalidArgument(
            FIELD,
            "from another listing or other filters: repeat the request the token came "
            "with, or start again without a token",
        )
    return decoded[2]
