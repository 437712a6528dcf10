"""Retention: settled events older than ``--retention`` go, with their deliveries and attempts.

Without it the database grows for as long as it lives. An event goes only when
every delivery of it is settled (delivered or dead-lettered), so nothing still
owed to a subscriber is lost, however old, and has been settled for ``--retention``
too, so that a delivery dead-lettered today can still be told of and redelivered
(see store.expired_events). What goes with it: GetEvent and
GetDelivery answer NOT_FOUND, the catch-up feed no longer lists it, and its
idempotency key may be used again. The newest event always stays (see
store.expired_events).

Replicas on one PostgreSQL database take turns (Store.prune): a round that finds
another replica pruning leaves the work to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from common import log
from publisher.store import Store

logger = logging.getLogger("publisher.retention")

# Events deleted per transaction at most (fewer when they have many deliveries, see
# store.PRUNE_DELIVERIES): on SQLite a transaction holds the only write lock, and emits wait
# behind it.
BATCH = 500


class Retention:
    def __init__(self, store: Store, keep: float, *, now: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keep = keep
        self._now = now

    async def run_once(self) -> int:
        """Deletes what has expired, a batch per transaction; returns how many events went."""
        before = self._now() - self._keep
        total = 0
        # Until a batch finds nothing: one that took fewer than BATCH events may have
        # stopped at its deliveries' budget.
        while gone := await self._store.prune(before, BATCH):
            total += gone
            await asyncio.sleep(0)  # Emits and claims get their turn between batches.
        if total:
            log.event(logger, "pruned", events=total, older_than=before)
        return total
