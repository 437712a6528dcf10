"""Event types and subscription filters: valid names, and which filters match which types."""

from __future__ import annotations

import pytest

from publisher import matching


def test_exact_filter_matches_only_its_own_type() -> None:
    """A filter without a wildcard matches exactly that event type."""
    assert matching.matches(["order.paid"], "order.paid")
    assert not matching.matches(["order.paid"], "order.refunded")
    assert not matching.matches(["order.paid"], "order.paid.late")
    assert not matching.matches(["order.paid"], "order")


@pytest.mark.parametrize("event_type", ["order.paid", "order.item.added", "order.x"])
def test_prefix_wildcard_matches_types_below_the_prefix(event_type: str) -> None:
    """`order.*` matches any type under `order.`, however deep."""
    assert matching.matches(["order.*"], event_type)


@pytest.mark.parametrize("event_type", ["order", "orders.paid", "orderpaid", "shop.order.paid"])
def test_prefix_wildcard_does_not_match_the_bare_prefix_or_lookalikes(event_type: str) -> None:
    """`order.*` needs the dot: not `order` itself, nor `orders.paid`."""
    assert not matching.matches(["order.*"], event_type)


@pytest.mark.parametrize("event_type", ["order.paid", "user.created", "x"])
def test_star_and_empty_filters_match_everything(event_type: str) -> None:
    """`*` alone, or no filters at all, receives every event."""
    assert matching.matches(["*"], event_type)
    assert matching.matches([], event_type)


def test_any_of_several_filters_may_match() -> None:
    """A subscriber receives an event when at least one of its filters matches."""
    patterns = ["user.created", "order.*"]
    assert matching.matches(patterns, "user.created")
    assert matching.matches(patterns, "order.paid")
    assert not matching.matches(patterns, "user.deleted")


@pytest.mark.parametrize(
    "event_type", ["order", "order.paid", "Order.Item_Added-v2", "a.b.c.d", "x" * 200]
)
def test_type_problem_accepts_dotted_names(event_type: str) -> None:
    """Dot-separated names of letters, digits, `_` and `-` up to 200 characters are valid types."""
    assert matching.type_problem(event_type) is None


@pytest.mark.parametrize(
    "event_type",
    [
        "",
        "order.*",
        "*",
        "order paid",
        "order/paid",
        "order.",
        ".order",
        "order..paid",
        "ordér.paid",
        "x" * 201,
    ],
)
def test_type_problem_rejects_malformed_types(event_type: str) -> None:
    """Empty, wildcarded, oddly dotted, non-ASCII or overlong types are refused."""
    assert matching.type_problem(event_type) is not None


def test_type_problem_rejects_a_trailing_newline() -> None:
    """An event type ending in a newline is not a dotted name (`$` lets a final newline through)."""
    assert matching.type_problem("order.paid\n") is not None


@pytest.mark.parametrize("pattern", ["*", "order.*", "order.item.*", "order.paid", "order"])
def test_filter_problem_accepts_exact_names_and_trailing_wildcards(pattern: str) -> None:
    """A filter is a type, `prefix.*`, or `*` alone."""
    assert matching.filter_problem(pattern) is None


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "order.*.paid",
        "*.paid",
        "order*",
        "order.**",
        "order.p*",
        ".*",
        "**",
        "order paid",
        "order.$",
        "order..*",
    ],
)
def test_filter_problem_rejects_empty_bad_characters_and_inner_wildcards(pattern: str) -> None:
    """Empty filters, bad characters and wildcards anywhere but a final `.*` are refused."""
    assert matching.filter_problem(pattern) is not None


def test_filter_problem_explains_where_a_wildcard_may_go() -> None:
    """A wildcard in the middle gets a message pointing at the `order.*` form."""
    problem = matching.filter_problem("order.*.paid")
    assert problem is not None
    assert "order.*" in problem
