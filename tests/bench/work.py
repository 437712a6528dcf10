"""The least CPU the product's own work costs per event, measured in this process.

Two parts every delivery needs whatever the code around them: signing it
(the JWT on every transport, Standard Webhooks signatures on HTTP as well) and
persisting it (the event, its delivery, the attempt log and the outcome) with
the product's own statements on SQLite's bare cursor, in batches, the emit
synced and the outcome not, as the store does. The report weighs them against
what the targets leave a one-process publisher beyond a bare relay.
"""

from __future__ import annotations

import asyncio
import os
import time
import timeit
from pathlib import Path
from typing import Any

from common import db, signing
from publisher import migrate, statements
from publisher.store import _new_delivery, new_id

BATCH = 500
ROUNDS = 20
SIGNINGS = 20_000


def signing_us(payload: bytes) -> tuple[float, float]:
    """CPU µs to sign one delivery: the JWT alone (gRPC), and with Standard Webhooks (HTTP)."""
    key = os.urandom(32)

    def jwt() -> str:
        return signing.sign_delivery(
            key,
            issuer="grpc-webhooks",
            audience="sub_0123456789abcdef0123456789",
            event_id="evt_0123456789abcdef0123456789",
            event_type="bench.event",
            attempt=1,
            payload=payload,
            now=time.time(),
        )

    def standard() -> str:
        return signing.standard_signatures([key], "evt_0123456789abcdef", int(time.time()), payload)

    per_jwt = _cpu_us(jwt, SIGNINGS)
    return per_jwt, per_jwt + _cpu_us(standard, SIGNINGS)


def sqlite_us(workdir: Path, payload: bytes) -> float:
    """CPU µs per event to commit it with its delivery, then log and settle the attempt."""
    path = workdir / "work-floor.db"
    url = f"sqlite:///{path}"
    asyncio.run(migrate.upgrade(url))
    engine = db.create_sqlite_thread_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO subscribers (id, name, endpoint, protocol, event_types, "
                "retry_schedule, contact_email, secret, body_format, status_url, state, "
                "state_reason, created_at, updated_at) VALUES ('sub_work', 'work', "
                "'127.0.0.1:1', 'grpc', '[]', '[]', '', 'x', 'raw', '', 'active', '', 0, 0)"
            )
        spent = 0.0
        for round_ in range(ROUNDS + 2):
            events, deliveries, outcomes = _batch(payload)
            began = time.process_time()
            with engine.connect() as conn:
                driver: Any = conn.connection.dbapi_connection
                driver.execute("PRAGMA synchronous=FULL")
                with conn.begin():
                    statements.INSERT_EVENTS.execute(conn, events)
                    statements.INSERT_DELIVERIES.execute(conn, deliveries)
                driver.execute("PRAGMA synchronous=NORMAL")
                with conn.begin():
                    statements.LOG_ATTEMPT.execute(conn, outcomes)
                    statements.SETTLE.execute(conn, outcomes)
            if round_ >= 2:  # The first rounds warm the page cache and compile the SQL.
                spent += time.process_time() - began
    finally:
        engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return 1e6 * spent / (BATCH * ROUNDS)


def _batch(payload: bytes) -> tuple[list[dict[str, Any]], ...]:
    now = time.time()
    events: list[dict[str, Any]] = [
        {
            "id": new_id("evt"),
            "type": "bench.event",
            "payload": payload,
            "content_type": "application/json",
            "idempotency_key": None,
            "created_at": now,
        }
        for _ in range(BATCH)
    ]
    deliveries = []
    for event in events:
        delivery = _new_delivery(event["id"], "sub_work", True, now)
        # As an emit writes it in the embedded mode: leased for its first attempt.
        delivery.update(
            attempts=1, round_attempts=1, round_started_at=now, lease_owner="work",
            next_attempt_at=now + 25,
        )  # fmt: skip
        deliveries.append(delivery)
    outcomes = [
        {
            "b_delivery_id": delivery["id"],
            "b_attempt": 1,
            "b_owner": "work",
            "b_started_at": now,
            "b_duration": 0.001,
            "b_outcome": "delivered",
            "b_status_code": 0,
            "b_error": "",
            "b_state": "delivered",
            "b_next": now,
            "b_now": now,
        }
        for delivery in deliveries
    ]
    return events, deliveries, outcomes


def _cpu_us(call: Any, number: int) -> float:
    call()
    return 1e6 * timeit.Timer(call, timer=time.process_time).timeit(number) / number
