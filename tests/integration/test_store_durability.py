"""Which transactions wait for the disk: emits do, claims and attempt outcomes do not (on SQLite
and PostgreSQL). A claim or outcome lost in a power cut only means a resend; an emit is answered
as committed, so it must survive one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from common import db, signing
from publisher import migrate, model
from publisher.store import AttemptRecord, Store


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    await migrate.ensure_current(database_url, create_if_empty=True)
    store = Store(db.create_engine(database_url))
    yield store
    await store.close()


def waits_for_disk(conn: Connection) -> bool:
    """Whether this transaction's commit will wait until it is on disk."""
    if conn.dialect.name == "sqlite":
        # 2 is FULL (the WAL is synced at each commit), 1 NORMAL.
        return bool(conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2)
    return bool(conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on")


def probe(store: Store) -> list[bool]:
    """Notes, for every transaction the store runs from now on, whether it waits for the disk."""
    seen: list[bool] = []
    run = store._run

    async def probing(work: Callable[[Connection], Any], **options: Any) -> Any:
        def probed(conn: Connection) -> Any:
            seen.append(waits_for_disk(conn))
            return work(conn)

        return await run(probed, **options)

    store._run = probing  # type: ignore[method-assign]
    return seen


async def test_emits_wait_for_the_disk_and_claims_and_outcomes_do_not(store: Store) -> None:
    spec = model.SubscriberSpec(
        name="s",
        endpoint="127.0.0.1:1",
        protocol=model.Protocol.GRPC,
        event_types=(),
        retry_schedule=(60.0,),
        contact_email="",
        body_format=model.BodyFormat.RAW,
        status_url="",
    )
    await store.create_subscriber(spec, signing.generate_secret())
    seen = probe(store)

    await store.emit([model.NewEvent("a.b", b"{}", "application/json", "")])
    (claim,) = await store.claim("replica", 10, lease_seconds=60.0)
    now = time.time()
    await store.record(
        [
            AttemptRecord(
                delivery_id=claim.delivery_id,
                attempt=claim.attempt,
                owner="replica",
                started_at=now,
                duration=0.01,
                outcome="delivered",
                status_code=0,
                error="",
                new_state=model.DeliveryState.DELIVERED,
                next_attempt_at=now,
                subscriber_id=claim.subscriber.id,
            )
        ]
    )
    # And the next emit waits again, after a transaction that did not.
    await store.emit([model.NewEvent("a.b", b"{}", "application/json", "")])

    assert seen == [True, False, False, True]
