"""The idempotent store: each event id is recorded once, however often it is delivered.

Writes go through group commit: one writer commits whatever has piled up in one
transaction, since a transaction per event caps at a few hundred events per
second on this stack while batches reach thousands. A caller of ``record`` or
``mark`` resumes only after its batch has committed, so an answer it gives
afterwards is backed by the disk.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common import errors, group_commit, log, signing
from common.gen.webhooks.v1 import event_pb2

logger = logging.getLogger(__name__)

# Large enough to amortise a commit, small enough to keep a batch's parameters
# under the bound-parameter limits of SQLite and asyncpg.
BATCH_SIZE = 500
# The width of the text columns (PostgreSQL enforces it, SQLite does not).
MAX_TEXT_LENGTH = 255


class State(enum.StrEnum):
    RECEIVED = "received"
    PROCESSED = "processed"
    FAILED = "failed"


metadata = sa.MetaData()

table = sa.Table(
    "inbox",
    metadata,
    sa.Column("event_id", sa.String(MAX_TEXT_LENGTH), primary_key=True),
    sa.Column("event_type", sa.String(MAX_TEXT_LENGTH), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.String(MAX_TEXT_LENGTH), nullable=False),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    # None when the delivery did not say when the event happened (HTTP).
    sa.Column("created_at", sa.Double, nullable=True),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    # Deliveries of this event so far; every one after the first was absorbed as a duplicate.
    sa.Column("receive_count", sa.Integer, nullable=False),
    sa.Column("last_delivery_id", sa.String(MAX_TEXT_LENGTH), nullable=False),
    sa.Column("last_attempt", sa.Integer, nullable=False),
)

# A literal, not a bound parameter: SQLite uses a partial index only for a query whose
# WHERE repeats the index's own constant.
_RECEIVED = table.c.state == sa.literal_column(f"'{State.RECEIVED.value}'")
# Events recorded but not yet handled, oldest first: the few a restart must still handle.
# Partial, so that it stays as small as that and finding them never scans the payloads.
_unhandled_index = sa.Index(
    "inbox_unhandled",
    table.c.received_at,
    table.c.event_id,
    sqlite_where=_RECEIVED,
    postgresql_where=_RECEIVED,
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One delivery of one event, as a receiver hands it to the inbox."""

    event_id: str
    event_type: str
    payload: bytes
    content_type: str
    created_at: float | None
    delivery_id: str
    attempt: int


