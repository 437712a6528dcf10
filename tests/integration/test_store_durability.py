"""Which transactions wait for the disk: emits do, claims and attempt outcomes do not (on SQLite
and PostgreSQL). A claim or outcome lost in a power cut only means a resend; an emit is answered
as committed, so it must survive one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from publisher import model
from publisher.store import Store
from tests.integration.test_replicas import one_pending_delivery
from tests.support import attempt_record


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
    await one_pending_delivery(store)
    seen = probe(store)

    (claim,) = await store.claim("replica", 10, lease_seconds=60.0)
    await store.record([attempt_record(claim)])
    # And an emit waits again, after transactions that did not.
    await store.emit([model.NewEvent("a.b", b"{}", "application/json", "")])

    assert seen == [False, False, True]


async def test_after_a_failed_transaction_an_emit_still_waits_for_the_disk(store: Store) -> None:
    """The store thread keeps one connection; a failure replaces it, and the next transaction
    must not trust what the failed one's connection was set to commit with."""
    await one_pending_delivery(store)
    await store.claim("replica", 10, lease_seconds=60.0)  # Leaves the connection not syncing.

    def fail(conn: Connection) -> None:
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    with pytest.raises(sa.exc.DBAPIError):
        await store._run(fail, durable=False)
    seen = probe(store)

    await store.emit([model.NewEvent("a.b", b"{}", "application/json", "")])
    (claim,) = await store.claim("replica", 10, lease_seconds=60.0)

    assert seen == [True, False]
    assert claim.event.type == "a.b"
