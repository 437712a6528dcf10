"""Retention: settled events past --retention go, with their deliveries and attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa

from common import db, errors, signing
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher import migrate, model, retention
from publisher import store as store_module
from publisher.schema import attempts, deliveries, events
from publisher.store import Store
from tests.conftest import StartPublisher
from tests.support import attempt_record, eventually, lock_awaited, store_subscriber_spec

T0 = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(database_url: str, clock: Clock) -> AsyncIterator[Store]:
    """The store on a clock the test moves."""
    await migrate.ensure_current(database_url, create_if_empty=True)
    store = Store(db.create_engine(database_url), now=clock)
    yield store
    await store.close()


async def subscriber(store: Store, prefix: str) -> str:
    spec = store_subscriber_spec(prefix, f"{prefix}.*", "all.*")
    return (await store.create_subscriber(spec, signing.generate_secret())).id


async def emit(store: Store, event_type: str, key: str = "") -> model.EmitResult:
    (result,) = await store.emit([model.NewEvent(event_type, b"{}", "application/json", key)])
    return result


async def settle(store: Store, clock: Clock, state: model.DeliveryState) -> None:
    """Sends every due delivery once, and records ``state`` for each (PENDING: a retry in
    an hour)."""
    for claim in await store.claim("replica", 100, lease_seconds=60.0):
        record = attempt_record(
            claim,
            outcome="delivered" if state == model.DeliveryState.DELIVERED else "failed",
            state=state,
            at=clock.now,
            next_attempt_at=clock.now + (3600 if state == model.DeliveryState.PENDING else 0),
        )
        await store.record([record])


async def count(store: Store, table: sa.Table) -> int:
    async with store.engine.connect() as conn:
        return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def test_settled_events_past_retention_go_and_owed_or_recent_ones_stay(
    store: Store, clock: Clock
) -> None:
    await subscriber(store, "a")
    paused = await subscriber(store, "p")
    spec = (await store.get_subscriber(paused)).spec
    await store.update_subscriber(paused, spec, model.SubscriberState.PAUSED, "on holiday")
    delivered = await emit(store, "a.paid", key="k-delivered")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    dead = await emit(store, "a.failed")
    await settle(store, clock, model.DeliveryState.FAILED)
    unheard = await emit(store, "nobody.listens")
    held = await emit(store, "all.news")  # a gets it; p's copy is held while it is paused.
    await settle(store, clock, model.DeliveryState.DELIVERED)
    pending = await emit(store, "a.waiting")
    await settle(store, clock, model.DeliveryState.PENDING)  # Failed once, retried later.
    clock.now = T0 + 100
    recent = await emit(store, "a.recent")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    assert await count(store, attempts) == 5

    gone = await store.prune(before=T0 + 50, limit=100)

    assert gone == 3
    for event in (delivered, dead, unheard):
        with pytest.raises(errors.NotFound):
            await store.get_event(event.event_id)
    for event in (held, pending, recent):
        assert (await store.get_event(event.event_id)).id == event.event_id
    # Left: held's two deliveries (one settled), pending's and recent's; their attempts.
    assert await count(store, deliveries) == 4
    assert await count(store, attempts) == 3
    # The key of an event that went may be used again.
    again = await emit(store, "a.paid", key="k-delivered")
    assert not again.duplicate
    assert again.event_id != delivered.event_id


async def test_an_old_event_stays_for_the_retention_after_its_delivery_settled(
    store: Store, clock: Clock
) -> None:
    """An event past --retention whose delivery was dead-lettered only now (after a long
    pause, or a replay) stays for as long again: the digest can still name it and an
    operator can still Redeliver it. Once it has been settled that long, it goes."""
    sub = await subscriber(store, "a")
    late = await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.PENDING)  # Failed once, retried in an hour.
    clock.now = T0 + 3600
    await settle(store, clock, model.DeliveryState.FAILED)  # Dead-lettered at T0 + 3600.
    await emit(store, "a.paid")  # The newest, which stays anyway.

    assert await store.prune(before=T0 + 1000, limit=10) == 0
    (dead,), _ = await store.dead_letters(sub, 10)
    assert dead.event_id == late.event_id
    redelivered = await store.redeliver(dead.delivery_id)
    assert redelivered.state == model.DeliveryState.PENDING
    await settle(store, clock, model.DeliveryState.FAILED)  # Dead-lettered again, at T0 + 3600.

    assert await store.prune(before=T0 + 3601, limit=10) == 1
    with pytest.raises(errors.NotFound):
        await store.get_event(late.event_id)


async def test_a_prune_takes_at_most_its_limit_and_the_job_takes_them_all(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await subscriber(store, "a")
    for _ in range(5):
        await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    clock.now = T0 + 10
    await emit(store, "a.paid")  # Recent: the newest, which always stays, is not one of them.

    assert await store.prune(before=T0 + 1, limit=2) == 2
    monkeypatch.setattr(retention, "BATCH", 2)
    job = retention.Retention(store, keep=5.0, now=clock)
    assert await job.run_once() == 3
    assert await job.run_once() == 0
    assert await count(store, deliveries) == 1


async def test_a_prune_stops_at_its_deliveries_and_the_job_goes_on_to_the_end(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: events sent to many subscribers go a few per transaction, so that no prune
    holds the only write lock long while emits wait behind it: a prune stops before its
    deliveries pass the budget, one event over it alone still goes, and the job goes on
    until every expired event is gone."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's prune makes no emit wait: its batches are whole")
    for prefix in ("a", "b", "c"):
        await subscriber(store, prefix)
    for _ in range(4):
        await emit(store, "all.news")  # Three deliveries each.
    await settle(store, clock, model.DeliveryState.DELIVERED)
    clock.now = T0 + 100
    await emit(store, "nobody.listens")  # The newest, which stays anyway.
    monkeypatch.setattr(store_module, "PRUNE_DELIVERIES", 5)

    assert await store.prune(before=T0 + 50, limit=10) == 1
    assert await count(store, deliveries) == 9
    monkeypatch.setattr(store_module, "PRUNE_DELIVERIES", 2)
    assert await store.prune(before=T0 + 50, limit=10) == 1
    assert await count(store, deliveries) == 6

    deleted: list[int] = []
    prune = store.prune

    async def counted(before: float, limit: int) -> int:
        ahead = await count(store, deliveries)
        gone = await prune(before, limit)
        deleted.append(ahead - await count(store, deliveries))
        return gone

    monkeypatch.setattr(store, "prune", counted)
    assert await retention.Retention(store, keep=50.0, now=clock).run_once() == 2
    assert deleted[:2] == [3, 3]
    assert set(deleted[2:]) <= {0}
    assert await count(store, deliveries) == 0


async def test_the_newest_event_stays_so_that_no_event_is_numbered_twice(
    store: Store, clock: Clock
) -> None:
    """Even expired and settled, the newest event stays: SQLite numbers a new event one past
    the highest it holds, and a catch-up cursor past a deleted newest one would skip the
    events numbered as it was."""
    sub = await subscriber(store, "a")
    for _ in range(3):
        await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    seen, cursor = await store.events_for(sub, 0, 10)
    assert len(seen) == 3
    clock.now = T0 + 100

    assert await store.prune(before=T0 + 50, limit=10) == 2
    assert (await store.get_event(seen[-1].id)).id == seen[-1].id
    later = await emit(store, "a.paid")

    found, _ = await store.events_for(sub, cursor, 10)
    assert [event.id for event in found] == [later.event_id]


async def test_nothing_goes_before_its_time(store: Store, clock: Clock) -> None:
    await subscriber(store, "a")
    await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    clock.now = T0 + 10
    assert await retention.Retention(store, keep=30.0, now=clock).run_once() == 0
    assert await count(store, deliveries) == 1


async def test_the_publisher_prunes_what_expired_as_it_starts_and_keeps_the_rest(
    store: Store, clock: Clock, start_publisher: StartPublisher
) -> None:
    """Two days ago, one event was delivered and one is still owed; --retention is one day."""
    clock.now = time.time() - 2 * 86400
    await subscriber(store, "a")
    old = await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    owed = await emit(store, "a.waiting")
    await settle(store, clock, model.DeliveryState.PENDING)
    await store.close()  # The publisher is the only one on an SQLite file.

    app = await start_publisher(retention=86400.0)

    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = publisher_pb2_grpc.PublisherServiceStub(channel)

        async def old_gone() -> bool:
            try:
                await stub.GetEvent(publisher_pb2.GetEventRequest(event_id=old.event_id))
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.NOT_FOUND
            return False

        await eventually(old_gone, what="the expired event pruned")
        kept = await stub.GetEvent(publisher_pb2.GetEventRequest(event_id=owed.event_id))
        assert kept.event.id == owed.event_id


async def test_finding_what_expired_reads_only_that(store: Store) -> None:
    """Through ix_events_created: a round with nothing expired costs nothing however many
    events there are (it runs as the publisher starts, and every 10 minutes)."""
    expired = store_module.expired_events(before=5.0, limit=10)
    async with store.engine.connect() as conn:
        compiled = expired.compile(conn.sync_connection, compile_kwargs={"literal_binds": True})
        if store.engine.dialect.name == "sqlite":
            result = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
            plan = [str(row[-1]) for row in result]
        else:
            await conn.execute(sa.text("SET enable_seqscan = off"))
            plan = [str(row[0]) for row in await conn.execute(sa.text(f"EXPLAIN {compiled}"))]
    assert "ix_events_created" in " ".join(plan)


async def test_an_event_redelivered_while_it_is_pruned_stays(store: Store, clock: Clock) -> None:
    """PostgreSQL: a Redeliver commits between the prune's query and its deletes. The prune
    waits for it on the delivery's lock, sees the delivery owed again, and keeps the event."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    await subscriber(store, "a")
    event = await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    clock.now = T0 + 100
    await emit(store, "a.paid")  # The newest, which stays anyway.
    async with store.engine.connect() as redeliver:
        await redeliver.execute(
            deliveries.update()
            .where(deliveries.c.event_id == event.event_id)
            .values(state=model.DeliveryState.PENDING.value)
        )  # Not committed yet: its row lock is held.
        pruning = asyncio.create_task(store.prune(before=T0 + 50, limit=10))
        await eventually(lambda: lock_awaited(store.engine), what="the prune waiting on the lock")
        await redeliver.commit()
    assert await pruning == 0
    assert (await store.get_event(event.event_id)).id == event.event_id
    assert await count(store, deliveries) == 2


