"""The publisher's store: every read and write of its database, in batches on the hot path.

Emits are group-committed (many events and their deliveries per transaction),
due deliveries are claimed many at a time with a lease, and attempt outcomes
are recorded many at a time, each only if its writer still holds the lease.
The hot path's statements are built once in ``statements`` (SQLAlchemy Core; on
SQLite the emit, claim and record statements run on the driver's cursor), and
only emits wait for the disk at commit (see ``_run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, NamedTuple, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from common import db, errors
from common.group_commit import GroupCommit
from common.records import record
from publisher import matching, model, statements
from publisher.ids import new_id
from publisher.schema import attempts, deliveries, events, subscribers
from publisher.slots import Grant

T = TypeVar("T")

logger = logging.getLogger("publisher.store")

# Payload bytes in one page of the catch-up feed. gRPC clients refuse a message over 4 MiB
# unless told otherwise, and a page of the largest default payloads (1 MiB) would be far
# over it, so the subscriber would ask for the same page forever. The rest of an event (id,
# type, content type: under 500 bytes) leaves room for a full page of 1,000 small ones.
FEED_PAGE_BYTES = 3 * 1024 * 1024
# Seq values one transaction of the catch-up feed looks at, at most, so that it costs the
# same whatever the subscriber's history (a join over all of a subscriber's deliveries took
# 220-260 ms per page at 200,000 of them on SQLite, on the thread emits wait for). A seq
# value costs about 1 µs there at one delivery per event (each delivery of an event is
# read to check its subscriber, so more with fan-out): an empty stretch of 4,096 took
# 4.3 ms, of 1,024 2.6 ms and of 16,384 18 ms, and a subscriber with 4 events among
# 200,000 reads its whole feed in 50 transactions (0.34 s) rather than 197 (0.69 s).
FEED_STRETCH = 4096
# Stretches one ListEvents call goes through while it finds nothing for the subscriber
# (each a transaction of its own), before it answers an empty page whose cursor moved:
# about 0.3 s on SQLite here. Without a bound, a subscriber of a rare event type behind
# tens of millions of others' events would outlast its call's deadline every time and
# never move on, while each try kept the store busy.
FEED_STRETCHES_PER_CALL = 64
# Events per emit transaction; a batch emit of 1,000 still goes in one piece.
MAX_EMIT_BATCH = 1000
MAX_RECORD_BATCH = 1000
# How long an attempt's outcome waits for others to share its transaction. Nothing waits
# on it (the lease holds the delivery meanwhile), and each transaction costs the store's
# thread a few hundred µs of CPU before its rows: written as soon as the thread was free,
# e2e_grpc_batch's 6,000 outcomes took 276-502 transactions and 202-247 ms of that
# thread's CPU; lingering 10 ms, 47-79 transactions and 152-161 ms.
RECORD_LINGER_SECONDS = 0.01
# How long an emit waits for others to share its transaction and disk sync, only while
# callers come faster than the emits are written (see GroupCommit): a lone Emit at low load
# is written at once. Each transaction costs the store's thread a few hundred µs of CPU
# whatever it holds. In e2e_grpc_unary (256 Emit calls in flight) the emits went in 313
# transactions of about 10 events per 3,000 events; lingering 3 ms, in 126 of about 24
# (one run each). Lingering only while busy, the publisher's CPU per event fell from
# 657-663 to 573-583 µs and the rate rose 19% and 17% (two interleaved pairs); 2, 3 and
# 5 ms did alike. Under load it adds up to the linger to an Emit's answer: 6 ms, tried on
# a day the machine ran at half speed, won 5-7% in e2e_grpc_unary but took the p99 at half
# load over 30 ms in 3 of 9 runs (74 ms in one), against at most 19.8 in 15 runs at 2 ms.
EMIT_LINGER_SECONDS = 0.002
# Transient conflicts (two replicas inserting one idempotency key) are retried this often.
_EMIT_TRIES = 3
# PostgreSQL channel that wakes other replicas when work becomes due (publisher.wakeup).
NOTIFY_CHANNEL = "webhooks_new_work"
# The reconciliation sweep holds deliveries under its own name, ``sweeper_of(owner)``: an
# attempt that was in flight under the owner's name stays fenced off from them (a Redeliver
# gives the delivery up without a new attempt number), and they keep their scheduled time
# when given back, since asking the subscriber is not an attempt.
SWEEP_PREFIX = "sweep:"


def sweeper_of(owner: str) -> str:
    return SWEEP_PREFIX + owner


@record
class AttemptRecord:
    """The outcome of one attempt and what it makes of its delivery."""

    delivery_id: str
    attempt: int
    owner: str
    started_at: float
    duration: float
    outcome: str
    status_code: int
    error: str
    new_state: model.DeliveryState
    next_attempt_at: float
    # Non-empty: disable the subscriber for this reason (it answered 410 Gone).
    disable_reason: str = ""
    subscriber_id: str = ""


class ClaimRound(NamedTuple):
    claims: list[model.Claim]
    # When it found fewer than the grant allowed, when the next delivery comes due, those
    # of the subscribers it turned away aside. None when that is not known: more may be
    # due now, or none is pending.
    due: float | None
    # Subscribers with due deliveries left for want of room: once they have room again,
    # those can be claimed.
    turned_away: frozenset[str]


class Taker(Protocol):
    """Who takes new deliveries straight from an emit (the embedded mode's dispatcher)."""

    @property
    def owner(self) -> str: ...

    @property
    def lease_seconds(self) -> float: ...

    def grant(self, wanted: int) -> Grant:
        """Slots held for up to ``wanted`` new deliveries, within each subscriber's room."""
        ...

    def take(self, claims: list[model.Claim], grant: Grant) -> None:
        """Starts ``claims`` and gives back the rest of the slots ``grant`` held."""
        ...


# An edit of a subscriber: from the subscriber as it is, its new spec, state and reason.
Edit = Callable[[model.Subscriber], tuple[model.SubscriberSpec, model.SubscriberState, str]]


class Store:
    def __init__(self, engine: AsyncEngine, *, now: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._now = now
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite: every transaction runs whole on one thread of its own (see _run).
        self._thread: ThreadPoolExecutor | None = None
        self._thread_engine: Engine | None = None
        # The thread's connection, opened on its first transaction (see _in_thread).
        self._thread_conn: Connection | None = None
        if engine.dialect.name == "sqlite":
            url = engine.url.render_as_string(hide_password=False)
            self._thread_engine = db.create_sqlite_thread_engine(url)
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        # What the thread's connection commits with now (see _in_thread); db sets FULL.
        # None: not known, after a failed transaction.
        self._synchronous_full: bool | None = True
        self._emits: GroupCommit[model.NewEvent, model.EmitResult] = GroupCommit(
            self._write_events, MAX_EMIT_BATCH, linger=EMIT_LINGER_SECONDS, linger_when_idle=False
        )
        self._records: GroupCommit[AttemptRecord, None] = GroupCommit(
            self._write_records, MAX_RECORD_BATCH, linger=RECORD_LINGER_SECONDS
        )
        # Called after every commit that may have made deliveries due.
        self.on_new_work: Callable[[], None] = lambda: None
        # Called with a subscriber's id after every commit that changed, disabled or
        # deleted it: deliveries leased for it before then were leased with what it was.
        self.on_subscriber_changed: Callable[[str], None] = lambda _: None
        # Embedded mode only: new deliveries are leased in the emit's own transaction and
        # handed over, which saves the claim round trip between an Emit and its send.
        self.taker: Taker | None = None

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def _run(
        self, work: Callable[[Connection], T], *, snapshot: bool = False, durable: bool = True
    ) -> T:
        """Runs ``work`` in one transaction and returns what it returns.

        On SQLite the whole transaction runs on the store's own thread: one
        hand-over instead of one per statement, each of which would wait for a
        turn of the busy event loop. On PostgreSQL it runs through the async
        driver; ``snapshot`` makes its reads one consistent view there (SQLite's
        transactions always are).

        ``durable=False`` commits without waiting for the disk, for transactions
        whose loss in a power cut only costs a resend: claims and attempt
        outcomes, never emits. The database survives a power cut as a prefix of
        its commits, and every durable commit flushes all those before it, so a
        lost claim or outcome only means its lease runs out and the delivery is
        sent again. A crash of the publisher alone loses nothing either way.
        """
        if self._thread is None:
            async with self._engine.connect() as conn:
                if snapshot:
                    conn = await conn.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    if not durable:
                        await conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    return await conn.run_sync(work)
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._in_thread, work, durable
        )

    def _in_thread(self, work: Callable[[Connection], T], durable: bool) -> T:
        assert self._thread_engine is not None
        # One connection, kept open for the thread's life: checking one out of the pool
        # per transaction was a tenth of the thread's CPU in e2e_grpc_batch.
        conn = self._thread_conn
        if conn is None:
            conn = self._thread_conn = self._thread_engine.connect()
        try:
            if durable != self._synchronous_full:
                # Outside any transaction (the driver never begins one on its own). FULL
                # syncs the WAL at commit; NORMAL leaves it to the next FULL or checkpoint:
                # a synced commit costs 124 µs of the store thread here, 43 µs of it CPU.
                mode = "FULL" if durable else "NORMAL"
                conn.connection.dbapi_connection.execute(f"PRAGMA synchronous={mode}")  # type: ignore[union-attr]
                self._synchronous_full = durable
            with conn.begin():
                return work(conn)
        except BaseException:
            # Whatever state a failure left the connection in, the next transaction
            # starts on a fresh one, and sets its commit mode whatever it needs: the
            # pool may hand back the same driver connection, or a new one (FULL).
            self._thread_conn = None
            self._synchronous_full = None
            conn.close()
            raise

    def _close_thread_conn(self) -> None:
        if self._thread_conn is not None:
            self._thread_conn.close()
            self._thread_conn = None

    def _announce(self, conn: Connection) -> None:
        """Tells the other replicas, on commit, that deliveries became due (PostgreSQL only)."""
        if self._postgres:
            conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    async def close(self) -> None:
        await self._emits.close()
        await self._records.close()
        if self._thread is not None and self._thread_engine is not None:
            # A second close finds the thread shut down, and its connection closed.
            with contextlib.suppress(RuntimeError):
                await asyncio.get_running_loop().run_in_executor(
                    self._thread, self._close_thread_conn
                )
            self._thread.shutdown(wait=True)
            self._thread_engine.dispose()
        await self._engine.dispose()

    # -- subscribers -------------------------------------------------------------------------

    async def create_subscriber(self, spec: model.SubscriberSpec, secret: str) -> model.Subscriber:
        now = self._now()
        subscriber = model.Subscriber(
            id=new_id("sub"),
            spec=spec,
            secret=secret,
            state=model.SubscriberState.ACTIVE,
            state_reason="",
            created_at=now,
            updated_at=now,
        )
        insert = subscribers.insert().values(**_subscriber_row(subscriber))
        await self._run(lambda conn: conn.execute(insert))
        return subscriber

    async def get_subscriber(self, subscriber_id: str) -> model.Subscriber:
        return await self._run(lambda conn: _load_subscriber(conn, subscriber_id))

    async def list_subscribers(self, limit: int, after_id: str) -> list[model.Subscriber]:
        query = (
            subscribers.select()
            .where(subscribers.c.id > after_id)
            .order_by(subscribers.c.id)
            .limit(limit)
        )
        return await self._run(
            lambda conn: [_subscriber(row._mapping) for row in conn.execute(query)]
        )

    async def update_subscriber(
        self,
        subscriber_id: str,
        spec: model.SubscriberSpec,
        state: model.SubscriberState,
        state_reason: str,
    ) -> model.Subscriber:
        """Replaces the spec and state; deliveries wait while it is not active."""
        return await self.edit_subscriber(subscriber_id, lambda _: (spec, state, state_reason))

    async def edit_subscriber(self, subscriber_id: str, change: Edit) -> model.Subscriber:
        """Applies ``change`` to the subscriber as it is now, in one transaction.

        ``change`` gets the subscriber read with its row locked, so that what it
        keeps (the fields an update does not name, a state set by an automatic
        disable) cannot be overwritten by a concurrent update of other fields.
        What it raises (InvalidArgument) rolls everything back.
        """
        now = self._now()

        def work(conn: Connection) -> tuple[model.Subscriber, bool]:
            _lock_audience(conn, exclusive=True)
            current = _load_subscriber(conn, subscriber_id, for_update=True)
            spec, state, state_reason = change(current)
            reactivated = state == model.SubscriberState.ACTIVE != current.state
            # What the caller does not set stays: the secrets (a rotation's previous one
            # keeps signing until it expires) and the failure record.
            updated = replace(
                current,
                spec=spec,
                state=state,
                state_reason=state_reason,
                updated_at=now,
                # Re-enabling gives a fresh start before the failing period counts again.
                failing_since=None if reactivated else current.failing_since,
            )
            row = _subscriber_row(updated)
            del row["id"]
            if reactivated:
                row["disable_notice_due"] = False
                row["disable_notice_taken_at"] = None
            conn.execute(
                subscribers.update().where(subscribers.c.id == subscriber_id).values(**row)
            )
            if current.state != state:
                hold = state != model.SubscriberState.ACTIVE
                _set_hold(conn, subscriber_id, hold=hold, now=now)
            if reactivated:
                self._announce(conn)
            return updated, reactivated

        updated, reactivated = await self._run(work)
        self.on_subscriber_changed(subscriber_id)
        if reactivated:
            self.on_new_work()
        return updated

    async def rotate_secret(
        self, subscriber_id: str, secret: str, previous_valid_for: float
    ) -> model.Subscriber:
        """Makes ``secret`` the signing secret; the current one stays valid for a while."""
        now = self._now()

        def work(conn: Connection) -> model.Subscriber:
            current = _load_subscriber(conn, subscriber_id)
            conn.execute(
                subscribers.update()
                .where(subscribers.c.id == subscriber_id)
                .values(
                    secret=secret,
                    previous_secret=current.secret,
                    previous_secret_expires_at=now + previous_valid_for,
                    updated_at=now,
                )
            )
            return _load_subscriber(conn, subscriber_id)

        rotated = await self._run(work)
        self.on_subscriber_changed(subscriber_id)
        return rotated

    async def delete_subscriber(self, subscriber_id: str) -> None:
        def work(conn: Connection) -> None:
            _load_subscriber(conn, subscriber_id)
            owned = sa.select(deliveries.c.id).where(deliveries.c.subscriber_id == subscriber_id)
            conn.execute(attempts.delete().where(attempts.c.delivery_id.in_(owned)))
            conn.execute(deliveries.delete().where(deliveries.c.id.in_(owned)))
            conn.execute(subscribers.delete().where(subscribers.c.id == subscriber_id))

        await self._run(work)
        self.on_subscriber_changed(subscriber_id)

    # -- events ------------------------------------------------------------------------------

    async def emit(self, batch: Sequence[model.NewEvent]) -> list[model.EmitResult]:
        """Commits the events and their deliveries; returns after the commit."""
        return await self._emits.submit(batch)

    async def _write_events(self, batch: list[model.NewEvent]) -> list[model.EmitResult]:
        taker = self.taker
        grant = taker.grant(len(batch)) if taker is not None else Grant.unlimited(0)
        claims: list[model.Claim] = []
        try:
            for attempt in range(_EMIT_TRIES):
                try:
                    results, claims = await self._run(
                        lambda conn: self._insert_events(conn, batch, grant)
                    )
                    break
                except sa.exc.IntegrityError:
                    # Another replica committed the same idempotency key first; look again.
                    if attempt == _EMIT_TRIES - 1:
                        raise
        finally:
            if taker is not None:
                _after_commit(taker.take, claims, grant)
        created = sum(r.delivery_count for r in results if not r.duplicate)
        if created > len(claims):
            _after_commit(self.on_new_work)
        return results

    def _insert_events(
        self, conn: Connection, batch: list[model.NewEvent], grant: Grant
    ) -> tuple[list[model.EmitResult], list[model.Claim]]:
        """Inserts the events and their deliveries; leases those to active subscribers
        that ``grant`` has room for to the taker, returning them as claims."""
        now = self._now()
        grant.reset()  # A retried transaction leased nothing.
        keys = {event.idempotency_key for event in batch if event.idempotency_key}
        known: dict[str, model.EmitResult] = {}
        if keys:
            known = _known_keys(conn, keys)
        # Paused and disabled subscribers get their deliveries too, held until they are
        # active again: nothing they were meant to get is lost while they are off.
        _lock_audience(conn, exclusive=False)
        audience = [_subscriber(row) for row in statements.AUDIENCE.fetch(conn)]
        event_rows: list[dict[str, Any]] = []
        delivery_rows: list[dict[str, Any]] = []
        results: list[model.EmitResult] = []
        claims: list[model.Claim] = []
        for event in batch:
            if event.idempotency_key in known:
                results.append(known[event.idempotency_key])
                continue
            event_id = new_id("evt")
            event_rows.append(
                {
                    "id": event_id,
                    "type": event.type,
                    "payload": event.payload,
                    "content_type": event.content_type,
                    "idempotency_key": event.idempotency_key or None,
                    "created_at": now,
                }
            )
            count = 0
            for subscriber in audience:
                if not matching.matches(subscriber.spec.event_types, event.type):
                    continue
                count += 1
                active = subscriber.state == model.SubscriberState.ACTIVE
                row = _new_delivery(event_id, subscriber.id, active, now)
                if (
                    active
                    and self.taker is not None
                    and grant.take(subscriber.id, subscriber.spec.max_in_flight, len(event.payload))
                ):
                    claims.append(_lease_new(row, event, subscriber, self.taker, now))
                delivery_rows.append(row)
            result = model.EmitResult(event_id=event_id, delivery_count=count, duplicate=False)
            results.append(result)
            if event.idempotency_key:
                # A repeated key later in the same batch gets this event too.
                known[event.idempotency_key] = model.EmitResult(event_id, count, duplicate=True)
        if event_rows:
            _lock_feed(conn)
            statements.INSERT_EVENTS.execute(conn, event_rows)
        if delivery_rows:
            statements.INSERT_DELIVERIES.execute(conn, delivery_rows)
            self._announce(conn)
        return results, claims

    async def get_event(self, event_id: str) -> model.Event:
        query = events.select().where(events.c.id == event_id)
        row = await self._run(lambda conn: conn.execute(query).first())
        if row is None:
            raise errors.NotFound(f"event_id: no event {event_id!r}")
        return _event(row._mapping)

    # -- deliveries --------------------------------------------------------------------------

    async def list_deliveries(
        self, where: model.DeliveryFilter, limit: int, after_id: str
    ) -> list[model.Delivery]:
        query = deliveries_listed(where, limit, after_id)
        return await self._run(
            lambda conn: [_delivery(row._mapping, ()) for row in conn.execute(query)]
        )

    async def get_delivery(self, delivery_id: str) -> model.Delivery:
        # The row and its attempt log in one snapshot, not one from before an outcome and
        # the other from after it.
        return await self._run(lambda conn: _load_delivery(conn, delivery_id), snapshot=True)

    async def redeliver(self, delivery_id: str) -> model.Delivery:
        """Queues the delivery at once with a fresh schedule; an attempt in flight is fenced off."""
        now = self._now()

        def work(conn: Connection) -> model.Delivery:
            _lock_audience(conn, exclusive=False)
            current = _load_delivery(conn, delivery_id)
            subscriber = _load_subscriber(conn, current.subscriber_id)
            active = subscriber.state == model.SubscriberState.ACTIVE
            state = model.DeliveryState.PENDING if active else model.DeliveryState.HELD
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .values(
                    state=state.value,
                    round_attempts=0,
                    round_started_at=None,
                    next_attempt_at=now,
                    lease_owner=None,
                    # If it is dead-lettered again, the people are told again.
                    notified_at=None,
                    updated_at=now,
                )
            )
            self._announce(conn)
            return _load_delivery(conn, delivery_id)

        delivery = await self._run(work)
        self.on_new_work()
        return delivery

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[model.Claim]:
        """Leases up to ``limit`` due deliveries to ``owner`` and bumps their attempt numbers.

        The lease expiry becomes the delivery's next attempt time, so if the
        owner dies the delivery simply comes due again. On PostgreSQL, SKIP
        LOCKED lets replicas claim side by side without waiting on each other.
        """
        return (await self.claim_round(owner, Grant.unlimited(limit), lease_seconds)).claims

    async def claim_round(self, owner: str, grant: Grant, lease_seconds: float) -> ClaimRound:
        """``claim`` of what ``grant`` has room for; see ClaimRound for what else it says."""
        now = self._now()
        params = {
            "b_now": now,
            "b_limit": grant.total,
            "b_owner": owner,
            "b_lease_until": now + lease_seconds,
        }

        def work(conn: Connection) -> ClaimRound:
            claims, turned_away = _lease_due(conn, params, grant)
            if len(claims) == grant.total:
                return ClaimRound(claims, None, turned_away)
            # In the same transaction, so an idle dispatcher needs one round trip, not two.
            if turned_away:
                # Their due deliveries wait for room, not for a time: the others' count.
                skip = _skipped(grant, turned_away)
                due = conn.scalar(statements.EARLIEST_DUE_SKIPPING, {"b_skip": skip})
            else:
                due = conn.scalar(statements.EARLIEST_DUE)
            return ClaimRound(claims, None if due is None else float(due), turned_away)

        return await self._run(work, durable=False)

    async def claim_doubtful(
        self, owner: str, limit: int, lease_seconds: float
    ) -> list[tuple[model.Claim, float]]:
        """Leases pending deliveries whose last attempt was uncertain, to ask about them.

        Unlike ``claim`` this is no attempt: the attempt number stays, and each
        claim comes with the delivery's scheduled time, to be given back by
        ``release_unconfirmed`` if the subscriber does not have the event. The
        lease never brings that time forward: if the sweeper dies, the delivery
        comes due at its scheduled time (or when the lease runs out, if later).
        """
        now = self._now()

        def work(conn: Connection) -> tuple[dict[str, float], list[model.Claim]]:
            doubtful = conn.execute(statements.DOUBTFUL, {"b_limit": limit})
            scheduled = {row.id: row.next_attempt_at for row in doubtful}
            if not scheduled:
                return scheduled, []
            leased = conn.execute(
                deliveries.update()
                .where(deliveries.c.id.in_(list(scheduled)))
                .values(
                    lease_owner=owner,
                    next_attempt_at=sa.case(
                        (
                            deliveries.c.next_attempt_at > now + lease_seconds,
                            deliveries.c.next_attempt_at,
                        ),
                        else_=now + lease_seconds,
                    ),
                )
                .returning(*statements.CLAIMED)
            )
            return scheduled, _with_details(conn, leased.all())

        scheduled, claims = await self._run(work, durable=False)
        return [(claim, scheduled[claim.delivery_id]) for claim in claims]

    async def release_unconfirmed(
        self, released: Sequence[tuple[model.Claim, float]], owner: str
    ) -> None:
        """Gives back deliveries asked about in vain, each at its scheduled time again."""
        await self._run(
            lambda conn: conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.id == sa.bindparam("b_id"),
                    deliveries.c.attempts == sa.bindparam("b_attempt"),
                    deliveries.c.lease_owner == owner,
                )
                .values(lease_owner=None, next_attempt_at=sa.bindparam("b_next")),
                [
                    {"b_id": claim.delivery_id, "b_attempt": claim.attempt, "b_next": when}
                    for claim, when in released
                ],
            )
        )

    async def record(self, outcomes: Sequence[AttemptRecord]) -> None:
        """Writes attempt outcomes; one whose lease was lost (fenced) is dropped."""
        await self._records.submit(outcomes)

    def record_soon(self, outcomes: Sequence[AttemptRecord]) -> asyncio.Future[list[None]]:
        """``record`` without waiting for the commit; the future says when it is written."""
        return self._records.enqueue(outcomes)

    async def _write_records(self, batch: list[AttemptRecord]) -> list[None]:
        now = self._now()
        healthy, failing = _health(batch)

        disabling = any(outcome.disable_reason for outcome in batch)

        def write(conn: Connection) -> None:
            if disabling:
                # Before the rows below are locked: a Redeliver holding the lock shared
                # may be waiting for one of them.
                _lock_audience(conn, exclusive=True)
            if self._postgres:
                # LOG_ATTEMPT checks the fence without locking the row: a claim by another
                # replica committing meanwhile would get the attempt logged and SETTLE then
                # fenced off. Locked first (in id order in every batch), both statements
                # see the row as the last committed writer left it.
                ids = sorted({outcome.delivery_id for outcome in batch})
                conn.execute(statements.LOCK_DELIVERIES, {"b_ids": ids})
                params = [_outcome_params(outcome, now) for outcome in batch]
                statements.LOG_ATTEMPT.execute(conn, params)
                statements.SETTLE.execute(conn, params)
            else:
                # SQLite: one statement of each per 100 outcomes (statements.RowsOfValues).
                statements.LOG_ATTEMPTS_SQLITE.execute(
                    conn,
                    [
                        (r.delivery_id, r.attempt, r.owner, r.started_at, r.duration,
                         r.outcome, r.status_code, r.error)
                        for r in batch
                    ],
                )  # fmt: skip
                statements.SETTLE_ALL_SQLITE.execute(
                    conn,
                    [
                        (r.delivery_id, r.attempt, r.owner, r.new_state.value,
                         r.next_attempt_at, r.error, r.outcome)
                        for r in batch
                    ],
                    after=(now,),
                )  # fmt: skip
            if healthy:
                statements.SUBSCRIBER_HEALTHY.execute(conn, [{"b_id": id_} for id_ in healthy])
            if failing:
                rows = [{"b_id": id_, "b_now": now} for id_ in failing]
                statements.SUBSCRIBER_FAILING.execute(conn, rows)
            for outcome in batch:
                if outcome.disable_reason:
                    _disable(conn, outcome.subscriber_id, outcome.disable_reason, now)

        await self._run(write, durable=False)
        for outcome in batch:
            if outcome.disable_reason:
                self.on_subscriber_changed(outcome.subscriber_id)
        if any(outcome.new_state == model.DeliveryState.PENDING for outcome in batch):
            self.on_new_work()
        return [None] * len(batch)

    async def give_back(self, owner: str, unsent: Sequence[model.Claim]) -> None:
        """Hands back leases of ``owner``'s that were never attempted, due at once, and
        takes back the attempt each lease counted.

        The dispatcher's waiting deliveries at a stop: their next claim is their
        attempt, not the one after it, so a stop costs no delivery a step of its
        retry schedule. A lease that is no longer ``owner``'s, or no longer at that
        attempt, is left alone.
        """
        if not unsent:
            return
        now = self._now()
        give_back = (
            deliveries.update()
            .where(
                deliveries.c.id == sa.bindparam("b_id"),
                deliveries.c.attempts == sa.bindparam("b_attempt"),
                deliveries.c.lease_owner == owner,
                # Held: its subscriber was paused meanwhile. (Not IN: executemany.)
                sa.or_(*(deliveries.c.state == state for state in _UNSETTLED)),
            )
            .values(
                attempts=deliveries.c.attempts - 1,
                round_attempts=deliveries.c.round_attempts - 1,
                # The lease started the round if it was the round's first attempt.
                round_started_at=sa.case(
                    (deliveries.c.round_attempts == 1, None),
                    else_=deliveries.c.round_started_at,
                ),
                lease_owner=None,
                next_attempt_at=now,
                updated_at=now,
            )
        )
        rows = [{"b_id": claim.delivery_id, "b_attempt": claim.attempt} for claim in unsent]
        await self._run(lambda conn: conn.execute(give_back, rows))

    async def release(self, owner: str) -> int:
        """Hands back ``owner``'s leases (and its sweeper's) so that they are due at once
        (graceful stop); the sweeper's keep their scheduled time."""
        now = self._now()
        release = (
            deliveries.update()
            .where(
                deliveries.c.lease_owner.in_([owner, sweeper_of(owner)]),
                deliveries.c.state.in_(_UNSETTLED),
            )
            .values(lease_owner=None, next_attempt_at=_due_again(now), updated_at=now)
        )
        return await self._run(lambda conn: conn.execute(release).rowcount)

    async def reclaim_all(self) -> int:
        """Makes every leased delivery due now (a sweeper's at its scheduled time).

        Only for the embedded database, where this process is the only
        publisher: any lease it finds was left by a previous run that died.
        """
        now = self._now()
        reclaim = (
            deliveries.update()
            .where(deliveries.c.lease_owner.is_not(None))
            .values(lease_owner=None, next_attempt_at=_due_again(now), updated_at=now)
        )
        return await self._run(lambda conn: conn.execute(reclaim).rowcount)

    async def prune(self, before: float, limit: int) -> int:
        """Deletes up to ``limit`` events created before ``before`` whose every delivery is
        settled (delivered or dead-lettered) since before then, with those deliveries and
        their attempts; returns how many events went. Events still owed to anyone stay,
        however old. On SQLite fewer events go when their deliveries would pass
        PRUNE_DELIVERIES (one event always may)."""
        doomed = expired_events(before, limit)
        # PostgreSQL reads every candidate at once, and makes no emit wait for a prune (it
        # locks only the old rows it deletes): there a batch is ``limit`` events.
        budget = math.inf if self._postgres else PRUNE_DELIVERIES

        def work(conn: Connection) -> int:
            if self._postgres and not conn.scalar(_TAKE_PRUNE_TURN):
                # Another replica is pruning. Both would pick the same oldest events and the
                # second would wait on the first's locks only to find them gone.
                return 0
            ids: list[str] = []
            rows = 0
            found = conn.execute(doomed)
            try:
                # SQLite works a row out as it is read: those past the budget cost nothing.
                for event_id, their_deliveries in found:
                    rows += their_deliveries
                    if ids and rows > budget:
                        break
                    ids.append(event_id)
            finally:
                found.close()
            if not ids:
                return 0
            # Their deliveries, locked and read again: on PostgreSQL a Redeliver may have
            # made one owed since the query above, and its event must stay.
            lock = (
                sa.select(deliveries.c.event_id, _kept(before).label("kept"))
                .where(deliveries.c.event_id.in_(ids))
                .with_for_update()
            )
            owed_now = {row.event_id for row in conn.execute(lock) if row.kept}
            ids = [event_id for event_id in ids if event_id not in owed_now]
            if not ids:
                return 0
            of_doomed = sa.select(deliveries.c.id).where(deliveries.c.event_id.in_(ids))
            conn.execute(attempts.delete().where(attempts.c.delivery_id.in_(of_doomed)))
            conn.execute(deliveries.delete().where(deliveries.c.event_id.in_(ids)))
            # What this transaction deleted, not what it meant to: rows something else
            # deleted since the query above are not this prune's.
            return int(conn.execute(events.delete().where(events.c.id.in_(ids))).rowcount)

        # Losing a prune in a power cut only means the next round does it again.
        return await self._run(work, durable=False)

    async def replay(self, subscriber_id: str, since: float, patterns: Sequence[str]) -> int:
        """Queues many deliveries again at once, each with a fresh schedule.

        Without ``patterns``: the failed deliveries of ``subscriber_id`` whose
        events were created at or after ``since``. With ``patterns``: every
        delivery of a matching event since then (of ``subscriber_id`` if given).
        """
        now = self._now()
        query = (
            sa.select(deliveries.c.id, events.c.type)
            .select_from(deliveries.join(events))
            .where(events.c.created_at >= since)
        )
        if subscriber_id:
            query = query.where(deliveries.c.subscriber_id == subscriber_id)
        if not patterns:
            query = query.where(deliveries.c.state == model.DeliveryState.FAILED.value)
        active = sa.select(subscribers.c.id).where(
            subscribers.c.state == model.SubscriberState.ACTIVE.value
        )

        def work(conn: Connection) -> int:
            _lock_audience(conn, exclusive=False)
            if subscriber_id:
                _load_subscriber(conn, subscriber_id)
            found = conn.execute(query)
            ids = [row.id for row in found if not patterns or matching.matches(patterns, row.type)]
            for chunk in _chunks(ids, 500):
                conn.execute(
                    deliveries.update()
                    .where(deliveries.c.id.in_(chunk))
                    .values(
                        state=sa.case(
                            (deliveries.c.subscriber_id.in_(active), "pending"),
                            else_=model.DeliveryState.HELD.value,
                        ),
                        round_attempts=0,
                        round_started_at=None,
                        next_attempt_at=now,
                        lease_owner=None,
                        notified_at=None,
                        updated_at=now,
                    )
                )
            if ids:
                self._announce(conn)
            return len(ids)

        count = await self._run(work)
        if count:
            self.on_new_work()
        return count

    async def events_for(
        self, subscriber_id: str, after_seq: int, limit: int
    ) -> tuple[list[model.Event], int]:
        """The catch-up feed: events ``subscriber_id`` has a delivery of, in emit order.

        Returns the events after ``after_seq`` (at most ``limit``, and fewer when their
        payloads pass FEED_PAGE_BYTES, never none while there is one) with the cursor to
        continue from. A page is empty when nothing newer is there for the subscriber
        (its cursor may still have moved, past others' events, up to the newest), or
        when FEED_STRETCHES_PER_CALL stretches held nothing for it: the cursor has moved
        past them, and the caller asks again from there.

        Each transaction looks at FEED_STRETCH seq values at most, so that it costs the
        same however many deliveries the subscriber has; a stretch with nothing for the
        subscriber is followed by the next in a transaction of its own, so that emits
        and claims get their turn between them.
        """
        cursor = after_seq
        for _ in range(FEED_STRETCHES_PER_CALL):
            rows, cursor, at_newest = await self._run(
                functools.partial(_feed_stretch, subscriber_id, cursor, limit), snapshot=True
            )
            if rows or at_newest:
                return [_event(row._mapping) for row in rows], cursor
        return [], cursor

    # -- people at the end: dead-letter digests and automatic disabling ---------------------

    async def subscribers_with_dead_letters(self, window: float) -> list[model.Subscriber]:
        """Subscribers with failed deliveries nobody was told of, not emailed within ``window``."""
        now = self._now()
        unnotified = sa.select(deliveries.c.subscriber_id).where(
            deliveries.c.state == model.DeliveryState.FAILED.value,
            deliveries.c.notified_at.is_(None),
        )
        query = subscribers.select().where(
            subscribers.c.id.in_(unnotified),
            _notice_window_open(now, window),
        )
        return await self._run(lambda conn: _subscribers(conn, query))

    async def take_notice_turn(self, subscriber_id: str, window: float) -> bool:
        """Claims the right to email about ``subscriber_id`` now; only one replica wins."""
        now = self._now()
        take = (
            subscribers.update()
            .where(subscribers.c.id == subscriber_id, _notice_window_open(now, window))
            .values(last_notified_at=now)
        )
        return bool(await self._run(lambda conn: conn.execute(take).rowcount))

    async def give_back_notice_turn(self, subscriber_id: str) -> None:
        """After a failed send: the turn was taken at least a window after the last email,
        so clearing it lets the next round try again at once."""
        give_back = (
            subscribers.update()
            .where(subscribers.c.id == subscriber_id)
            .values(last_notified_at=None)
        )
        await self._run(lambda conn: conn.execute(give_back))

    async def dead_letters(
        self, subscriber_id: str, limit: int
    ) -> tuple[list[model.DeadLetter], int]:
        """Up to ``limit`` unnotified failed deliveries of a subscriber, and how many there are."""
        where = (
            deliveries.c.subscriber_id == subscriber_id,
            deliveries.c.state == model.DeliveryState.FAILED.value,
            deliveries.c.notified_at.is_(None),
        )

        def work(conn: Connection) -> tuple[list[model.DeadLetter], int]:
            total = conn.scalar(sa.select(sa.func.count()).where(*where))
            rows = conn.execute(
                sa.select(deliveries, events.c.type.label("event_type"))
                .select_from(deliveries.join(events))
                .where(*where)
                .order_by(deliveries.c.id)
                .limit(limit)
            )
            letters = [
                model.DeadLetter(
                    delivery_id=row.id,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    attempts=row.attempts,
                    last_error=row.last_error,
                    failed_at=row.updated_at,
                )
                for row in rows
            ]
            return letters, int(total or 0)

        return await self._run(work)

    async def mark_notified(self, delivery_ids: Sequence[str]) -> None:
        """Stamps those of ``delivery_ids`` still failed and untold as told.

        A Redeliver or Replay while the email was being sent made one pending again with
        ``notified_at`` cleared: stamped anyway, it would be left out of every digest when
        it dead-letters again.
        """
        now = self._now()

        def work(conn: Connection) -> None:
            for chunk in _chunks(list(delivery_ids), 500):
                conn.execute(
                    deliveries.update()
                    .where(
                        deliveries.c.id.in_(chunk),
                        deliveries.c.state == model.DeliveryState.FAILED.value,
                        deliveries.c.notified_at.is_(None),
                    )
                    .values(notified_at=now)
                )

        await self._run(work)

    async def disable_failing(self, failing_for: float) -> list[model.Subscriber]:
        """Disables active subscribers that have only failed for ``failing_for`` seconds."""
        now = self._now()

        def work(conn: Connection) -> list[model.Subscriber]:
            rows = conn.execute(
                subscribers.select().where(
                    subscribers.c.state == model.SubscriberState.ACTIVE.value,
                    subscribers.c.failing_since <= now - failing_for,
                )
            )
            disabled = []
            for row in rows.all():
                since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row.failing_since))
                reason = f"disabled automatically: every delivery failed since {since}"
                # Another replica may have disabled it since the select: it tells them.
                if _disable(conn, row.id, reason, now):
                    disabled.append(_load_subscriber(conn, row.id))
            return disabled

        disabled = await self._run(work)
        for subscriber in disabled:
            self.on_subscriber_changed(subscriber.id)
        return disabled

    async def disable_notices_due(self) -> list[model.Subscriber]:
        """Disabled subscribers nobody has told, or is telling; ``take_disable_notice`` first."""
        query = subscribers.select().where(_disable_notice_free(self._now()))
        return await self._run(lambda conn: _subscribers(conn, query))

    async def take_disable_notice(self, subscriber_id: str) -> float | None:
        """Claims the notice that ``subscriber_id`` was disabled; only one replica wins.

        Returns the claim's time, for ``done_disable_notice`` or ``give_back_disable_notice``;
        None if the notice is not due or another replica is sending it. The notice stays
        owed until it is done, so that if this replica stops while sending it, another sends
        it once DISABLE_NOTICE_LEASE_SECONDS have passed. Taken, it is no longer
        ``disable_notice_due``: publishers from before migration 0007, on the same database
        during a rolling upgrade, read only that flag and would send it a second time.
        """
        now = self._now()
        take = (
            subscribers.update()
            .where(subscribers.c.id == subscriber_id, _disable_notice_free(now))
            .values(disable_notice_due=False, disable_notice_taken_at=now)
        )
        taken = await self._run(lambda conn: conn.execute(take).rowcount)
        return now if taken else None

    async def done_disable_notice(self, subscriber_id: str, taken_at: float) -> None:
        """The notice taken at ``taken_at`` was sent (or had nobody to go to)."""
        await self._end_disable_notice(subscriber_id, taken_at, due=False)

    async def give_back_disable_notice(self, subscriber_id: str, taken_at: float) -> None:
        """After a failed send, so that the next round tries again."""
        await self._end_disable_notice(subscriber_id, taken_at, due=True)

    async def _end_disable_notice(self, subscriber_id: str, taken_at: float, *, due: bool) -> None:
        # Only the claim that was taken: a subscriber re-enabled and disabled again since
        # owes a notice of its own, which this one must not mark sent.
        end = (
            subscribers.update()
            .where(
                subscribers.c.id == subscriber_id,
                subscribers.c.disable_notice_taken_at == taken_at,
            )
            .values(disable_notice_due=due, disable_notice_taken_at=None)
        )
        await self._run(lambda conn: conn.execute(end))


