"""Page tokens: they go on only in the listing and with the filters they were given for."""

from __future__ import annotations

import base64

import pytest

from common import errors
from publisher import paging

FILTERS = ("evt_1", "", "failed")


def _refused(value: str, listing: str = "deliveries", filters: tuple[str, ...] = FILTERS) -> str:
    with pytest.raises(errors.InvalidArgument) as info:
        paging.after(value, listing, filters)
    assert info.value.field == "page_token"
    return str(info.value)


def test_a_token_gives_back_its_key_to_its_own_listing_and_filters() -> None:
    token = paging.token("deliveries", FILTERS, "dlv_0192")
    assert paging.after(token, "deliveries", FILTERS) == "dlv_0192"
    assert paging.after("", "deliveries", FILTERS) == ""


def test_a_token_is_refused_by_another_listing_or_with_other_filters() -> None:
    token = paging.token("deliveries", FILTERS, "dlv_0192")
    assert "another listing or other filters" in _refused(token, listing="subscribers")
    assert "another listing or other filters" in _refused(token, filters=("evt_1", "", ""))
    assert "another listing or other filters" in _refused(token, filters=())


@pytest.mark.parametrize(
    "value",
    [
        "sub_0192",  # A bare key, as tokens were before they named their listing.
        "zzz",
        "sub_\x00",
        "tok\n",
        "é",
        paging.token("deliveries", FILTERS, "")[:-3],
        paging.token("deliveries", FILTERS, ""),
        # Well formed but for the key: its NUL made PostgreSQL fail the listing (UNKNOWN).
        paging.token("deliveries", FILTERS, "dlv_\x00"),
        paging.token("deliveries", FILTERS, "dlv_\n"),
        # JSON nested past the parser's recursion limit escaped as RecursionError (UNKNOWN).
        base64.urlsafe_b64encode(b"[" * 100_000).decode(),
    ],
)
def test_anything_else_is_not_a_token(value: str) -> None:
    assert "not a page token" in _refused(value)
