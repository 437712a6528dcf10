"""Emits on PostgreSQL, side by side with what decides their deliveries and numbers.

An emit writes each delivery pending or held by its subscriber's state as the emit reads
it: a resume committed between that read and the emit's commit would miss the emit's held
deliveries, and an active subscriber would keep a held delivery that nothing claims
(store.AUDIENCE_LOCK_KEY). And an emit numbers its events for the catch-up feed: numbers
that became visible out of order would let a reader's cursor pass one that commits later
(store.FEED_LOCK_KEY).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from common import db, signing
from publisher import model, statements
from publisher import store as store_module
from publisher.schema import deliveries, events
from publisher.store import Store
from tests.support import DEFAULT_DEADLINE, eventually, lock_awaited, store_subscriber_spec

ACTIVE = model.SubscriberState.ACTIVE
PAUSED = model.SubscriberState.PAUSED


async def test_a_resume_while_an_event_is_emitted_leaves_nothing_held(
    store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )
    await store.update_subscriber(subscriber.id, subscriber.spec, PAUSED, "on holiday")

    # Set once the resume has committed, or is waiting for the emit to (with the lock).
    resume_went_as_far_as_it_can = threading.Event()

    def resume_from_another_replica() -> None:
        async def resume() -> None:
            other = Store(db.create_engine(database_url))
            try:
                updating = asyncio.create_task(
                    other.update_subscriber(subscriber.id, subscriber.spec, ACTIVE, "")
                )

                async def done_or_waiting() -> bool:
                    return updating.done() or await lock_awaited(other.engine)

                await eventually(done_or_waiting, what="the resume committed or waiting")
                resume_went_as_far_as_it_can.set()
                await updating
            finally:
                resume_went_as_far_as_it_can.set()
                await other.close()

        asyncio.run(resume())

    resuming = threading.Thread(target=resume_from_another_replica)
    read_audience = statements.AUDIENCE.fetch

    def read_then_let_a_resume_in(conn: Any) -> Any:
        rows = read_audience(conn)
        resuming.start()
        assert resume_went_as_far_as_it_can.wait(DEFAULT_DEADLINE)
        return rows

    monkeypatch.setattr(statements.AUDIENCE, "fetch", read_then_let_a_resume_in)
    (emitted,) = await store.emit([model.NewEvent("a.x", b"{}", "application/json", "")])
    monkeypatch.undo()
    await asyncio.to_thread(resuming.join)

    assert (await store.get_subscriber(subscriber.id)).state == ACTIVE
    (delivery,) = await store.list_deliveries(
        model.DeliveryFilter(event_id=emitted.event_id), 10, ""
    )
    assert delivery.state == model.DeliveryState.PENDING
    assert [claim.delivery_id for claim in await store.claim("replica", 10, 60.0)] == [delivery.id]


async def test_an_event_numbered_first_is_never_passed_by_the_feed_while_it_commits(
    store: Store,
) -> None:
    """One emit has numbered its event and not committed; a second emit waits for it rather
    than commit a higher number first, so a reader meanwhile sees neither, and then both in
    order."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )
    async with store.engine.connect() as first:
        await emit_up_to_its_commit(first, subscriber.id)
        second = asyncio.create_task(
            store.emit([model.NewEvent("a.x", b"{}", "application/json", "")])
        )
        await eventually(
            lambda: lock_awaited(store.engine), what="the second emit waiting its turn"
        )
        seen, cursor = await store.events_for(subscriber.id, 0, 10)
        assert seen == []
        await first.commit()
    (emitted,) = await second

    found, _ = await store.events_for(subscriber.id, cursor, 10)
    assert [event.id for event in found] == ["evt_first", emitted.event_id]


async def test_the_feed_cursor_stops_below_an_event_still_committing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an emit has numbered its event and not committed, an empty page moves a cursor
    over the others' committed events but not past the newest of them, so the event is
    listed once committed."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    monkeypatch.setattr(store_module, "FEED_STRETCH", 1000)
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )
    await store.create_subscriber(store_subscriber_spec("b", "b.*"), signing.generate_secret())
    await store.emit([model.NewEvent("b.x", b"{}", "application/json", "")] * 3)
    async with store.engine.connect() as first:
        await emit_up_to_its_commit(first, subscriber.id)
        seen, cursor = await store.events_for(subscriber.id, 0, 10)
        assert seen == []
        assert cursor > 0
        await first.commit()

    found, _ = await store.events_for(subscriber.id, cursor, 10)
    assert [event.id for event in found] == ["evt_first"]


async def emit_up_to_its_commit(conn: AsyncConnection, subscriber_id: str) -> None:
    """What an emit does up to its commit, with the store's own lock: event evt_first, of
    type a.x, and its delivery to ``subscriber_id``."""
    await conn.run_sync(store_module._lock_feed)
    await conn.execute(
        events.insert().values(
            id="evt_first", type="a.x", payload=b"{}", content_type="application/json",
            created_at=1.0,
        )
    )  # fmt: skip
    await conn.execute(
        deliveries.insert().values(
            store_module._new_delivery("evt_first", subscriber_id, True, 1.0)
        )
    )