# -- rows <-> records ------------------------------------------------------------------------


def _after_commit(hand_over: Callable[..., None], *args: Any) -> None:
    """Runs what follows an emit's commit, logging instead of raising.

    The events are written by then: an error here would tell the caller they
    were not, and a caller (or the group commit, which writes the submissions of
    a failed batch again one by one) would write them twice.
    """
    try:
        hand_over(*args)
    except Exception:
        logger.exception("handing over after an emit's commit failed")


# PostgreSQL: writes that decide from subscribers' states whether a delivery is pending or
# held (emits, Redeliver, Replay) take this lock shared, and changes of a subscriber's state
# take it exclusive, at the start of their transactions. Under READ COMMITTED an emit could
# otherwise read a subscriber as paused, a resume commit (releasing what was held), and the
# emit then insert a held delivery for an active subscriber, held until its next pause and
# resume; or the other way round, a pending one for a paused subscriber. Emits do not wait
# for each other. The key is "whaudien" in ASCII, used for nothing else.
AUDIENCE_LOCK_KEY = 0x7768_6175_6469_656E
_LOCK_AUDIENCE_SHARED = sa.select(sa.func.pg_advisory_xact_lock_shared(AUDIENCE_LOCK_KEY))
_LOCK_AUDIENCE = sa.select(sa.func.pg_advisory_xact_lock(AUDIENCE_LOCK_KEY))


