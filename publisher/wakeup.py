"""Wakes every replica at once when one of them commits new work (PostgreSQL LISTEN/NOTIFY).

The store sends ``NOTIFY`` inside the transaction that makes deliveries due,
so it reaches the listeners exactly when the work becomes visible. Each
replica keeps one dedicated connection listening; if it drops, the
dispatcher's slow poll carries on alone until the listener is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from common import db, log
from publisher.store import NOTIFY_CHANNEL

logger = logging.getLogger("publisher.wakeup")

RECONNECT_SECONDS = 2.0


class PostgresWakeup:
    def __init__(self, database_url: str, on_notify: Callable[[], None]) -> None:
        url = make_url(db.normalize_url(database_url)).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._on_notify = on_notify
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="wakeup")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        """Listens, and listens again after any failure: a listener that gave up would leave
        this replica to the poll for good, and its error would break the publisher's stop."""
        while True:
            try:
                await self._listen_once()
            except Exception as error:
                # Whatever ended it (the server restarting or failing over, the connection
                # dropping while LISTEN was set up): the poll carries on meanwhile.
                log.event(logger, "listen_failed", logging.WARNING, error=repr(error))
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen_once(self) -> None:
        """One connection's listening, until it is lost; raises if it cannot be set up."""
        lost = asyncio.Event()
        connection = await asyncpg.connect(self._dsn, timeout=10)
        try:
            connection.add_termination_listener(lambda _: lost.set())
            await connection.add_listener(NOTIFY_CHANNEL, self._notified)
            # Work committed while nobody listened is found by the next claim anyway.
            self._on_notify()
            await lost.wait()
            log.event(logger, "listen_lost", logging.WARNING)
        finally:
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)

    def _notified(self, *_: Any) -> None:
        self._on_notify()