def entry_of(event: event_pb2.Event, *, delivery_id: str = "", attempt: int = 0) -> Entry:
    """The entry for an event received over gRPC, pushed (with its delivery) or pulled."""
    return Entry(
        event_id=event.id,
        event_type=event.type,
        payload=event.payload,
        content_type=event.content_type,
        created_at=(
            event.created_at.ToNanoseconds() / 1e9 if event.HasField("created_at") else None
        ),
        delivery_id=delivery_id,
        attempt=attempt,
    )


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the inbox knows of a recorded event."""

    state: State
    received_at: float
    receive_count: int


class Conflict(errors.AlreadyExists):
    """An event with this id was recorded with a different body."""


@dataclass(frozen=True, slots=True)
class _Record:
    entry: Entry
    body_sha256: str


@dataclass(frozen=True, slots=True)
class _Mark:
    event_id: str
    state: State


# What the writer answers a record (new or not, or the conflict) and a mark.
_Outcome = bool | Conflict | None


class Inbox:
    """Records events once and answers what it knows of them."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_size: int = BATCH_SIZE,
        clock: Callable[[], float] = log.now,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._writer: group_commit.GroupCommit[_Record | _Mark, _Outcome] = (
            group_commit.GroupCommit(self._write, batch_size)
        )
        self._insert_new = _insert_ignoring_known(engine.dialect.name)
        self._open = False

    async def start(self) -> None:
        """Creates the table if needed; the inbox then takes writes."""
        async with self._engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            # create_all adds no index to a table that exists already.
            await connection.run_sync(_unhandled_index.create, checkfirst=True)
        self._open = True

    async def stop(self) -> None:
        """Refuses new writes and waits for the queued ones to commit."""
        self._open = False
        await self._writer.close()

    async def record(self, entry: Entry) -> bool:
        """True if the event is new; False for a redelivery, which only bumps its receive_count.

        Raises Conflict if the event id is known with a different body, and
        InvalidArgument if a text field cannot be stored.
        """
        _check_storable(entry)
        [outcome] = await self._submit(_Record(entry, signing.body_sha256(entry.payload)))
        if isinstance(outcome, Conflict):
            raise outcome
        return bool(outcome)

    async def mark(self, event_id: str, state: State) -> None:
        await self._submit(_Mark(event_id, state))

    async def status(self, event_id: str) -> Receipt | None:
        """The event's receipt, or None if it was never recorded."""
        if "\x00" in event_id:
            # Never recorded (record refuses it), and PostgreSQL would fail the query.
            return None
        query = sa.select(table.c.state, table.c.received_at, table.c.receive_count).where(
            table.c.event_id == event_id
        )
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).one_or_none()
        if row is None:
            return None
        return Receipt(State(row.state), row.received_at, row.receive_count)

    async def unhandled(self) -> list[str]:
        """Ids of the events recorded but never marked handled, in the order they were recorded."""
        query = (
            sa.select(table.c.event_id)
            .where(_RECEIVED)
            .order_by(table.c.received_at, table.c.event_id)
        )
        async with self._engine.connect() as connection:
            return list((await connection.execute(query)).scalars())

    async def unhandled_entry(self, event_id: str) -> Entry | None:
        """The event as last delivered, if it is still waiting for its handler."""
        query = sa.select(table).where(table.c.event_id == event_id, _RECEIVED)
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).one_or_none()
        if row is None:
            return None
        return Entry(
            event_id=row.event_id,
            event_type=row.event_type,
            payload=row.payload,
            content_type=row.content_type,
            created_at=row.created_at,
            delivery_id=row.last_delivery_id,
            attempt=row.last_attempt,
        )

    async def count(self) -> int:
        """Events recorded, which is the number of effects."""
        return await self._scalar(sa.select(sa.func.count()).select_from(table))

    async def duplicates(self) -> int:
        """Deliveries absorbed because their event was recorded already."""
        absorbed = sa.func.coalesce(sa.func.sum(table.c.receive_count - 1), 0)
        return await self._scalar(sa.select(absorbed))

    async def _scalar(self, query: sa.Select[Any]) -> int:
        async with self._engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    async def _submit(self, op: _Record | _Mark) -> list[_Outcome]:
        if not self._open:
            raise errors.FailedPrecondition("the inbox is not taking writes")
        return await self._writer.submit([op])

    async def _write(self, ops: list[_Record | _Mark]) -> list[_Outcome]:
        """One transaction per batch; a mark comes after its record's batch has committed."""
        records = [op for op in ops if isinstance(op, _Record)]
        marks = [op for op in ops if isinstance(op, _Mark)]
        try:
            async with self._engine.begin() as connection:
                recorded = iter(await self._write_records(connection, records) if records else [])
                if marks:
                    await connection.execute(
                        sa.update(table)
                        .where(table.c.event_id == sa.bindparam("b_event_id"))
                        .values(state=sa.bindparam("b_state")),
                        [{"b_event_id": op.event_id, "b_state": op.state.value} for op in marks],
                    )
        except Exception as error:
            # Every caller of the batch gets the error and its delivery is retried;
            # the operator needs the cause once, not once per caller.
            log.event(logger, "inbox_write_failed", logging.ERROR, ops=len(ops), error=repr(error))
            raise
        return [next(recorded) if isinstance(op, _Record) else None for op in ops]

    async def _write_records(
        self, connection: AsyncConnection, records: Sequence[_Record]
    ) -> list[bool | Conflict]:
        """Inserts first deliveries and counts redeliveries; one outcome per record, in order."""
        now = self._clock()
        first: dict[str, _Record] = {}
        for record in records:
            first.setdefault(record.entry.event_id, record)
        # ON CONFLICT DO NOTHING instead of read-then-insert, so that another
        # process writing the same event id at the same time cannot fail the batch.
        inserted = set(
            (
                await connection.execute(
                    self._insert_new, [_row(record, now) for record in first.values()]
                )
            ).scalars()
        )
        known = {event_id: first[event_id].body_sha256 for event_id in inserted}
        recorded_before = [event_id for event_id in first if event_id not in inserted]
        if recorded_before:
            rows = await connection.execute(
                sa.select(table.c.event_id, table.c.body_sha256).where(
                    table.c.event_id.in_(recorded_before)
                )
            )
            known.update((row.event_id, row.body_sha256) for row in rows)

        outcomes: list[bool | Conflict] = []
        claimed: set[str] = set()
        redeliveries: dict[str, dict[str, Any]] = {}
        for record in records:
            event_id = record.entry.event_id
            if event_id in inserted and event_id not in claimed:
                claimed.add(event_id)
                outcomes.append(True)
            elif known[event_id] != record.body_sha256:
                outcomes.append(Conflict(f"event {event_id!r} was recorded with a different body"))
            else:
                bump = redeliveries.setdefault(event_id, {"b_event_id": event_id, "b_count": 0})
                bump["b_count"] += 1
                bump["b_delivery_id"] = record.entry.delivery_id
                bump["b_attempt"] = record.entry.attempt
                outcomes.append(False)
        if redeliveries:
            await connection.execute(
                sa.update(table)
                .where(table.c.event_id == sa.bindparam("b_event_id"))
                .values(
                    receive_count=table.c.receive_count + sa.bindparam("b_count"),
                    last_delivery_id=sa.bindparam("b_delivery_id"),
                    last_attempt=sa.bindparam("b_attempt"),
                ),
                list(redeliveries.values()),
            )
        return outcomes


