"""Group commit: many concurrent callers, one writer, many items per transaction.

On this machine one SQLAlchemy transaction per item caps near 200 items/s,
while a transaction of a hundred items costs little more than one. Callers
submit and wait; a single task drains whatever has queued up, writes it in one
call, and answers each caller after that call (its commit) returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_Pending = tuple[Sequence[T], "asyncio.Future[list[R]]"]


class GroupCommit(Generic[T, R]):
    """Feeds submitted items to ``write`` in batches of about ``max_items``.

    A batch stops growing once it holds ``max_items``; the submission that
    crosses the mark goes in whole.

    ``write`` gets the items of one or more submissions and returns one result
    per item, in order. It must be all-or-nothing (one transaction): when it
    raises, nothing of the batch was written. A submission is never split
    across batches, so it is written all-or-nothing too.

    ``linger`` is how long the writer waits, once a submission arrives, for more
    to share its write: writes are cheaper in fewer, larger transactions. Without
    it, a writer that is idle writes each submission at once. With
    ``linger_when_idle=False`` it waits only while callers come faster than it
    writes (submissions were waiting when its last write ended): a lone caller
    at low load is written at once, as nobody else is coming to share its write.

    If a batch of several submissions fails, each is written again on its own,
    so that one bad submission fails alone instead of taking with it those that
    merely shared its transaction; a failure that is not theirs (the database
    is down) then reaches every one of them.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R]]],
        max_items: int,
        *,
        linger: float = 0.0,
        linger_when_idle: bool = True,
    ) -> None:
        self._write = write
        self._max_items = max_items
        self._linger = linger
        self._linger_when_idle = linger_when_idle
        self._queue: asyncio.Queue[tuple[Sequence[T], asyncio.Future[list[R]]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queues ``items`` and returns their results once they are written."""
        if not items:
            return []
        return await self.enqueue(items)

    def enqueue(self, items: Sequence[T]) -> asyncio.Future[list[R]]:
        """Queues ``items`` without waiting; the future resolves once they are written."""
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((items, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="group-commit")
        return future

    async def close(self) -> None:
        """Writes what is queued, then stops the writer."""
        await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _run(self) -> None:
        busy = False
        while True:
            batch = [await self._queue.get()]
            if self._linger and (busy or self._linger_when_idle):
                await asyncio.sleep(self._linger)
            count = len(batch[0][0])
            while count < self._max_items and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                count += len(batch[-1][0])
            try:
                await self._flush(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
            # Submissions came in while that write ran: the next one is worth waiting for.
            busy = not self._queue.empty()

    async def _flush(self, batch: list[tuple[Sequence[T], asyncio.Future[list[R]]]]) -> None:
        items = [item for submitted, _ in batch for item in submitted]
        try:
            results = await self._write(items)
        except Exception as error:
            if len(batch) == 1:
                _, future = batch[0]
                if not future.done():
                    future.set_exception(error)
                return
            for submission in batch:
                await self._flush([submission])
            return
        offset = 0
        for submitted, future in batch:
            # A caller that gave up (its RPC was cancelled) still had its items written.
            if not future.done():
                future.set_result(results[offset : offset + len(submitted)])
            offset += len(submitted)
