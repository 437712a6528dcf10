"""A subscriber paused or resumed while an event is emitted to it (PostgreSQL).

An emit writes each delivery pending or held by its subscriber's state as the emit reads
it. If a resume committed between that read and the emit's commit, the resume's release
of held deliveries would miss the emit's, and an active subscriber would keep a held
delivery that nothing claims. The emit and the resume now take turns (store.AUDIENCE_LOCK_KEY).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from common import db, signing
from publisher import model, statements
from publisher.store import Store
from tests.support import store_subscriber_spec

ACTIVE = model.SubscriberState.ACTIVE
PAUSED = model.SubscriberState.PAUSED
# How long the emit waits, after reading the audience, for the resume to commit: with the
# lock the resume cannot commit until the emit does, so this only bounds the test's time.
RESUME_WAIT_SECONDS = 2.0


async def test_a_resume_while_an_event_is_emitted_leaves_nothing_held(
    store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )
    await store.update_subscriber(subscriber.id, subscriber.spec, PAUSED, "on holiday")

    def resume_from_another_replica() -> None:
        async def resume() -> None:
            other = Store(db.create_engine(database_url))
            try:
                await other.update_subscriber(subscriber.id, subscriber.spec, ACTIVE, "")
            finally:
                await other.close()

        asyncio.run(resume())

    resuming = threading.Thread(target=resume_from_another_replica)
    read_audience = statements.AUDIENCE.fetch

    def read_then_let_a_resume_in(conn: Any) -> Any:
        rows = read_audience(conn)
        resuming.start()
        resuming.join(RESUME_WAIT_SECONDS)
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
