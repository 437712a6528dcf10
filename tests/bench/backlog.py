"""Fills a publisher's SQLite file with pending deliveries directly, much faster than the API.

The rows have the shape the publisher writes itself: events as
``publisher.store.Store._insert_events`` makes them, deliveries from
``publisher.store._new_delivery``. The file must already hold the schema and
the subscriber (start the publisher once and register it through the API).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from publisher import store

from . import runtime

ROWS_PER_TRANSACTION = 50_000


def fill(path: Path, subscriber_id: str, count: int) -> None:
    """Adds ``count`` events of 1 KiB, each with one pending delivery to ``subscriber_id``.

    The rows are generated inside SQLite, ids of new_id's shape included: building
    them in Python took as long as writing them.
    """
    now = time.time()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=DELETE")
        # A bulk load that can be redone: no journal, no fsync, a big page cache.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-1000000")
        event_columns = ["id", "type", "payload", "content_type", "idempotency_key", "created_at"]
        delivery = store._new_delivery("evt", subscriber_id, True, now)
        _check_columns(connection, "events", event_columns)
        _check_columns(connection, "deliveries", list(delivery))
        # Every column as _new_delivery makes it, but a fresh id and the event's own id.
        chosen = {"id": _new_id_sql("dlv", "events.seq - :after"), "event_id": "events.id"}
        select = ", ".join(chosen.get(column, f":{column}") for column in delivery)
        insert_deliveries = (
            f"INSERT INTO deliveries ({', '.join(delivery)}) "
            f"SELECT {select} FROM events WHERE events.seq > :after ORDER BY events.seq"
        )
        insert_events = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :size) "
            f"INSERT INTO events ({', '.join(event_columns)}) "
            f"SELECT {_new_id_sql('evt', 'i')}, :type, :payload, 'application/json', NULL, :now "
            "FROM n"
        )
        event = {"type": runtime.EVENT_TYPE, "payload": runtime.payload(), "now": now}
        done = 0
        milliseconds = time.time_ns() // 1_000_000
        while done < count:
            size = min(ROWS_PER_TRANSACTION, count - done)
            connection.execute("BEGIN")
            (after,) = connection.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
            stamp = {"milliseconds": milliseconds + done // 100}
            connection.execute(insert_events, {**event, **stamp, "size": size})
            connection.execute(insert_deliveries, {**delivery, **stamp, "after": after})
            connection.execute("COMMIT")
            done += size
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()
    # Nothing above synced, so the rows (1.7 GB for a million) are still dirty in the page
    # cache, and the publisher's first checkpoint would write them all out in its fsync,
    # stalling the first run's deliveries for seconds (its first thousand at 1,000/s
    # against 2,500/s in the runs after). A database holding a backlog has long had it on
    # disk: writing it out is part of the setup.
    with path.open("rb+") as written:
        os.fsync(written.fileno())


def _new_id_sql(prefix: str, number: str) -> str:
    """SQL for an id of ids.new_id's shape: prefix, milliseconds in hex, 20 random hex
    digits. The ``number``-th row is stamped 1 ms later per 100 rows, so that ids sort in
    the order they were written, as the publisher's do: a backlog of random ids would
    scatter every batch of claims and outcomes across the whole index."""
    return (
        f"'{prefix}_' || printf('%012x', :milliseconds + ({number}) / 100)"
        " || lower(hex(randomblob(10)))"
    )


def _check_columns(connection: sqlite3.Connection, table: str, columns: list[str]) -> None:
    """Fails loudly when the schema has a required column these rows do not fill."""
    missing = [
        name
        for _, name, _, notnull, default, primary in connection.execute(
            f"PRAGMA table_info({table})"
        )
        if notnull and default is None and not primary and name not in columns
    ]
    if missing:
        raise RuntimeError(
            f"the bench's {table} rows lack required columns {missing}: "
            "update tests/bench/backlog.py to the publisher's schema"
        )


def requeue(path: Path, subscriber_id: str) -> int:
    """Makes the subscriber's delivered deliveries pending again, as new; returns how many.

    Lets the next run start with the same backlog without copying a large file.
    """
    fresh = store._new_delivery("evt", subscriber_id, True, time.time())
    values = {
        column: value
        for column, value in fresh.items()
        if column not in ("id", "event_id", "subscriber_id", "created_at")
    }
    assignments = ", ".join(f"{column} = :{column}" for column in values)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        changed = connection.execute(
            f"UPDATE deliveries SET {assignments} "
            "WHERE subscriber_id = :subscriber_id AND state != :pending",
            {**values, "subscriber_id": subscriber_id, "pending": fresh["state"]},
        ).rowcount
        connection.execute("DELETE FROM attempts")
        connection.execute("COMMIT")
        return changed
    finally:
        connection.close()


def pending(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        (count,) = connection.execute(
            "SELECT count(*) FROM deliveries WHERE state = 'pending'"
        ).fetchone()
        return int(count)
    finally:
        connection.close()
