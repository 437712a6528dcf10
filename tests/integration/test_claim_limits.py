"""Claims within each subscriber's send limit (publisher.slots), on SQLite and PostgreSQL."""

from __future__ import annotations

import collections
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from common import signing
from publisher import model, statements
from publisher.slots import Grant
from publisher.store import Store
from tests.support import attempt_record, store_subscriber_spec

LEASE = 60.0


async def subscriber(store: Store, prefix: str) -> str:
    spec = store_subscriber_spec(prefix, f"{prefix}.*")
    return (await store.create_subscriber(spec, signing.generate_secret())).id


async def emit(store: Store, event_type: str, count: int) -> None:
    await store.emit([model.NewEvent(event_type, b"{}", "application/json", "")] * count)


def per_subscriber(claims: list[model.Claim]) -> dict[str, int]:
    return dict(collections.Counter(claim.subscriber.id for claim in claims))


async def test_a_claim_skips_a_full_subscribers_backlog_for_the_others(store: Store) -> None:
    """The full subscriber's 300 due deliveries come first; the claim takes the others'."""
    slow = await subscriber(store, "slow")
    fast = await subscriber(store, "fast")
    other = await subscriber(store, "other")
    await emit(store, "slow.x", 300)
    await emit(store, "fast.x", 3)
    await emit(store, "other.x", 2)
    grant = Grant(10, per_subscriber=4, busy={slow: 4}, full=frozenset({slow}))

    before = time.time()
    claims, due, turned_away = await store.claim_round("replica", grant, LEASE)
    after = time.time()

    assert per_subscriber(claims) == {fast: 3, other: 2}
    assert turned_away == {slow}
    # The slow subscriber's deliveries are still due, but wait for room, not for a time:
    # what comes due next is the others', when the leases just taken run out.
    assert due is not None
    assert before + LEASE <= due <= after + LEASE
    later = await store.claim("replica", 1000, LEASE)
    assert per_subscriber(later) == {slow: 300}


async def test_a_claim_that_skips_a_full_subscriber_says_when_the_others_come_due(
    store: Store,
) -> None:
    slow = await subscriber(store, "slow")
    fast = await subscriber(store, "fast")
    await emit(store, "fast.x", 1)
    (retried,) = await store.claim("replica", 10, LEASE)
    retry_at = time.time() + 30
    await store.record(
        [
            attempt_record(
                retried,
                outcome="failed",
                state=model.DeliveryState.PENDING,
                next_attempt_at=retry_at,
                error="refused",
            )
        ]
    )
    await emit(store, "slow.x", 50)
    grant = Grant(10, per_subscriber=4, busy={slow: 4}, full=frozenset({slow}))

    claims, due, turned_away = await store.claim_round("replica", grant, LEASE)

    assert claims == []
    assert turned_away == {slow}
    # Not the slow subscriber's due deliveries (now): the fast one's retry.
    assert due == pytest.approx(retry_at)
    assert retried.subscriber.id == fast


async def test_a_claim_takes_no_more_for_a_subscriber_than_its_room(store: Store) -> None:
    a = await subscriber(store, "a")
    b = await subscriber(store, "b")
    await emit(store, "a.x", 5)
    await emit(store, "b.x", 5)
    grant = Grant(10, per_subscriber=3, busy={a: 1})

    claims, _, _ = await store.claim_round("replica", grant, LEASE)

    assert per_subscriber(claims) == {a: 2, b: 3}
    # Those left over were not leased: they are due for the next claim.
    assert per_subscriber(await store.claim("replica", 1000, LEASE)) == {a: 3, b: 2}


async def test_a_claim_within_limits_leases_in_due_order_and_says_when_more_is_due(
    store: Store,
) -> None:
    a = await subscriber(store, "a")
    await emit(store, "a.x", 3)
    grant = Grant(2, per_subscriber=5)

    first, due, _ = await store.claim_round("replica", grant, LEASE)
    assert per_subscriber(first) == {a: 2}
    assert due is None  # As many as asked for: more may be due.

    rest, due, _ = await store.claim_round("replica", Grant(5, per_subscriber=5), LEASE)
    assert per_subscriber(rest) == {a: 1}
    # Nothing left but the leased ones, which come due again when their leases run out.
    assert due is not None
    assert due >= max(c.event.created_at for c in first + rest) + LEASE - 1


async def test_a_claim_passes_over_a_paused_subscriber(store: Store) -> None:
    """Held deliveries are never claimed, by either query."""
    full = await subscriber(store, "full")
    paused = await subscriber(store, "paused")
    await emit(store, "full.x", 2)
    await emit(store, "paused.x", 2)
    spec = (await store.get_subscriber(paused)).spec
    await store.update_subscriber(paused, spec, model.SubscriberState.PAUSED, "paused by a test")
    grant = Grant(10, per_subscriber=1, busy={full: 1}, full=frozenset({full}))

    claims, _, _ = await store.claim_round("replica", grant, LEASE)

    assert claims == []


async def test_skipping_full_subscribers_probes_each_others_due_deliveries(store: Store) -> None:
    """The query behind the skip loops over subscribers and looks each one's due deliveries
    up in ix_deliveries_subscriber_due, so its cost does not grow with the full
    subscribers' backlog. PostgreSQL plans by its statistics: it is asked with three
    subscribers, one with the whole backlog, where walking ix_deliveries_due would look
    cheap to a planner that assumes an even spread."""
    if store.engine.dialect.name == "sqlite":
        async with store.engine.connect() as conn:
            result = await conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statements.DUE_BY_SUBSCRIBER_SQLITE}",
                ("[]", time.time(), 5, 10),
            )
            plan = [str(row._mapping["detail"]) for row in result]
        assert plan[0].startswith("SCAN s"), plan
        assert not any(step.startswith("SCAN d") for step in plan), plan
    else:
        full = await subscriber(store, "full")
        for prefix in ("a", "b"):
            await subscriber(store, prefix)
        await emit(store, "full.x", 2000)
        await emit(store, "a.x", 3)
        async with store.engine.connect() as conn:
            await conn.execute(sa.text("ANALYZE"))
            query = statements.DUE_BY_SUBSCRIBER_POSTGRES.params(
                b_now=time.time(), b_per=256, b_skip=[full], b_limit=10
            )
            plan = await explain(conn, query)
        assert "ix_deliveries_due" not in " ".join(plan), plan
    assert "ix_deliveries_subscriber_due" in " ".join(plan), plan


async def test_when_the_others_come_due_is_found_by_a_probe_per_subscriber(
    store: Store,
) -> None:
    full = await subscriber(store, "full")
    await subscriber(store, "a")
    await emit(store, "full.x", 2000)
    await emit(store, "a.x", 3)
    query = statements.EARLIEST_DUE_SKIPPING.params(b_skip=[full])
    async with store.engine.connect() as conn:
        if store.engine.dialect.name == "postgresql":
            await conn.execute(sa.text("ANALYZE"))
        plan = await explain(conn, query)
    assert "ix_deliveries_subscriber_due" in " ".join(plan), plan
    assert "ix_deliveries_due" not in " ".join(plan), plan


async def explain(conn: AsyncConnection, query: sa.Select[Any]) -> list[str]:
    compiled = query.compile(conn.sync_connection, compile_kwargs={"literal_binds": True})
    if conn.dialect.name == "sqlite":
        result = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
        return [str(row._mapping["detail"]) for row in result]
    return [str(row[0]) for row in await conn.execute(sa.text(f"EXPLAIN {compiled}"))]
