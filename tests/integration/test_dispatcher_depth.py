"""Leasing ahead (the embedded mode's depth): more leased than sent, and nothing lost by it.

A dispatcher of depth 3 may hold three leases per send slot: one sending, two waiting
for it. The sends stay within the slots; what waits starts as sends end; a stop, or a
change to the subscriber, gives back what waited, with the attempt its lease counted.
The store is real (an SQLite file, and PostgreSQL); the transport holds every send until
the test lets it finish.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from common import signing
from publisher import dispatcher as dispatcher_module
from publisher import model
from publisher.dispatcher import Dispatcher
from publisher.schema import deliveries
from publisher.store import Store
from tests.support import Held, eventually, store_subscriber_spec

LIMIT = 4
DEPTH = 3


@pytest.fixture(autouse=True)
def no_idle_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims come only from finished sends and new work, not from the idle poll."""
    monkeypatch.setattr(dispatcher_module, "IDLE_POLL_SECONDS", 3600.0)


@pytest.fixture
async def subscriber(store: Store) -> model.Subscriber:
    spec = store_subscriber_spec("a", "a.*")
    return await store.create_subscriber(spec, signing.generate_secret())


@pytest.fixture
def held() -> Held:
    return Held()


async def test_it_leases_depth_times_its_slots_and_sends_only_what_they_allow(
    store: Store, subscriber: model.Subscriber, held: Held
) -> None:
    await _emit(store, 20)
    dispatcher = _started(store, held)
    try:
        # Claimed ahead: twelve leased (three per slot), four sending.
        await eventually(lambda: _leased_and_sending(store, held, 3 * LIMIT, LIMIT))
        # A send that ends hands its slot to the oldest waiting delivery at once.
        await held.finish(2)
        await eventually(lambda: _delivered(store, 2))
        await eventually(lambda: _leased_and_sending(store, held, 3 * LIMIT - 2, LIMIT))
        for _ in range(18):
            await eventually(lambda: _sending(held))
            await held.finish(1)
        await eventually(lambda: _delivered(store, 20), what="all twenty delivered")
    finally:
        await dispatcher.stop(grace=0.0)
    assert await _attempts(store) == [1] * 20


async def test_an_emit_leases_ahead_to_a_dispatcher_that_takes_from_it(
    store: Store, subscriber: model.Subscriber, held: Held
) -> None:
    # Not started: its claims would hold leases the emit could take.
    dispatcher = _dispatcher(store, held)
    store.taker = dispatcher
    try:
        await _emit(store, 10)
        # All ten leased in the emit's own transaction: no claim was needed.
        assert await _leases(store) == 10
        await eventually(lambda: _leased_and_sending(store, held, 10, LIMIT))
    finally:
        await dispatcher.stop(grace=0.0)


async def test_a_stop_gives_back_what_waited_with_the_attempt_its_lease_counted(
    store: Store, subscriber: model.Subscriber, held: Held
) -> None:
    dispatcher = await _ten_leased(store, held)
    await dispatcher.stop(grace=0.0)
    rows = await _rows(store)
    assert all(row.lease_owner is None for row in rows)
    # The four cancelled sends may have gone out, and count; the six that waited did not.
    assert sorted(row.attempts for row in rows) == [0] * 6 + [1] * 4
    assert all(row.round_started_at is None for row in rows if row.attempts == 0)


async def test_a_paused_subscriber_gets_nothing_more_and_what_waited_goes_back(
    store: Store, subscriber: model.Subscriber, held: Held
) -> None:
    dispatcher = await _ten_leased(store, held)
    try:
        await store.update_subscriber(
            subscriber.id, subscriber.spec, model.SubscriberState.PAUSED, "paused by a test"
        )
        # Given back: no longer leased, and held for the subscriber's return.
        await eventually(lambda: _leases_are(store, LIMIT), what="six leases given back")
        await held.finish(LIMIT)  # The sends in flight end as they would have.
        await eventually(lambda: _delivered(store, LIMIT))
        assert held.in_flight() == 0
    finally:
        await dispatcher.stop(grace=0.0)
    rows = await _rows(store)
    waited = [row for row in rows if row.state == model.DeliveryState.HELD.value]
    assert len(waited) == 6
    assert all(row.attempts == 0 and row.lease_owner is None for row in waited)


async def test_nothing_that_waited_is_sent_to_a_deleted_subscriber(
    store: Store, subscriber: model.Subscriber, held: Held
) -> None:
    dispatcher = await _ten_leased(store, held)
    try:
        await store.delete_subscriber(subscriber.id)
        await held.finish(LIMIT)
        # A round trip to the database: the slots the ended sends freed were handed out
        # (in this turn of the event loop) before its answer came back.
        assert await store.list_subscribers(10, "") == []
        assert held.started() == LIMIT
    finally:
        await dispatcher.stop(grace=0.0)


async def _ten_leased(store: Store, held: Held) -> Dispatcher:
    """A started dispatcher told of changes to subscribers, with ten deliveries leased to
    it: four sending, six waiting."""
    await _emit(store, 10)
    dispatcher = _started(store, held)
    store.on_subscriber_changed = dispatcher.forget
    try:
        await eventually(lambda: _leased_and_sending(store, held, 10, LIMIT))
    except BaseException:
        await dispatcher.stop(grace=0.0)
        raise
    return dispatcher


async def _emit(store: Store, count: int) -> None:
    events = [model.NewEvent("a.x", b"{}", "application/json", "") for _ in range(count)]
    await store.emit(events)


def _started(store: Store, held: Held) -> Dispatcher:
    dispatcher = _dispatcher(store, held)
    dispatcher.start()
    return dispatcher


def _dispatcher(store: Store, held: Held) -> Dispatcher:
    return Dispatcher(
        store,
        {model.Protocol.GRPC: held, model.Protocol.HTTP: held},
        owner="ahead",
        issuer="test",
        delivery_timeout=30.0,
        max_in_flight=2 * LIMIT,
        max_in_flight_per_subscriber=LIMIT,
        claim_batch=4 * LIMIT,
        depth=DEPTH,
    )


async def _rows(store: Store) -> list[Any]:
    query = sa.select(
        deliveries.c.attempts,
        deliveries.c.lease_owner,
        deliveries.c.round_started_at,
        deliveries.c.state,
    )
    async with store.engine.connect() as conn:
        return list((await conn.execute(query)).all())


async def _leases(store: Store) -> int:
    return sum(row.lease_owner is not None for row in await _rows(store))


async def _leases_are(store: Store, count: int) -> bool:
    return await _leases(store) == count


async def _attempts(store: Store) -> list[int]:
    return sorted(row.attempts for row in await _rows(store))


async def _delivered(store: Store, count: int) -> bool:
    delivered = model.DeliveryState.DELIVERED.value
    return len([row for row in await _rows(store) if row.state == delivered]) == count


async def _sending(held: Held) -> bool:
    return held.in_flight() > 0


async def _leased_and_sending(store: Store, held: Held, leased: int, sending: int) -> bool:
    assert held.in_flight() <= sending, "more in flight than the slots allow"
    return await _leases(store) == leased and held.in_flight() == sending