# PostgreSQL: emits number their events (events.seq) one transaction at a time, holding this
# lock from their insert to their commit. The catch-up feed pages by seq, so numbers must
# become visible in order: if a transaction that drew seq 5 committed after one that drew
# seq 6 and a reader had moved its cursor to 6 between the two, it would never see 5. The
# lock is held only for the inserts and the commit, and group commit puts many events in
# each transaction. The key is "whfeedsq" in ASCII.
FEED_LOCK_KEY = 0x7768_6665_6564_7371
_LOCK_FEED = sa.select(sa.func.pg_advisory_xact_lock(FEED_LOCK_KEY))


def _lock_feed(conn: Connection) -> None:
    """See FEED_LOCK_KEY; SQLite's transactions run one at a time and need no lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_FEED)


def _feed_stretch(
    subscriber_id: str, after_seq: int, limit: int, conn: Connection
) -> tuple[Sequence[Any], int, bool]:
    """One page of the feed from the FEED_STRETCH seq values after ``after_seq``: its rows,
    the cursor after it, and whether that cursor is at the newest event.

    The cursor is the last listed event's seq when the page is full, otherwise the end
    of the stretch looked at. The newest seq is read in the same snapshot, so the cursor
    never passes an event this snapshot cannot see, and none newer could appear below it
    later: on SQLite writes run one at a time and a new rowid is one past the highest
    (retention keeps the newest event); on PostgreSQL an emit holds FEED_LOCK_KEY from
    drawing its seqs to its commit, so a seq below the newest visible one belongs to a
    transaction that had ended before that one drew its seq, hence before this snapshot
    was taken: it is visible here, or it rolled back.
    """
    _load_subscriber(conn, subscriber_id)
    first, newest = conn.execute(_feed_bounds(after_seq)).one()
    if first is None or newest is None:
        return [], after_seq, True
    end = min(first + FEED_STRETCH - 1, newest)
    seqs: list[int] = []
    total = 0
    full = False
    for seq, size in conn.execute(_feed_sizes(conn, subscriber_id, after_seq, end, limit)):
        total += size
        if seqs and total > FEED_PAGE_BYTES:
            full = True
            break
        seqs.append(seq)
    if len(seqs) == limit:
        full = True
    # A full page may have stopped before the end of the stretch: go on after it.
    cursor = seqs[-1] if full else end
    if not seqs:
        return [], cursor, cursor == newest
    # By their keys: the subscriber's deliveries are not read a second time.
    page = events.select().where(events.c.seq.in_(seqs)).order_by(events.c.seq)
    return conn.execute(page).all(), cursor, cursor == newest


def _feed_bounds(after_seq: int) -> sa.Select[int | None, int | None]:
    """The first seq after ``after_seq`` and the newest seq (both through events' key)."""
    first = sa.select(sa.func.min(events.c.seq)).where(events.c.seq > after_seq)
    newest = sa.select(sa.func.max(events.c.seq))
    return sa.select(first.scalar_subquery(), newest.scalar_subquery())


def _feed_sizes(
    conn: Connection, subscriber_id: str, after_seq: int, end: int, limit: int
) -> sa.Select[int, int]:
    """The seqs and payload sizes of ``subscriber_id``'s events in (after_seq, end].

    Events are walked by their key and each is checked through ix_deliveries_event, so
    the cost is that of the stretch, whatever the subscriber's history. SQLite's
    planner would rather check them through ix_deliveries_subscriber_due (its
    subscriber_id prefix), which reads every delivery the subscriber has for each
    event: SQLite's unary + on the column keeps that index out of it. PostgreSQL
    weighs both ways with its statistics and reads the subscriber's deliveries only
    when they are few.
    """
    subscriber: sa.ColumnElement[str] = deliveries.c.subscriber_id
    if conn.dialect.name == "sqlite":
        subscriber = sa.UnaryExpression(subscriber, operator=sa.sql.operators.custom_op("+"))
    has_delivery = sa.exists().where(
        deliveries.c.event_id == events.c.id, subscriber == subscriber_id
    )
    # Sizes without the payloads: both databases keep a value's length.
    return (
        sa.select(events.c.seq, sa.func.length(events.c.payload))
        .where(events.c.seq > after_seq, events.c.seq <= end, has_delivery)
        .order_by(events.c.seq)
        .limit(limit)
    )


def _lock_audience(conn: Connection, *, exclusive: bool) -> None:
    """See AUDIENCE_LOCK_KEY; SQLite's transactions run one at a time and need no lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_AUDIENCE if exclusive else _LOCK_AUDIENCE_SHARED)


def _due_again(now: float) -> sa.ColumnElement[float]:
    """When a delivery whose lease is given back comes due: now, or for a sweeper's lease
    at the time it was scheduled for (which claim_doubtful left in place if later)."""
    return sa.case(
        (deliveries.c.lease_owner.startswith(SWEEP_PREFIX), deliveries.c.next_attempt_at),
        else_=now,
    )


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _with_details(conn: Connection, leased: Sequence[Any]) -> list[model.Claim]:
    """Claims for leased rows, with their events, and their few subscribers read once each."""
    if not leased:
        return []
    details = conn.execute(statements.CLAIM_DETAILS, {"b_ids": [row.id for row in leased]})
    by_id = {row.delivery_id: row for row in details}
    audience = _subscribers_by_id(conn, {row.subscriber_id for row in by_id.values()})
    claims = []
    for row in leased:
        detail = by_id[row.id]
        claims.append(
            model.Claim(
                delivery_id=row.id,
                attempt=row.attempts,
                attempts_in_round=row.round_attempts,
                round_started_at=row.round_started_at,
                last_outcome=row.last_outcome,
                event=_event(detail._mapping),
                subscriber=audience[detail.subscriber_id],
            )
        )
    return claims


def _lease_due(
    conn: Connection, params: dict[str, Any], grant: Grant
) -> tuple[list[model.Claim], frozenset[str]]:
    """Leases the oldest due deliveries that ``grant`` has room for; and the subscribers
    whose due deliveries it turned away for want of room.

    Those turned away are skipped, not waited for: the oldest due deliveries of
    every other active subscriber are taken in their place, so that one full
    subscriber's backlog does not hold up the rest.
    """
    lease = {key: params[key] for key in ("b_now", "b_owner", "b_lease_until")}
    taken: list[Sequence[Any]] = []
    turned_away: set[str] = set()
    due = statements.DUE_WITH_EVENTS.rows(conn, params)
    try:
        _take(due, grant, taken, turned_away, stop_when_turned_away=True)
    finally:
        due.close()
    _lease(conn, [row[0] for row in taken], lease)
    if turned_away and grant.taken < grant.total:
        # Leased above, the taken ones are no longer due and are not found again here.
        skip = _skipped(grant, turned_away)
        per, limit = grant.per_subscriber or grant.total, grant.total - grant.taken
        more: Iterable[Sequence[Any]]
        if conn.dialect.name == "sqlite":
            # On the driver's cursor, as the other claim statements (see statements.Prepared).
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            values = (json.dumps(skip), params["b_now"], per, limit)
            more = cursor.execute(statements.DUE_BY_SUBSCRIBER_SQLITE, values)
        else:
            more = conn.execute(
                statements.DUE_BY_SUBSCRIBER_POSTGRES,
                {"b_now": params["b_now"], "b_per": per, "b_skip": skip, "b_limit": limit},
            ).all()
        also: list[Sequence[Any]] = []
        _take(more, grant, also, turned_away, stop_when_turned_away=False)
        _lease(conn, [row[0] for row in also], lease)
        taken += also
    if not taken:
        return [], frozenset(turned_away)
    audience = _subscribers_by_id(conn, {row[5] for row in taken})
    now = params["b_now"]
    # The numbers as LEASE_ONE just wrote them, from the values read before it.
    claims = [
        model.Claim(
            delivery_id=delivery_id,
            attempt=attempts + 1,
            attempts_in_round=round_attempts + 1,
            round_started_at=now if round_started_at is None else round_started_at,
            last_outcome=last_outcome,
            event=model.Event(*event),
            subscriber=audience[subscriber_id],
        )
        for (
            delivery_id,
            attempts,
            round_attempts,
            round_started_at,
            last_outcome,
            subscriber_id,
            _,
            *event,
        ) in taken
    ]
    return claims, frozenset(turned_away)


# The states of a delivery still owed: due or waiting for a retry, or held while its
# subscriber is not active.
_UNSETTLED = (model.DeliveryState.PENDING.value, model.DeliveryState.HELD.value)
# The states a delivery ends in; an event whose deliveries are all in them is owed nothing.
_SETTLED = (model.DeliveryState.DELIVERED.value, model.DeliveryState.FAILED.value)

# Deliveries (with their attempts) one prune deletes at most on SQLite, unless one event has
# more. There the prune holds the only write lock, and emits wait behind it: 500 events sent
# to 1,000 subscribers each held it for 5.6-6.4 s here; one of them takes about 40 ms, and
# 500 deliveries of events sent to 100 subscribers about 11 ms.
PRUNE_DELIVERIES = 500

# PostgreSQL: one replica prunes at a time. The lock is the transaction's, so a replica
# that dies mid-prune leaves nothing held. The key is "whprune" in ASCII, a number no other
# lock of this database uses.
PRUNE_LOCK_KEY = 0x7768_7072_756E_6500
_TAKE_PRUNE_TURN = sa.select(sa.func.pg_try_advisory_xact_lock(PRUNE_LOCK_KEY))


def _kept(before: float) -> sa.ColumnElement[bool]:
    """A delivery that keeps its event: still owed, or settled at or after ``before``.

    Retention counts from when a delivery settled, not from its event: one
    dead-lettered today, of an event emitted long ago (the subscriber was paused, or
    it was replayed), is still to be told of in a digest and to be redelivered.
    """
    return sa.or_(deliveries.c.state.not_in(_SETTLED), deliveries.c.updated_at >= before)


def expired_events(before: float, limit: int) -> sa.Select[str, int]:
    """The ids of up to ``limit`` events created before ``before`` that nobody is owed,
    whose deliveries all settled before then, oldest first, and how many deliveries each
    has."""
    owed = (
        sa.select(deliveries.c.id)
        .where(deliveries.c.event_id == events.c.id, _kept(before))
        .exists()
    )
    # The newest event stays, however old: SQLite numbers a new row one past the highest
    # it has, so deleting the highest would hand its seq out again, and a subscriber whose
    # catch-up cursor is past it would never see the events numbered so.
    newest = sa.select(sa.func.max(events.c.seq)).scalar_subquery()
    # Oldest first through ix_events_created: the scan reads only what expired.
    their_deliveries = (
        sa.select(sa.func.count()).where(deliveries.c.event_id == events.c.id).scalar_subquery()
    )
    return (
        sa.select(events.c.id, their_deliveries)
        .where(events.c.created_at < before, events.c.seq < newest, ~owed)
        .order_by(events.c.created_at)
        .limit(limit)
    )


def _lease(conn: Connection, ids: list[str], lease: dict[str, Any]) -> None:
    """Leases the deliveries ``ids`` as ``lease`` (b_now, b_owner, b_lease_until) says."""
    if not ids:
        return
    if conn.dialect.name != "sqlite":
        statements.LEASE_ONE.execute(conn, [{"b_id": id_, **lease} for id_ in ids])
        return
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    now = lease["b_now"]
    values = (now, lease["b_owner"], lease["b_lease_until"], now, json.dumps(ids))
    cursor.execute(statements.LEASE_MANY_SQLITE, values)


def _skipped(grant: Grant, turned_away: Iterable[str]) -> list[str]:
    """The subscribers a claim looks past: full before it, or turned away by it."""
    return sorted(grant.full.union(turned_away))


def _take(
    rows: Iterable[Sequence[Any]],
    grant: Grant,
    taken: list[Sequence[Any]],
    turned_away: set[str],
    *,
    stop_when_turned_away: bool,
) -> None:
    """Adds the due ``rows`` that ``grant`` has room for to ``taken``, in order; the
    subscribers of those it has no room for go to ``turned_away``.

    The oldest-first claim stops at the first row it turns away: reading on would
    read what a full subscriber's backlog may fill, and the query by subscriber,
    which skips it, finds the others' rows past that point.
    """
    for row in rows:
        if grant.taken >= grant.total:
            return
        # The subscriber's id and own limit, and the payload (statements.DUE_WITH_EVENTS).
        if grant.take(row[5], row[6], len(row[9])):
            taken.append(row)
            continue
        turned_away.add(row[5])
        if stop_when_turned_away:
            return


def _subscribers_by_id(conn: Connection, ids: set[str]) -> dict[str, model.Subscriber]:
    rows = conn.execute(statements.SUBSCRIBERS_BY_ID, {"b_ids": list(ids)})
    return {row.id: _subscriber(row._mapping) for row in rows}


# How long a disable notice taken by a replica stays its own. A send is bounded by the
# mailer's timeouts (each SMTP step 10 s by default: well under two minutes in all), so a
# notice taken this long ago and still due belongs to a replica that stopped or died.
DISABLE_NOTICE_LEASE_SECONDS = 600.0


def _disable_notice_free(now: float) -> sa.ColumnElement[bool]:
    """A disable notice is owed and no replica is sending it: due and not taken, or taken
    (no longer due, see ``take_disable_notice``) by a replica whose lease ran out."""
    return sa.or_(
        sa.and_(
            subscribers.c.disable_notice_due.is_(True),
            subscribers.c.disable_notice_taken_at.is_(None),
        ),
        sa.and_(
            subscribers.c.disable_notice_taken_at <= now - DISABLE_NOTICE_LEASE_SECONDS,
            # Re-enabled since by a publisher from before 0007, which leaves taken_at as it was.
            subscribers.c.state == model.SubscriberState.DISABLED.value,
        ),
    )


def _notice_window_open(now: float, window: float) -> sa.ColumnElement[bool]:
    """The subscriber has not been emailed within the last ``window`` seconds."""
    return sa.or_(
        subscribers.c.last_notified_at.is_(None),
        subscribers.c.last_notified_at <= now - window,
    )


def _outcome_params(outcome: AttemptRecord, now: float) -> dict[str, Any]:
    """LOG_ATTEMPT's and SETTLE's values for ``outcome``."""
    return {
        "b_delivery_id": outcome.delivery_id,
        "b_attempt": outcome.attempt,
        "b_owner": outcome.owner,
        "b_started_at": outcome.started_at,
        "b_duration": outcome.duration,
        "b_outcome": outcome.outcome,
        "b_status_code": outcome.status_code,
        "b_error": outcome.error,
        "b_state": outcome.new_state.value,
        "b_next": outcome.next_attempt_at,
        "b_now": now,
    }


def _health(batch: Sequence[AttemptRecord]) -> tuple[set[str], set[str]]:
    """Subscribers that just succeeded, and those that only failed, in this batch."""
    healthy = {r.subscriber_id for r in batch if r.new_state == model.DeliveryState.DELIVERED}
    failing = {r.subscriber_id for r in batch} - healthy
    return healthy, failing


def _new_delivery(event_id: str, subscriber_id: str, active: bool, now: float) -> dict[str, Any]:
    state = model.DeliveryState.PENDING if active else model.DeliveryState.HELD
    return {
        "id": new_id("dlv"),
        "event_id": event_id,
        "subscriber_id": subscriber_id,
        "state": state.value,
        "attempts": 0,
        "round_attempts": 0,
        "round_started_at": None,
        "next_attempt_at": now,
        "lease_owner": None,
        "created_at": now,
        "updated_at": now,
        "last_error": "",
        "last_outcome": "",
        "notified_at": None,
    }


def _lease_new(
    row: dict[str, Any],
    event: model.NewEvent,
    subscriber: model.Subscriber,
    taker: Taker,
    now: float,
) -> model.Claim:
    """Turns a new delivery row into the taker's first attempt, leased as a claim would."""
    row.update(
        attempts=1,
        round_attempts=1,
        round_started_at=now,
        lease_owner=taker.owner,
        next_attempt_at=now + taker.lease_seconds,
    )
    return model.Claim(
        delivery_id=row["id"],
        attempt=1,
        attempts_in_round=1,
        round_started_at=now,
        last_outcome="",
        event=model.Event(
            id=row["event_id"],
            type=event.type,
            payload=event.payload,
            content_type=event.content_type,
            created_at=now,
        ),
        subscriber=subscriber,
    )


def deliveries_listed(
    where: model.DeliveryFilter, limit: int, after_id: str
) -> sa.Select[tuple[Any, ...]]:
    """ListDeliveries' page: ``limit`` deliveries after ``after_id`` that pass ``where``."""
    query = deliveries.select().where(deliveries.c.id > after_id)
    if where.event_id:
        query = query.where(deliveries.c.event_id == where.event_id)
    if where.subscriber_id:
        query = query.where(deliveries.c.subscriber_id == where.subscriber_id)
    if where.state == model.DeliveryState.FAILED:
        # Inline and as an equality, so that the dead letters come from their own index:
        # SQLite does not see that state IN ('failed') implies the index's state = 'failed'.
        query = query.where(statements.IS_FAILED)
    elif where.state is not None:
        query = query.where(deliveries.c.state.in_(_stored_states(where.state)))
    return query.order_by(deliveries.c.id).limit(limit)


def _stored_states(state: model.DeliveryState) -> list[str]:
    if state == model.DeliveryState.PENDING:
        return list(_UNSETTLED)
    return [state.value]


def _known_keys(conn: Connection, keys: set[str]) -> dict[str, model.EmitResult]:
    rows = conn.execute(
        sa.select(
            events.c.idempotency_key,
            events.c.id,
            sa.select(sa.func.count())
            .where(deliveries.c.event_id == events.c.id)
            .scalar_subquery()
            .label("delivery_count"),
        ).where(events.c.idempotency_key.in_(keys))
    )
    return {
        row.idempotency_key: model.EmitResult(row.id, row.delivery_count, duplicate=True)
        for row in rows
    }


def _set_hold(
    conn: Connection, subscriber_id: str, *, hold: bool, now: float | None = None
) -> None:
    """Holds a subscriber's pending deliveries, or lets them go (due at ``now``).

    Released deliveries are due at once, whatever retry they were waiting for:
    the subscriber is back. One still leased keeps its lease.
    """
    owned = deliveries.c.subscriber_id == subscriber_id
    if hold:
        conn.execute(
            deliveries.update()
            .where(owned, deliveries.c.state == model.DeliveryState.PENDING.value)
            .values(state=model.DeliveryState.HELD.value)
        )
        return
    conn.execute(
        deliveries.update()
        .where(owned, deliveries.c.state == model.DeliveryState.HELD.value)
        .values(
            state=model.DeliveryState.PENDING.value,
            next_attempt_at=sa.case(
                (deliveries.c.lease_owner.is_(None), now), else_=deliveries.c.next_attempt_at
            ),
        )
    )


def _disable(conn: Connection, subscriber_id: str, reason: str, now: float) -> bool:
    """Disables an active subscriber, owing its people a notice; False if it was not active
    (another replica disabled it first and owes the notice, or one was already sent)."""
    _lock_audience(conn, exclusive=True)
    result = conn.execute(
        subscribers.update()
        .where(
            subscribers.c.id == subscriber_id,
            subscribers.c.state == model.SubscriberState.ACTIVE.value,
        )
        .values(
            state=model.SubscriberState.DISABLED.value,
            state_reason=reason,
            updated_at=now,
            disable_notice_due=True,
            # A notice of an earlier disabling still being sent is not this one.
            disable_notice_taken_at=None,
        )
    )
    if not result.rowcount:
        return False
    _set_hold(conn, subscriber_id, hold=True)
    return True


def _load_subscriber(
    conn: Connection, subscriber_id: str, *, for_update: bool = False
) -> model.Subscriber:
    query = subscribers.select().where(subscribers.c.id == subscriber_id)
    if for_update:
        # PostgreSQL: a concurrent change commits first and is read here, not overwritten.
        # SQLite's transactions take the write lock up front, so this changes nothing there.
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise errors.NotFound(f"subscriber_id: no subscriber {subscriber_id!r}")
    return _subscriber(row._mapping)


def _load_delivery(conn: Connection, delivery_id: str) -> model.Delivery:
    row = conn.execute(deliveries.select().where(deliveries.c.id == delivery_id)).first()
    if row is None:
        raise errors.NotFound(f"delivery_id: no delivery {delivery_id!r}")
    logs = conn.execute(
        attempts.select()
        .where(attempts.c.delivery_id == delivery_id)
        .order_by(attempts.c.number, attempts.c.id)
    )
    return _delivery(row._mapping, tuple(_attempt(log._mapping) for log in logs))


def _subscribers(conn: Connection, query: sa.Select[Any]) -> list[model.Subscriber]:
    return [_subscriber(row._mapping) for row in conn.execute(query)]


def _subscriber_row(subscriber: model.Subscriber) -> dict[str, Any]:
    spec = subscriber.spec
    return {
        "id": subscriber.id,
        "name": spec.name,
        "endpoint": spec.endpoint,
        "protocol": spec.protocol.value,
        "event_types": json.dumps(list(spec.event_types)),
        "retry_schedule": json.dumps(list(spec.retry_schedule)),
        "contact_email": spec.contact_email,
        "secret": subscriber.secret,
        "body_format": spec.body_format.value,
        "status_url": spec.status_url,
        "max_in_flight": spec.max_in_flight,
        "state": subscriber.state.value,
        "state_reason": subscriber.state_reason,
        "created_at": subscriber.created_at,
        "updated_at": subscriber.updated_at,
        "failing_since": subscriber.failing_since,
        "previous_secret": subscriber.previous_secret or None,
        "previous_secret_expires_at": subscriber.previous_secret_expires_at,
    }


def _subscriber(row: Any) -> model.Subscriber:
    return model.Subscriber(
        id=row["id"],
        spec=model.SubscriberSpec(
            name=row["name"],
            endpoint=row["endpoint"],
            protocol=model.Protocol(row["protocol"]),
            event_types=tuple(json.loads(row["event_types"])),
            retry_schedule=tuple(json.loads(row["retry_schedule"])),
            contact_email=row["contact_email"],
            body_format=model.BodyFormat(row["body_format"]),
            status_url=row["status_url"],
            max_in_flight=row["max_in_flight"],
        ),
        secret=row["secret"],
        state=model.SubscriberState(row["state"]),
        state_reason=row["state_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        failing_since=row["failing_since"],
        previous_secret=row["previous_secret"] or "",
        previous_secret_expires_at=row["previous_secret_expires_at"],
    )


def _event(row: Any) -> model.Event:
    return model.Event(
        id=row["id"],
        type=row["type"],
        payload=bytes(row["payload"]),
        content_type=row["content_type"],
        created_at=row["created_at"],
    )


def _delivery(row: Any, log: tuple[model.AttemptLog, ...]) -> model.Delivery:
    state = model.DeliveryState(row["state"])
    return model.Delivery(
        id=row["id"],
        event_id=row["event_id"],
        subscriber_id=row["subscriber_id"],
        state=state,
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"] if state == model.DeliveryState.PENDING else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_error=row["last_error"],
        log=log,
    )


def _attempt(row: Any) -> model.AttemptLog:
    return model.AttemptLog(
        number=row["number"],
        started_at=row["started_at"],
        duration=row["duration"],
        outcome=row["outcome"],
        status_code=row["status_code"],
        error=row["error"],
    )
