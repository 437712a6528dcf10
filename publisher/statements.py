"""The SQL of the delivery hot path (emit, claim, record), built once with bound parameters.

Building a Core statement and its cache key costs about 40 µs of CPU, more than
SQLite takes to run a small one; at low load every emit, claim and record is a
transaction of its own, so the store executes these and never rebuilds them.
Per-call values are bound parameters named ``b_*``. The emit, claim and record
statements are ``Prepared``: on SQLite they skip SQLAlchemy's execution layer.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from publisher import model
from publisher.schema import attempts, deliveries, events, subscribers

# Rows per INSERT statement on SQLite: few statements, and far below its limit of 32,766
# bound values (a delivery row has 14 columns).
ROWS_PER_INSERT = 100


class Prepared:
    """A statement of the hot path, run on SQLite by the driver's cursor itself.

    On SQLite a statement runs inside this process, and SQLAlchemy's execution
    layer (events, parameter and result processing) costs more than it: 49 µs
    of CPU for a one-row update in a transaction, 5 µs on the bare cursor,
    measured here. So the statement is compiled once and its values are passed
    in the driver's order. The columns these statements touch need no type
    processing on SQLite (text, numbers, bytes). On PostgreSQL the round trip
    outweighs that cost and Core's multi-row insert batching is worth having,
    so Core runs it there.
    """

    def __init__(self, statement: sa.Insert | sa.Update | sa.Select[Any]) -> None:
        self.statement = statement
        # Compiled for SQLite on first use, per set of keys given (an insert's columns):
        # the SQL, its parameters' names in order, and the values fixed in the statement.
        self._sqlite: dict[tuple[str, ...], tuple[str, list[str], dict[str, Any]]] = {}
        # A plain INSERT ... VALUES runs as one statement per ROWS_PER_INSERT rows, as
        # RowsOfValues; by the keys given.
        self._values = isinstance(statement, sa.Insert) and statement.select is None
        self._multi: dict[tuple[str, ...], RowsOfValues] = {}

    def _compiled(
        self, conn: Connection, keys: tuple[str, ...]
    ) -> tuple[str, list[str], dict[str, Any]]:
        found = self._sqlite.get(keys)
        if found is None:
            compiled = self.statement.compile(dialect=conn.dialect, column_keys=list(keys))
            assert compiled.positiontup is not None  # SQLite's parameters are positional.
            fixed = {
                name: bind.effective_value
                for name, bind in compiled.binds.items()
                if not bind.required
            }
            found = self._sqlite[keys] = (compiled.string, list(compiled.positiontup), fixed)
        return found

    def execute(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Runs the statement once per row (all rows with the same keys)."""
        if not rows:
            return
        if conn.dialect.name != "sqlite":
            conn.execute(self.statement, list(rows))
            return
        keys = tuple(rows[0])
        sql, order, fixed = self._compiled(conn, keys)
        # Values in the driver's order; itemgetter builds each tuple in C.
        in_order = operator.itemgetter(*order)
        if len(order) == 1:
            values: list[Any] = [(in_order(row),) for row in rows]
        elif fixed:
            values = [in_order(fixed | row) for row in rows]
        else:
            values = [in_order(row) for row in rows]
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if not self._values or len(rows) == 1:
            cursor.executemany(sql, values)
            return
        many = self._multi.get(keys)
        if many is None:
            # ``sql`` inserts one row of values: the same with {rows} in their place.
            head, _, row = sql.rpartition(" VALUES ")
            escaped = head.replace("{", "{{").replace("}", "}}")
            many = self._multi[keys] = RowsOfValues(f"{escaped} VALUES {{rows}}", row)
        many.execute(conn, values)

    def rows(self, conn: Connection, params: dict[str, Any]) -> Generator[Sequence[Any]]:
        """The rows of one run of a query, as tuples in the order of its columns.

        On SQLite each row is read when it is asked for, so a caller that stops early
        (and closes the generator) has not paid for the rest.
        """
        if conn.dialect.name != "sqlite":
            yield from conn.execute(self.statement, params).all()
            return
        sql, order, fixed = self._compiled(conn, tuple(params))
        values = fixed | params
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            yield from cursor.execute(sql, [values[n] for n in order])
        finally:
            cursor.close()

    def fetch(self, conn: Connection) -> list[Mapping[Any, Any]]:
        """The rows of a parameterless query, each as a mapping of column name to value."""
        if conn.dialect.name != "sqlite":
            return [row._mapping for row in conn.execute(self.statement)]
        sql, _, _ = self._compiled(conn, ())
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(sql)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class RowsOfValues:
    """SQLite SQL that takes its rows as a VALUES list, run once per ROWS_PER_INSERT rows.

    sqlite3 lets go of the interpreter lock for every statement it steps, and
    winning it back from a busy event loop costs the store's thread far more
    than the step: executemany steps a statement once per row (and resets it
    once more). Written as one statement over VALUES, LOG_ATTEMPT and SETTLE
    took the record transactions of an e2e_http run from 298-348 to 207-269 ms
    of CPU (6,000 events, three pairs). Prepared's plain inserts run through it
    too.

    ``sql`` holds ``{rows}`` where the VALUES rows go, each written as ``row``
    (``placeholders(n)`` for n values), and ``after`` are the statement's
    positional values that follow them.
    """

    def __init__(self, sql: str, row: str) -> None:
        self._sql = sql
        self._row = row
        # By number of rows: a batch's last chunk is shorter.
        self._by_count: dict[int, str] = {}

    def execute(
        self, conn: Connection, rows: Sequence[Sequence[Any]], after: Sequence[Any] = ()
    ) -> None:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[start : start + ROWS_PER_INSERT]
            cursor.execute(self._with(len(chunk)), [*itertools.chain.from_iterable(chunk), *after])

    def _with(self, count: int) -> str:
        found = self._by_count.get(count)
        if found is None:
            found = self._by_count[count] = self._sql.format(rows=", ".join([self._row] * count))
        return found


