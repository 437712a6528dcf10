"""What recording outcomes writes: each outcome behind its own fence, however many are
recorded together (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from common import signing
from publisher import model
from publisher.schema import deliveries
from publisher.store import Store
from tests.support import attempt_record, eventually, lock_awaited, store_subscriber_spec

PENDING = model.DeliveryState.PENDING
HELD = model.DeliveryState.HELD
DELIVERED = model.DeliveryState.DELIVERED


async def test_a_batch_of_outcomes_writes_each_behind_its_own_fence(store: Store) -> None:
    """250 outcomes in one record: a delivered one settles, a failed one waits for its
    retry with its error, one whose writer lost the lease (another owner) leaves no trace,
    and a retry for a subscriber paused meanwhile stays held. Each is logged exactly when
    it settles."""
    await store.create_subscriber(store_subscriber_spec("a", "a.*"), signing.generate_secret())
    paused = await store.create_subscriber(
        store_subscriber_spec("h", "h.*"), signing.generate_secret()
    )
    new = [model.NewEvent("a.x", b"{}", "application/json", "")] * 240
    await store.emit([*new, *[model.NewEvent("h.x", b"{}", "application/json", "")] * 10])
    claims = await store.claim("replica", 1000, lease_seconds=60.0)
    assert len(claims) == 250
    await store.update_subscriber(
        paused.id, paused.spec, model.SubscriberState.PAUSED, "paused while in flight"
    )
    retry_at = time.time() + 300

    expected: dict[str, tuple[model.DeliveryState, list[int]]] = {}
    records = []
    for index, claim in enumerate(claims):
        if claim.subscriber.id == paused.id:
            record = attempt_record(
                claim, outcome="failed", state=PENDING, next_attempt_at=retry_at, error="500"
            )
            expected[claim.delivery_id] = (HELD, [1])
        elif index % 5 == 0:
            record = attempt_record(claim, owner="intruder")
            expected[claim.delivery_id] = (PENDING, [])
        elif index % 2 == 0:
            record = attempt_record(claim)
            expected[claim.delivery_id] = (DELIVERED, [1])
        else:
            record = attempt_record(
                claim, outcome="failed", state=PENDING, next_attempt_at=retry_at, error="500"
            )
            expected[claim.delivery_id] = (PENDING, [1])
        records.append(record)

    await store.record(records)

    for record in records:
        delivery = await store.get_delivery(record.delivery_id)
        state, logged = expected[record.delivery_id]
        assert (delivery.state, [entry.number for entry in delivery.log]) == (state, logged)
        if logged:
            [entry] = delivery.log
            assert (entry.outcome, entry.error) == (record.outcome, record.error)
            assert entry.started_at == record.started_at
        if logged and state == PENDING:
            assert delivery.next_attempt_at == retry_at
            assert delivery.last_error == "500"
    # The fenced-off ones are still leased to their real owner, who may record them.
    fenced = [r for r in records if r.owner == "intruder"]
    await store.record([dataclasses.replace(r, owner="replica") for r in fenced])
    for record in fenced:
        assert (await store.get_delivery(record.delivery_id)).state == DELIVERED


async def test_an_outcome_whose_lease_is_being_taken_is_neither_logged_nor_settled(
    store: Store,
) -> None:
    """PostgreSQL: another replica's claim of a delivery whose lease ran out is not yet
    committed when this one records its outcome. The record waits for it, and then neither
    logs the attempt nor settles the delivery: the log never shows an outcome that lost."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    await store.create_subscriber(store_subscriber_spec("a", "a.*"), signing.generate_secret())
    await store.emit([model.NewEvent("a.x", b"{}", "application/json", "")])
    (claim,) = await store.claim("replica", 10, lease_seconds=60.0)
    async with store.engine.connect() as other:
        await other.execute(
            deliveries.update()
            .where(deliveries.c.id == claim.delivery_id)
            .values(attempts=deliveries.c.attempts + 1, lease_owner="other-replica")
        )  # Not committed yet: the row stays locked.
        recording = asyncio.create_task(store.record([attempt_record(claim)]))
        await eventually(lambda: lock_awaited(store.engine), what="the record waiting on the row")
        await other.commit()
    await recording

    delivery = await store.get_delivery(claim.delivery_id)
    assert delivery.state == PENDING
    assert delivery.attempts == 2
    assert delivery.log == ()
