"""The least CPU the product's own work costs per event, measured in this process.

Two parts every delivery needs whatever the code around them: signing it
(the JWT on every transport, Standard Webhooks signatures on HTTP as well) and
persisting it (the event, its delivery, the attempt log and the outcome) with
the product's own statements on SQLite's bare cursor, in batches, the emit
synced and the outcome not, as the store does. The report weighs them against
what the targets leave a one-process publisher beyond a bare relay.

Beside them, the product's store itself on the same work, alone in this process:
what its Python costs over the bare statements, and, against the publisher's
threads in e2e_grpc_batch, what sharing one interpreter lock with a busy event
loop costs it.
"""

from __future__ import annotations

import asyncio
import os
import time
import timeit
from pathlib import Path
from typing import Any

from common import db, signing
from publisher import migrate, model, statements
from publisher.ids import new_id
from publisher.slots import Grant
from publisher.store import AttemptRecord, Store, _new_delivery

from . import runtime

BATCH = 500
ROUNDS = 20
SIGNINGS = 20_000
# As in e2e_grpc_batch: the dispatcher's slots, which an emit leases deliveries into, and
# its claims, of at least half of them; outcomes come back a claim's worth at a time.
SLOTS = 256


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
            events, deliveries, logs, settles = _batch(payload)
            began = time.process_time()
            with engine.connect() as conn:
                driver: Any = conn.connection.dbapi_connection
                driver.execute("PRAGMA synchronous=FULL")
                with conn.begin():
                    statements.INSERT_EVENTS.execute(conn, events)
                    statements.INSERT_DELIVERIES.execute(conn, deliveries)
                driver.execute("PRAGMA synchronous=NORMAL")
                with conn.begin():
                    statements.LOG_ATTEMPTS_SQLITE.execute(conn, logs)
                    statements.SETTLE_ALL_SQLITE.execute(conn, settles, after=(time.time(),))
            if round_ >= 2:  # The first rounds warm the page cache and compile the SQL.
                spent += time.process_time() - began
    finally:
        engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return 1e6 * spent / (BATCH * ROUNDS)


def store_us(workdir: Path, payload: bytes) -> float:
    """CPU µs per event of the store doing e2e_grpc_batch's SQLite work, alone in the process.

    Each round emits BATCH events to one subscriber (SLOTS of them leased at emit, as the
    embedded mode hands them to its dispatcher), claims the rest, and records every
    outcome. The event loop's part (group commit, hand-over) counts with the store's thread.
    """
    path = workdir / "work-store.db"
    try:
        return asyncio.run(_store_rounds(path, payload))
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


class _Taker:
    """The dispatcher's side of an emit: slots granted, claims kept."""

    owner = "work"
    lease_seconds = 25.0

    def __init__(self) -> None:
        self.taken: list[model.Claim] = []

    def grant(self, wanted: int) -> Grant:
        return Grant.unlimited(min(wanted, SLOTS))

    def take(self, claims: list[model.Claim], grant: Grant) -> None:
        self.taken.extend(claims)


async def _store_rounds(path: Path, payload: bytes) -> float:
    url = f"sqlite:///{path}"
    await migrate.upgrade(url)
    store = Store(db.create_engine(url))
    taker = store.taker = _Taker()
    spec = model.SubscriberSpec(
        name="work", endpoint="127.0.0.1:1", protocol=model.Protocol.GRPC, event_types=(),
        retry_schedule=(), contact_email="", body_format=model.BodyFormat.RAW, status_url="",
    )  # fmt: skip
    spent = 0.0
    try:
        await store.create_subscriber(spec, signing.generate_secret())
        event = model.NewEvent(runtime.EVENT_TYPE, payload, "application/json", "")
        for round_ in range(ROUNDS + 2):
            taker.taken.clear()
            began = time.process_time()
            await store.emit([event] * BATCH)
            claims = list(taker.taken)
            while len(claims) < BATCH:
                found = await store.claim(taker.owner, SLOTS, taker.lease_seconds)
                if not found:
                    raise RuntimeError(f"{BATCH - len(claims)} deliveries were not claimable")
                claims += found
            stored = time.process_time() - began
            # The dispatcher's part, not the store's.
            outcomes = [_delivered(claim, taker.owner) for claim in claims]
            began = time.process_time()
            for start in range(0, BATCH, SLOTS // 2):
                await store.record(outcomes[start : start + SLOTS // 2])
            if round_ >= 2:  # As in sqlite_us: the first rounds warm up.
                spent += stored + time.process_time() - began
    finally:
        await store.close()
    return 1e6 * spent / (BATCH * ROUNDS)


def _delivered(claim: model.Claim, owner: str) -> AttemptRecord:
    now = time.time()
    return AttemptRecord(
        delivery_id=claim.delivery_id, attempt=claim.attempt, owner=owner, started_at=now,
        duration=0.001, outcome="delivered", status_code=0, error="",
        new_state=model.DeliveryState.DELIVERED, next_attempt_at=now,
        subscriber_id=claim.subscriber.id,
    )  # fmt: skip


def _batch(payload: bytes) -> tuple[list[Any], ...]:
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
    # As Store._write_records writes them on SQLite (statements.LOG_ATTEMPTS_SQLITE and
    # SETTLE_ALL_SQLITE).
    logs = [(d["id"], 1, "work", now, 0.001, "delivered", 0, "") for d in deliveries]
    settles = [(d["id"], 1, "work", "delivered", now, "", "delivered") for d in deliveries]
    return events, deliveries, logs, settles


def _cpu_us(call: Any, number: int) -> float:
    call()
    return 1e6 * timeit.Timer(call, timer=time.process_time).timeit(number) / number
