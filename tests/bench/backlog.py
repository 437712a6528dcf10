"""Fills a publisher's SQLite file with pending deliveries directly, much faster than the API.

The rows have the shape the publisher writes itself: events as
``publisher.store.Store._insert_events`` makes them, deliveries from
``publisher.store._new_delivery``. The file must already hold the schema and
the subscriber (start the publisher once and register it through the API).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from publisher import store

from . import runtime

ROWS_PER_TRANSACTION = 50_000


def fill(path: Path, subscriber_id: str, count: int) -> None:
    """Adds ``count`` events of 1 KiB, each with one pending delivery to ``subscriber_id``."""
    now = time.time()
    body = runtime.payload()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=DELETE")
        # A bulk load that can be redone: no journal, no fsync, a big page cache.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-1000000")
        event_columns = ["id", "type", "payload", "content_type", "idempotency_key", "created_at"]
        delivery_columns = list(store._new_delivery("evt", subscriber_id, True, now))
        _check_columns(connection, "events", event_columns)
        _check_columns(connection, "deliveries", delivery_columns)
        insert_event = _insert("events", event_columns)
        insert_delivery = _insert("deliveries", delivery_columns)
        done = 0
        while done < count:
            size = min(ROWS_PER_TRANSACTION, count - done)
            event_rows: list[tuple[Any, ...]] = []
            delivery_rows: list[tuple[Any, ...]] = []
            for _ in range(size):
                event_id = store.new_id("evt")
                event_rows.append(
                    (event_id, runtime.EVENT_TYPE, body, "application/json", None, now)
                )
                row = store._new_delivery(event_id, subscriber_id, True, now)
                delivery_rows.append(tuple(row[column] for column in delivery_columns))
            connection.execute("BEGIN")
            connection.executemany(insert_event, event_rows)
            connection.executemany(insert_delivery, delivery_rows)
            connection.execute("COMMIT")
            done += size
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def _insert(table: str, columns: list[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


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