async def expired_and_settled(store: Store, clock: Clock, how_many: int) -> None:
    """``how_many`` delivered events, expired by the time the test prunes (before T0 + 50),
    and a recent one after them, the newest, which stays."""
    await subscriber(store, "a")
    for _ in range(how_many):
        await emit(store, "a.paid")
    await settle(store, clock, model.DeliveryState.DELIVERED)
    clock.now = T0 + 100
    await emit(store, "a.paid")


async def test_a_replica_leaves_pruning_to_the_one_already_at_it(
    store: Store, clock: Clock
) -> None:
    """PostgreSQL: while another replica holds the prune's turn, a prune takes nothing and
    waits for nothing; once the turn is free, it prunes."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("an SQLite file has one publisher: there is no other replica")
    await expired_and_settled(store, clock, 3)
    async with store.engine.connect() as other:
        taken = sa.select(sa.func.pg_try_advisory_xact_lock(store_module.PRUNE_LOCK_KEY))
        assert await other.scalar(taken)  # Held until its transaction ends.

        assert await asyncio.wait_for(store.prune(before=T0 + 50, limit=10), 10) == 0
        assert await count(store, deliveries) == 4

        await other.rollback()
    assert await store.prune(before=T0 + 50, limit=10) == 3
    assert await count(store, deliveries) == 1


async def test_a_prune_counts_only_the_events_it_deleted(store: Store, clock: Clock) -> None:
    """PostgreSQL: something else deletes the expired events between the prune's query and
    its deletes. The prune waits for it on the deliveries' locks and reports none gone."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no such race")
    await expired_and_settled(store, clock, 2)
    async with store.engine.connect() as other:
        for table in (attempts, deliveries, events):
            await other.execute(table.delete())  # Not committed yet: its row locks are held.
        pruning = asyncio.create_task(store.prune(before=T0 + 50, limit=10))
        await eventually(lambda: lock_awaited(store.engine), what="the prune waiting on the locks")
        await other.commit()
    assert await pruning == 0
