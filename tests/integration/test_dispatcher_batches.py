"""The dispatcher's work reaches the store in batches, not a row at a time.

A subscriber at its limit is claimed for once half its sends finish. Sends that finish
while a claim runs leave it short of its limit once the claim's leases start; if that let
the dispatcher claim again at once, each claim would take only what finished during the
one before: under load, a transaction for a few rows after another. And the outcomes of
sends that end in one turn of the event loop go to the store in one submission. The store
is real (an SQLite file, and PostgreSQL); the transport holds every send until the test
lets it finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

import pytest

from common import signing
from publisher import dispatcher as dispatcher_module
from publisher import model
from publisher.dispatcher import Dispatcher
from publisher.slots import Grant
from publisher.store import AttemptRecord, ClaimRound, Store
from tests.support import Held, eventually, store_subscriber_spec

LIMIT = 4


@pytest.fixture(autouse=True)
def no_idle_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher claims only when a finished send wakes it: its idle poll, a claim a
    second after the last, would top the subscriber up on a slow run and shift the claims
    these tests count."""
    monkeypatch.setattr(dispatcher_module, "IDLE_POLL_SECONDS", 3600.0)


async def test_a_subscriber_turned_away_by_a_claim_waits_for_half_its_sends(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = await _due_to_one_subscriber(store, 20)
    claimed: list[int] = []
    finish_during_next_claim = 0
    real_claim_round = store.claim_round

    async def claim_round(owner: str, grant: Grant, lease_seconds: float) -> ClaimRound:
        nonlocal finish_during_next_claim
        # Sends that end after the grant was counted and before the leases start.
        await held.finish(finish_during_next_claim)
        finish_during_next_claim = 0
        found = await real_claim_round(owner, grant, lease_seconds)
        claimed.append(len(found.claims))
        return found

    monkeypatch.setattr(store, "claim_round", claim_round)
    dispatcher = _started(store, held)
    try:
        await eventually(
            lambda: _settled(held, claimed, [4], in_flight=4), what="the subscriber at its limit"
        )
        # Two of four sends end: half its slots are free, and the dispatcher claims two.
        # One more ends during that claim, so its leases leave the subscriber at three of
        # four; it counts as full all the same, for a claim now would take one row.
        finish_during_next_claim = 1
        await held.finish(2)
        await eventually(
            lambda: _settled(held, claimed, [4, 2], in_flight=3), what="the claim of two"
        )
        # The next send to end leaves half its slots free: only now is it claimed for.
        await held.finish(1)
        await eventually(
            lambda: _settled(held, claimed, [4, 2, 2], in_flight=4),
            what="a claim of two once half its sends finished",
        )
    finally:
        await dispatcher.stop(grace=0.0)


async def test_the_outcomes_of_sends_that_end_together_go_to_the_store_together(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = await _due_to_one_subscriber(store, 4)
    handed_over: list[int] = []
    real_record_soon = store.record_soon

    def record_soon(outcomes: Sequence[AttemptRecord]) -> asyncio.Future[list[None]]:
        handed_over.append(len(outcomes))
        return real_record_soon(outcomes)

    monkeypatch.setattr(store, "record_soon", record_soon)
    dispatcher = _started(store, held)
    try:
        await eventually(lambda: _in_flight(held, 4), what="four sends")
        await held.finish(3, together=True)
        await held.finish(1)
        delivered = model.DeliveryFilter(state=model.DeliveryState.DELIVERED)
        await eventually(
            lambda: _count(store.list_deliveries(delivered, 10, ""), 4), what="all recorded"
        )
    finally:
        await dispatcher.stop(grace=0.0)
    # One submission per outcome would be [1, 1, 1, 1].
    assert handed_over == [3, 1]


async def _due_to_one_subscriber(store: Store, count: int) -> Held:
    """``count`` deliveries due to one subscriber; the transport that will hold their sends."""
    await store.create_subscriber(store_subscriber_spec("a", "a.*"), signing.generate_secret())
    await store.emit([model.NewEvent("a.x", b"{}", "application/json", "") for _ in range(count)])
    return Held()


def _started(store: Store, held: Held) -> Dispatcher:
    dispatcher = Dispatcher(
        store,
        {model.Protocol.GRPC: held, model.Protocol.HTTP: held},
        owner="batches",
        issuer="test",
        delivery_timeout=30.0,
        max_in_flight=2 * LIMIT,
        max_in_flight_per_subscriber=LIMIT,
        claim_batch=2 * LIMIT,
    )
    dispatcher.start()
    return dispatcher


async def _in_flight(held: Held, count: int) -> bool:
    return held.in_flight() == count


async def _count(listing: Awaitable[list[model.Delivery]], count: int) -> bool:
    return len(await listing) == count


async def _settled(held: Held, claimed: list[int], expected: list[int], *, in_flight: int) -> bool:
    # Claimed past what was expected already fails: those claims cannot be taken back.
    assert claimed == expected[: len(claimed)], claimed
    return claimed == expected and held.in_flight() == in_flight
