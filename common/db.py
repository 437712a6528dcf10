"""Database URLs and engines: SQLite for the embedded default, PostgreSQL to scale out."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from typing import Any

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from common import errors


def normalize_url(url: str) -> str:
    """Gives plain ``sqlite:`` and ``postgresql:`` URLs their async drivers."""
    try:
        parsed = make_url(url)
    except Exception as error:
        raise errors.InvalidArgument("database_url", f"not a database URL: {error}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise errors.InvalidArgument("database_url", f"unsupported database {backend!r}")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    """An engine tuned for its backend.

    SQLite allows one writer at a time, so the embedded mode uses a single
    connection: every statement of the process queues on it instead of
    fighting over the file lock. WAL lets readers of other processes in, and
    synchronous=FULL makes a commit survive power loss, not only a crash.
    """
    url = normalize_url(url)
    if not is_sqlite(url):
        return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
    _tune_sqlite(engine.sync_engine)
    return engine


# The store's hot path writes outcomes with UPDATE ... FROM, new in SQLite 3.33 (2020), and
# reads JSON arrays with json_each (publisher/statements.py).
MIN_SQLITE = (3, 33, 0)


def create_sqlite_thread_engine(url: str) -> Engine:
    """A synchronous engine on the same SQLite file, for one dedicated thread.

    A transaction run whole on that thread costs one hand-over between threads,
    where the async driver pays one per statement, each waiting for a turn of a
    busy event loop. Refuses, at start, an SQLite older than the store's SQL needs.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise RuntimeError(
            f"this Python's SQLite is {sqlite3.sqlite_version}; the embedded store needs "
            f"{'.'.join(map(str, MIN_SQLITE))} or newer (or use PostgreSQL)"
        )
    parsed = make_url(normalize_url(url)).set(drivername="sqlite")
    engine = sa_create_engine(
        parsed,
        poolclass=StaticPool,
        # The hot path's multi-row statements come in one shape per row count (see
        # publisher.statements.RowsOfValues), more than the default cache of 128 holds;
        # preparing one again costs more than running it.
        connect_args={"check_same_thread": False, "cached_statements": 1024},
    )
    _tune_sqlite(engine)
    return engine


def _tune_sqlite(engine: Engine) -> None:
    """WAL and durable commits; every transaction takes the write lock up front.

    With more than one connection on a file, a transaction that reads and then
    writes could otherwise fail at once with "database is locked" when another
    connection wrote in between; BEGIN IMMEDIATE waits (busy_timeout) instead.
    """

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own implicit BEGIN is off, so that ours below is the only one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "busy_timeout=10000",
            "foreign_keys=ON",
            # 64 MiB of page cache (default 2 MiB): a backlog of a million rows keeps its
            # index pages in memory instead of rereading them for every claim and record.
            "cache_size=-65536",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_path(url: str) -> str | None:
    """The file behind a SQLite URL (None for in-memory databases and other backends)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


class FileLock:
    """An exclusive, non-blocking lock on ``path``; the OS releases it when the process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: Any = None

    def acquire(self) -> bool:
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