def _check_storable(entry: Entry) -> None:
    """Refuses what the database would refuse, before it can fail a whole batch of other callers."""
    for name, value in (
        ("event_id", entry.event_id),
        ("event_type", entry.event_type),
        ("content_type", entry.content_type),
        ("delivery_id", entry.delivery_id),
    ):
        if len(value) > MAX_TEXT_LENGTH:
            raise errors.InvalidArgument(name, f"longer than {MAX_TEXT_LENGTH} characters")
        try:
            value.encode()
        except UnicodeEncodeError:
            # HTTP headers with undecodable bytes arrive as lone surrogates.
            raise errors.InvalidArgument(name, "is not valid UTF-8") from None
        if "\x00" in value:
            # PostgreSQL text cannot hold NUL: the insert would fail the whole batch.
            raise errors.InvalidArgument(name, "contains a NUL character")


def _row(record: _Record, now: float) -> dict[str, Any]:
    entry = record.entry
    return {
        "event_id": entry.event_id,
        "event_type": entry.event_type,
        "payload": entry.payload,
        "content_type": entry.content_type,
        "body_sha256": record.body_sha256,
        "created_at": entry.created_at,
        "received_at": now,
        "state": State.RECEIVED.value,
        "receive_count": 1,
        "last_delivery_id": entry.delivery_id,
        "last_attempt": entry.attempt,
    }


def _insert_ignoring_known(dialect: str) -> sa.Executable:
    """INSERT ... ON CONFLICT (event_id) DO NOTHING RETURNING event_id, in the dialect's words."""
    if dialect == "postgresql":
        return (
            postgresql.insert(table)
            .on_conflict_do_nothing(index_elements=[table.c.event_id])
            .returning(table.c.event_id)
        )
    if dialect == "sqlite":
        return (
            sqlite.insert(table)
            .on_conflict_do_nothing(index_elements=[table.c.event_id])
            .returning(table.c.event_id)
        )
    raise errors.InvalidArgument("database_url", f"unsupported database {dialect!r}")