def placeholders(count: int) -> str:
    """One row of ``count`` positional values, for RowsOfValues."""
    return f"({', '.join(['?'] * count)})"


_PENDING = model.DeliveryState.PENDING.value
_HELD = model.DeliveryState.HELD.value
# Inline, not bound: PostgreSQL's generic plans and SQLite's planner can then see that the
# query implies the partial indexes' ``state = 'pending'``.
_IS_PENDING = deliveries.c.state == sa.literal_column(f"'{_PENDING}'")
# ix_deliveries_doubtful's rows (schema.DOUBTFUL), inline for the same reason.
_IS_DOUBTFUL = sa.and_(_IS_PENDING, deliveries.c.last_outcome == sa.literal_column("'uncertain'"))
# ix_deliveries_failed's rows (schema.FAILED): the dead letters.
IS_FAILED = deliveries.c.state == sa.literal_column(f"'{model.DeliveryState.FAILED.value}'")
# The reconciliation sweep's: unleased deliveries in doubt, soonest due first, with their
# scheduled time (b_limit of them).
DOUBTFUL = (
    sa.select(deliveries.c.id, deliveries.c.next_attempt_at)
    .where(_IS_DOUBTFUL, deliveries.c.lease_owner.is_(None))
    .order_by(deliveries.c.next_attempt_at)
    .limit(sa.bindparam("b_limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)


# -- emit -------------------------------------------------------------------------------------

# Everyone an event may go to: paused and disabled subscribers get their deliveries held.
AUDIENCE = Prepared(subscribers.select())
# Inline: nothing the database generates (events.seq) is read back.
INSERT_EVENTS = Prepared(events.insert().inline())
INSERT_DELIVERIES = Prepared(deliveries.insert().inline())

# -- claim ------------------------------------------------------------------------------------

# The event columns a claim carries, in model.Event's order.
_EVENT_COLUMNS = (
    events.c.id,
    events.c.type,
    events.c.payload,
    events.c.content_type,
    events.c.created_at,
)

# What a claim reads of each due delivery, before it leases it.
CLAIMED = (
    deliveries.c.id,
    deliveries.c.attempts,
    deliveries.c.round_attempts,
    deliveries.c.round_started_at,
    deliveries.c.last_outcome,
)

_B_NOW = sa.bindparam("b_now", type_=sa.Double)
_IS_DUE = (_IS_PENDING, deliveries.c.next_attempt_at <= _B_NOW)

# The claim, in two statements: the due deliveries with their events, then a lease on each
# of those the dispatcher has room for (publisher.slots), so that it can turn away a full
# subscriber's. Rows another replica has locked are skipped (SQLite needs no SKIP LOCKED:
# its transactions take the write lock before they read). On SQLite's cursor this costs
# half the CPU per claimed delivery of an UPDATE ... RETURNING and a details query through
# Core (30-38 against 65-73 µs here, claims of 128 among emits and records of 500).

# Whose each due delivery is, and that subscriber's own limit on sends in flight: a claim
# turns away what is over it (publisher.slots).
_WHOSE = (deliveries.c.subscriber_id, subscribers.c.max_in_flight)

# The oldest due deliveries (b_now, b_limit), through the partial index ``ix_deliveries_due``:
# its cost does not grow with the backlog.
DUE_WITH_EVENTS = Prepared(
    sa.select(*CLAIMED, *_WHOSE, *_EVENT_COLUMNS)
    .select_from(deliveries.join(events).join(subscribers))
    .where(*_IS_DUE)
    .order_by(deliveries.c.next_attempt_at)
    .limit(sa.bindparam("b_limit", type_=sa.Integer))
    .with_for_update(skip_locked=True, of=deliveries)
)

# The oldest due deliveries of each active subscriber but those skipped, at most b_per
# each, oldest first: what a claim takes when the oldest due ones belong to full
# subscribers. It probes ``ix_deliveries_subscriber_due`` once per active subscriber,
# however many due deliveries the skipped ones have, and runs only when a claim turned
# some away. Each database needs its own way to make the probe per subscriber; both return
# DUE_WITH_EVENTS's columns.
#
# The subscribers those queries probe: the active ones but those in b_skip (a list).
_ACTIVE_NOT_SKIPPED = (
    subscribers.c.state == model.SubscriberState.ACTIVE.value,
    subscribers.c.id.not_in(sa.bindparam("b_skip", expanding=True)),
)

# PostgreSQL: a LATERAL subquery per subscriber (b_now, b_per, b_skip a list, b_limit).
# Its planner assumes deliveries spread evenly over subscribers, so with two or three of
# them it would rather walk ix_deliveries_due in due order, past the full subscribers'
# backlog. Ordering by (next_attempt_at, id), which only ix_deliveries_subscriber_due
# gives without a sort, makes the probe per subscriber the cheap plan whatever the spread.
_due_of_each = (
    sa.select(
        *CLAIMED, deliveries.c.subscriber_id, deliveries.c.event_id, deliveries.c.next_attempt_at
    )
    .where(deliveries.c.subscriber_id == subscribers.c.id, *_IS_DUE)
    .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
    .limit(sa.bindparam("b_per", type_=sa.Integer))
    .with_for_update(skip_locked=True)
    .lateral("due")
)
DUE_BY_SUBSCRIBER_POSTGRES = (
    sa.select(
        *(_due_of_each.c[column.name] for column in CLAIMED),
        _due_of_each.c.subscriber_id,
        subscribers.c.max_in_flight,
        *_EVENT_COLUMNS,
    )
    .select_from(
        subscribers.join(_due_of_each, sa.true()).join(
            events, events.c.id == _due_of_each.c.event_id
        )
    )
    .where(*_ACTIVE_NOT_SKIPPED)
    .order_by(_due_of_each.c.next_attempt_at)
    .limit(sa.bindparam("b_limit", type_=sa.Integer))
)
# SQLite has no LATERAL. Its planner never reorders a CROSS JOIN, so this loops over the
# subscribers and looks up each one's due deliveries by id (b_skip a JSON array; the
# positional values are b_skip, b_now, b_per, b_limit). Plain SQL, as Core cannot write
# CROSS JOIN; the test of the claim's query plans checks it.
DUE_BY_SUBSCRIBER_SQLITE = f"""
SELECT d.id, d.attempts, d.round_attempts, d.round_started_at, d.last_outcome,
       d.subscriber_id, s.max_in_flight, e.id, e.type, e.payload, e.content_type, e.created_at
FROM subscribers AS s CROSS JOIN deliveries AS d CROSS JOIN events AS e
WHERE s.state = '{model.SubscriberState.ACTIVE.value}'
  AND s.id NOT IN (SELECT value FROM json_each(?))
  AND d.id IN (
    SELECT ahead.id FROM deliveries AS ahead
    WHERE ahead.subscriber_id = s.id AND ahead.state = '{_PENDING}' AND ahead.next_attempt_at <= ?
    ORDER BY ahead.next_attempt_at, ahead.id
    LIMIT ?
  )
  AND e.id = d.event_id
ORDER BY d.next_attempt_at
LIMIT ?
"""

# What a lease writes: b_owner holds the delivery b_id until b_lease_until, its attempt
# numbers bumped and its round started (b_now) if this is the round's first attempt.
LEASE_ONE = Prepared(
    deliveries.update()
    .where(deliveries.c.id == sa.bindparam("b_id", type_=sa.String))
    .values(
        attempts=deliveries.c.attempts + 1,
        round_attempts=deliveries.c.round_attempts + 1,
        round_started_at=sa.func.coalesce(deliveries.c.round_started_at, _B_NOW),
        lease_owner=sa.bindparam("b_owner", type_=sa.String),
        next_attempt_at=sa.bindparam("b_lease_until", type_=sa.Double),
        updated_at=_B_NOW,
    )
)

# LEASE_ONE for many deliveries in one statement, on SQLite's cursor: executemany would
# step it once per delivery, and see RowsOfValues for what each step costs there. The
# positional values are b_now, b_owner, b_lease_until, b_now and the ids as a JSON array.
LEASE_MANY_SQLITE = """
UPDATE deliveries SET attempts = attempts + 1, round_attempts = round_attempts + 1,
  round_started_at = coalesce(round_started_at, ?), lease_owner = ?, next_attempt_at = ?,
  updated_at = ?
WHERE id IN (SELECT value FROM json_each(?))
"""

EARLIEST_DUE = sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(_IS_PENDING)

# When the first pending delivery of an active subscriber but those in b_skip comes due:
# what a claim that turned some subscribers away waits for. A probe of
# ix_deliveries_subscriber_due per subscriber, ordered as DUE_BY_SUBSCRIBER_POSTGRES is.
_first_due_of_each = (
    sa.select(deliveries.c.next_attempt_at)
    .where(deliveries.c.subscriber_id == subscribers.c.id, _IS_PENDING)
    .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
    .limit(1)
    .correlate(subscribers)
    .scalar_subquery()
)
EARLIEST_DUE_SKIPPING = sa.select(sa.func.min(_first_due_of_each)).where(*_ACTIVE_NOT_SKIPPED)

# The events of the leased deliveries b_ids, and their subscribers' ids.
CLAIM_DETAILS = (
    sa.select(deliveries.c.id.label("delivery_id"), deliveries.c.subscriber_id, *events.c)
    .select_from(deliveries.join(events))
    .where(deliveries.c.id.in_(sa.bindparam("b_ids", expanding=True)))
)
SUBSCRIBERS_BY_ID = subscribers.select().where(
    subscribers.c.id.in_(sa.bindparam("b_ids", expanding=True))
)

# -- record -----------------------------------------------------------------------------------

# Each outcome is written only while its writer still holds the lease it was sent under:
# a replica whose lease ran out must not overwrite what the next holder records.
_STILL_LEASED = (
    deliveries.c.id == sa.bindparam("b_delivery_id", type_=sa.String),
    deliveries.c.attempts == sa.bindparam("b_attempt", type_=sa.Integer),
    deliveries.c.lease_owner == sa.bindparam("b_owner", type_=sa.String),
)

# PostgreSQL: the rows of the deliveries b_ids (a list) locked, in the order given.
LOCK_DELIVERIES = (
    sa.select(deliveries.c.id)
    .where(deliveries.c.id.in_(sa.bindparam("b_ids", expanding=True)))
    .order_by(deliveries.c.id)
    .with_for_update()
)

LOG_ATTEMPT = Prepared(
    attempts.insert().from_select(
        ["delivery_id", "number", "started_at", "duration", "outcome", "status_code", "error"],
        sa.select(
            sa.bindparam("b_delivery_id", type_=sa.String),
            sa.bindparam("b_attempt", type_=sa.Integer),
            sa.bindparam("b_started_at", type_=sa.Double),
            sa.bindparam("b_duration", type_=sa.Double),
            sa.bindparam("b_outcome", type_=sa.String),
            sa.bindparam("b_status_code", type_=sa.Integer),
            sa.bindparam("b_error", type_=sa.Text),
        ).where(sa.exists().where(*_STILL_LEASED)),
    )
)

SETTLE = Prepared(
    deliveries.update()
    .where(*_STILL_LEASED)
    .values(
        # A subscriber paused while the attempt was in flight keeps its delivery held.
        state=sa.case(
            (
                sa.and_(
                    sa.bindparam("b_state", type_=sa.String) == _PENDING,
                    deliveries.c.state == _HELD,
                ),
                _HELD,
            ),
            else_=sa.bindparam("b_state", type_=sa.String),
        ),
        next_attempt_at=sa.bindparam("b_next", type_=sa.Double),
        lease_owner=None,
        last_error=sa.bindparam("b_error", type_=sa.Text),
        last_outcome=sa.bindparam("b_outcome", type_=sa.String),
        updated_at=sa.bindparam("b_now", type_=sa.Double),
    )
)

# LOG_ATTEMPT and SETTLE on SQLite for many outcomes at once (see RowsOfValues), each
# outcome a row of its values in the order of the WITH's columns. Each outcome is of a
# lease of its own, so no two rows settle the same delivery. SETTLE's last value is b_now.
LOG_ATTEMPTS_SQLITE = RowsOfValues(
    """
WITH b(delivery_id, attempt, owner, started_at, duration, outcome, status_code, error)
AS (VALUES {rows})
INSERT INTO attempts (delivery_id, number, started_at, duration, outcome, status_code, error)
SELECT b.delivery_id, b.attempt, b.started_at, b.duration, b.outcome, b.status_code, b.error
FROM b, deliveries AS d
WHERE d.id = b.delivery_id AND d.attempts = b.attempt AND d.lease_owner = b.owner
""",
    placeholders(8),
)
SETTLE_ALL_SQLITE = RowsOfValues(
    f"""
WITH b(delivery_id, attempt, owner, state, next_attempt_at, error, outcome) AS (VALUES {{rows}})
UPDATE deliveries SET
  state = CASE WHEN b.state = '{_PENDING}' AND deliveries.state = '{_HELD}' THEN '{_HELD}'
          ELSE b.state END,
  next_attempt_at = b.next_attempt_at, lease_owner = NULL, last_error = b.error,
  last_outcome = b.outcome, updated_at = ?
FROM b
WHERE deliveries.id = b.delivery_id AND deliveries.attempts = b.attempt
  AND deliveries.lease_owner = b.owner
""",
    placeholders(7),
)

# A subscriber that just succeeded (b_id) is no longer failing; one that only failed
# starts failing at b_now unless it already was.
SUBSCRIBER_HEALTHY = Prepared(
    subscribers.update()
    .where(
        subscribers.c.id == sa.bindparam("b_id", type_=sa.String),
        subscribers.c.failing_since.is_not(None),
    )
    .values(failing_since=None)
)
SUBSCRIBER_FAILING = Prepared(
    subscribers.update()
    .where(
        subscribers.c.id == sa.bindparam("b_id", type_=sa.String),
        subscribers.c.failing_since.is_(None),
    )
    .values(failing_since=sa.bindparam("b_now", type_=sa.Double))
)
