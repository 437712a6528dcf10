"""Several publishers on one database: claims, leases and fencing (PostgreSQL for replicas)."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import grpc.aio
import jwt
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2

from common import db, signing
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher import model, statements
from publisher import store as store_module
from publisher.app import PublisherApp
from publisher.schema import attempts, deliveries
from publisher.settings import Settings
from publisher.store import Store
from tests.support import (
    FakeSubscriber,
    Process,
    attempt_record,
    eventually,
    store_subscriber_spec,
)


async def one_pending_delivery(store: Store) -> str:
    await store.create_subscriber(store_subscriber_spec("s"), signing.generate_secret())
    (result,) = await store.emit([model.NewEvent("a.b", b"{}", "application/json", "")])
    (delivery,) = await store.list_deliveries(model.DeliveryFilter(event_id=result.event_id), 1, "")
    return delivery.id


async def test_a_late_outcome_from_an_expired_lease_is_fenced_off(store: Store) -> None:
    """Replica A's lease ran out and B took the delivery: A's late result must not land."""
    delivery_id = await one_pending_delivery(store)
    (claim_a,) = await store.claim("replica-a", 10, lease_seconds=0.0)
    (claim_b,) = await store.claim("replica-b", 10, lease_seconds=60.0)
    assert claim_a.delivery_id == claim_b.delivery_id == delivery_id
    assert (claim_a.attempt, claim_b.attempt) == (1, 2)

    await store.record([attempt_record(claim_a, owner="replica-a")])
    after_a = await store.get_delivery(delivery_id)
    assert after_a.state == model.DeliveryState.PENDING
    assert after_a.log == ()

    await store.record([attempt_record(claim_b, owner="replica-b")])
    after_b = await store.get_delivery(delivery_id)
    assert after_b.state == model.DeliveryState.DELIVERED
    assert [entry.number for entry in after_b.log] == [2]


async def test_a_leased_delivery_is_not_claimed_again_until_its_lease_runs_out(
    store: Store,
) -> None:
    await one_pending_delivery(store)
    assert len(await store.claim("replica-a", 10, lease_seconds=60.0)) == 1
    assert await store.claim("replica-b", 10, lease_seconds=60.0) == []


async def test_a_second_claim_carries_the_round_and_the_last_outcome(store: Store) -> None:
    """What a retry is scheduled from: the attempt numbers, the round's start and how the
    attempt before went, as each backend's claim reads them back."""
    await one_pending_delivery(store)
    (first,) = await store.claim("replica", 10, lease_seconds=60.0)
    failed = dataclasses.replace(
        attempt_record(first),
        outcome="uncertain",
        new_state=model.DeliveryState.PENDING,
        next_attempt_at=time.time() - 1,
    )
    await store.record([failed])
    (second,) = await store.claim("replica", 10, lease_seconds=60.0)

    assert (first.attempt, first.attempts_in_round, first.last_outcome) == (1, 1, "")
    assert (second.attempt, second.attempts_in_round, second.last_outcome) == (2, 2, "uncertain")
    assert second.round_started_at == first.round_started_at
    assert second.event == first.event
    assert second.subscriber.id == first.subscriber.id


async def test_claiming_reads_due_deliveries_through_the_partial_index(store: Store) -> None:
    """The claim query is answered from ix_deliveries_due, so the backlog size does not matter."""
    params = {"b_now": time.time(), "b_limit": 100}
    query = statements.DUE_WITH_EVENTS.statement.params(**params)
    assert "ix_deliveries_due" in await plan_of(store, query)


async def test_the_sweep_finds_deliveries_in_doubt_through_their_own_index(store: Store) -> None:
    """The reconciliation sweep's query is answered from ix_deliveries_doubtful, not by walking
    every pending delivery (240-290 ms a sweep at 1M pending on SQLite before it)."""
    query = statements.DOUBTFUL.params(b_limit=100)
    assert "ix_deliveries_doubtful" in await plan_of(store, query)


async def test_dead_letters_are_listed_through_their_own_index(store: Store) -> None:
    """ListDeliveries with state FAILED pages through ix_deliveries_failed, not through every
    delivery (1 s a page at 1M on SQLite before it). With a subscriber as well, the planner
    may take that subscriber's failed ones from ix_deliveries_subscriber_due instead."""
    where = model.DeliveryFilter(state=model.DeliveryState.FAILED)
    query = store_module.deliveries_listed(where, 50, "dlv_0")
    assert "ix_deliveries_failed" in await plan_of(store, query)


async def plan_of(store: Store, query: sa.ClauseElement) -> str:
    """The database's plan for ``query``, as text."""
    async with store.engine.connect() as conn:
        compiled = query.compile(conn.sync_connection, compile_kwargs={"literal_binds": True})
        if store.engine.dialect.name == "sqlite":
            plan = (await conn.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}"))).all()
        else:
            # On a near-empty table a sequential scan is cheaper; ask whether the index can serve.
            await conn.execute(sa.text("SET enable_seqscan = off"))
            plan = (await conn.execute(sa.text(f"EXPLAIN {compiled}"))).all()
    return " ".join(str(row) for row in plan)


