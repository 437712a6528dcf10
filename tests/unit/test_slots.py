"""Send slots per subscriber: the limit, the hysteresis of full, grants, and leasing ahead."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from publisher.slots import AHEAD_MAX_BYTES, Grant, Slots, limit_for


def test_a_subscriber_is_full_at_its_limit_until_half_of_its_sends_finish() -> None:
    slots = Slots(total=10, per_subscriber=4)
    for _ in range(4):
        slots.acquire("a")
    assert slots.is_full("a")
    assert not slots.release("a")  # 3 left: still full, a claim for one slot is not worth it.
    assert slots.is_full("a")
    assert slots.release("a")  # 2 left, half its limit: claims may take its deliveries again.
    assert not slots.is_full("a")
    assert slots.busy("a") == 2


def test_a_subscriber_a_claim_turned_away_is_full_until_half_of_its_sends_finish() -> None:
    slots = Slots(total=10, per_subscriber=4)
    for _ in range(3):
        slots.acquire("a")  # Short of its limit: a send finished while the claim ran.
    assert not slots.is_full("a")
    slots.turned_away("a")
    assert slots.is_full("a")
    assert slots.release("a")  # 2 left, half its limit.
    slots.turned_away("a")  # Half its slots are free: the next claim is worth it.
    assert not slots.is_full("a")
    slots.turned_away("idle")  # Nothing in flight: every slot is free.
    assert not slots.is_full("idle")


def test_a_grant_caps_each_subscriber_at_its_limit() -> None:
    slots = Slots(total=10, per_subscriber=3)
    for _ in range(3):
        slots.acquire("full")
    slots.acquire("b")
    grant = slots.grant(10)
    assert grant.total == 6  # The free slots.
    assert not grant.take("full")  # At its limit.
    assert grant.full == {"full"}
    assert [grant.take("b") for _ in range(3)] == [True, True, False]
    assert [grant.take("c") for _ in range(4)] == [True, True, True, False]
    assert grant.taken == 5


def test_a_grant_may_top_up_a_full_subscriber_to_its_limit() -> None:
    slots = Slots(total=10, per_subscriber=4)
    for _ in range(4):
        slots.acquire("a")
    slots.release("a")  # 3 busy: full until 2, but room for one more.
    grant = slots.grant(5)
    assert [grant.take("a") for _ in range(2)] == [True, False]


def test_a_grant_holds_its_slots_until_settled() -> None:
    slots = Slots(total=4, per_subscriber=4)
    grant = slots.grant(3)
    assert slots.free() == 1
    assert slots.grant(5).total == 1
    slots.settle(grant)
    assert slots.free() == 3


def test_a_subscribers_own_limit_counts_when_it_is_lower() -> None:
    assert limit_for(4, 0) == 4
    assert limit_for(4, 2) == 2
    assert limit_for(4, 9) == 4  # The publisher's share caps it.
    assert limit_for(None, 3) == 3
    assert limit_for(None, 0) is None
    slots = Slots(total=10, per_subscriber=4)
    grant = slots.grant(10)
    assert [grant.take("a", 2) for _ in range(3)] == [True, True, False]
    slots.settle(grant)
    slots.acquire("a", 2)
    slots.acquire("a", 2)
    assert slots.is_full("a")
    assert slots.release("a")  # 1 left, half of its own limit.


def test_a_reset_grant_starts_afresh() -> None:
    grant = Grant(2, per_subscriber=1)
    assert grant.take("a")
    assert not grant.take("a")
    grant.reset()
    assert grant.take("a")
    assert grant.taken == 1


def test_the_limit_never_exceeds_the_total_and_is_at_least_one() -> None:
    assert Slots(total=2, per_subscriber=8).per_subscriber == 2
    with pytest.raises(ValueError, match="at least 1"):
        Slots(total=2, per_subscriber=0)


def test_depth_leases_that_many_per_slot_and_scales_a_subscribers_own_limit() -> None:
    slots = Slots(total=4, per_subscriber=2, depth=3)
    assert slots.capacity == 12
    grant = slots.grant(20)
    assert grant.total == 12
    assert [grant.take("a") for _ in range(7)] == [True] * 6 + [False]  # 2 slots, 3 each.
    assert [grant.take("b", 1) for _ in range(4)] == [True] * 3 + [False]  # Its own 1 slot.
    slots.settle(grant)
    for _ in range(6):
        slots.acquire("a")
    assert slots.is_full("a")
    assert slots.leased == 6
    assert slots.free() == 6


def test_a_large_payload_is_leased_only_into_a_slot_of_its_own() -> None:
    slots = Slots(total=4, per_subscriber=2, depth=3)
    slots.acquire("a")
    grant = slots.grant(10)
    large = AHEAD_MAX_BYTES + 1
    assert grant.take("a", 0, large)  # Two leases: within its two slots.
    assert not grant.take("a", 0, large)  # A third would wait for a slot, holding its payload.
    assert grant.take("a", 0, AHEAD_MAX_BYTES)  # A small one may wait.


def test_a_large_payload_is_not_leased_while_every_slot_of_the_total_is() -> None:
    slots = Slots(total=4, per_subscriber=4, depth=3)
    for _ in range(4):
        slots.acquire("a")
    grant = slots.grant(10)
    assert not grant.take("b", 0, AHEAD_MAX_BYTES + 1)  # It would wait, for anyone's slot.
    assert grant.take("b", 0, AHEAD_MAX_BYTES)


@given(
    st.integers(min_value=1, max_value=3),
    st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=200),
)
def test_claims_never_put_a_subscriber_over_its_limit(
    depth: int, steps: list[tuple[str, bool]]
) -> None:
    """Whatever is leased (through claim grants) and ends, none exceeds the limits."""
    slots = Slots(total=6, per_subscriber=3, depth=depth)
    for subscriber, start in steps:
        if start:
            grant = slots.grant(1)
            took = grant.take(subscriber)
            slots.settle(grant)
            if took:
                slots.acquire(subscriber)
        elif slots.busy(subscriber):
            slots.release(subscriber)
        assert slots.busy(subscriber) <= 3 * depth
        assert 0 <= slots.leased <= 6 * depth
        assert slots.free() == 6 * depth - slots.leased