def require_postgres(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share PostgreSQL; SQLite takes one publisher")


def issuer_of(metadata: dict[str, str]) -> str:
    token = metadata["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})
    return str(claims["iss"])


async def test_three_replicas_split_5000_events_and_send_each_once(
    database_url: str, subscriber: FakeSubscriber
) -> None:
    require_postgres(database_url)
    engine = db.create_engine(database_url)
    replicas = []
    for name in ("replica-a", "replica-b", "replica-c"):
        app = PublisherApp(
            Settings(
                port=0,
                database_url=database_url,
                issuer=name,
                claim_batch=50,
                max_in_flight=50,
            )
        )
        await app.start()
        replicas.append(app)
    try:
        async with grpc.aio.insecure_channel(replicas[0].address) as channel:
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            await stub.RegisterSubscriber(
                publisher_pb2.RegisterSubscriberRequest(
                    name="all", endpoint=f"127.0.0.1:{subscriber.port}"
                )
            )
            for _batch in range(5):
                await stub.EmitBatch(
                    publisher_pb2.EmitBatchRequest(
                        events=[
                            publisher_pb2.EmitRequest(type="load.test", payload=b"{}")
                            for _ in range(1000)
                        ]
                    )
                )
            await eventually(
                lambda: _truthy(len(subscriber.received) >= 5000), deadline=120, what="5000"
            )

            async def settled() -> bool:
                async with engine.connect() as conn:
                    count = await conn.scalar(
                        sa.select(sa.func.count()).where(deliveries.c.state == "delivered")
                    )
                return count == 5000

            await eventually(settled, deadline=60, what="every outcome recorded")
            async with engine.connect() as conn:
                resent = await conn.scalar(
                    sa.select(sa.func.count()).where(deliveries.c.attempts != 1)
                )
                logged = await conn.scalar(sa.select(sa.func.count()).select_from(attempts))
    finally:
        for app in replicas:
            await app.stop()
        await engine.dispose()
    assert len(subscriber.received) == 5000
    assert len(set(subscriber.event_ids())) == 5000
    assert (resent, logged) == (0, 5000)
    sends = collections.Counter(issuer_of(r.metadata) for r in subscriber.received)
    assert set(sends) == {"replica-a", "replica-b", "replica-c"}
    assert min(sends.values()) >= 500, sends


async def _truthy(value: bool) -> bool:
    return value


async def test_a_killed_replica_s_claims_are_delivered_by_another_after_the_lease(
    database_url: str, subscriber: FakeSubscriber, tmp_path: Path
) -> None:
    """SIGKILL replica A while it holds leases; replica B delivers them once they run out."""
    require_postgres(database_url)
    common = ["--database-url", database_url, "--delivery-timeout", "1"]
    first = Process(
        "publisher",
        ["--listen", "127.0.0.1:0", "--name", "replica-a", *common],
        cwd=str(tmp_path),
    )
    serving = await first.logged("serving")
    subscriber.hang = 30.0  # A's sends stay in flight, leased, until A dies.
    async with grpc.aio.insecure_channel(serving["grpc"]) as channel:
        stub = publisher_pb2_grpc.PublisherServiceStub(channel)
        schedule = duration_pb2.Duration(seconds=3600)
        await stub.RegisterSubscriber(
            publisher_pb2.RegisterSubscriberRequest(
                name="slow", endpoint=f"127.0.0.1:{subscriber.port}", retry_schedule=[schedule]
            )
        )
        batch = publisher_pb2.EmitBatchRequest(
            events=[publisher_pb2.EmitRequest(type="a.b", payload=b"{}") for _ in range(10)]
        )
        emitted = [r.event_id for r in (await stub.EmitBatch(batch)).results]
    await eventually(lambda: _truthy(len(subscriber.received) == 10), what="A sent all 10")
    await first.kill()
    subscriber.hang = 0.0
    subscriber.accepted.clear()  # A's hung sends never completed at the subscriber.

    second = Process(
        "publisher",
        ["--listen", "127.0.0.1:0", "--name", "replica-b", *common],
        cwd=str(tmp_path),
    )
    try:
        await second.logged("serving")
        await eventually(
            lambda: _truthy(len(subscriber.accepted) == 10), deadline=30, what="B delivers"
        )
    finally:
        assert await second.stop() == 0
    assert subscriber.accepted == set(emitted)
    senders = [issuer_of(r.metadata) for r in subscriber.received]
    assert senders[:10] == ["replica-a"] * 10
    assert sorted(senders[10:]) == ["replica-b"] * 10
    assert {r.request.attempt for r in subscriber.received[10:]} == {2}
