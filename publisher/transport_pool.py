"""Delivery workers: the transports run in child processes, and stand-ins take their place.

With ``--delivery-workers N`` the publisher starts N workers
(publisher/transport_worker.py) and hands the dispatcher ``RemoteTransport``s
instead of the in-process transports. Each attempt goes to the next worker in
turn and its result comes back as the transport's own would: the dispatcher
cannot tell the difference. Why: one process runs Python on one core at a time,
and sending (the HTTP or gRPC client and the signing) is most of what the
publisher does per event; in a worker it runs beside the store and the event
loop instead of taking turns with them.

A worker that dies takes its answers with it. Its sends in flight come back
UNCERTAIN, since they may have gone out, so the dispatcher asks the subscriber
before it sends again; its status questions come back unanswered. The next
attempt after that starts a new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from typing import Any

from common import log
from publisher import model
from publisher import transport as tx
from publisher import worker_wire as wire

logger = logging.getLogger("publisher.transport_pool")

# How long a stopping worker may take to answer what it has in flight; sends
# have their own timeout inside it, so this is only for a worker gone wrong.
STOP_SECONDS = 30.0
# How long a new worker may take to import and build its transports.
START_SECONDS = 30.0
# At most one new worker per slot per this many seconds: a worker that dies as
# it starts must not be started again for every attempt.
RESTART_SECONDS = 1.0

# A request whose worker died before answering it.
_LOST = object()


class Unavailable(Exception):
    """No worker could take a request: it was not sent."""


class NotStarted(RuntimeError):
    """A worker exited (or hung) before it was ready."""


class _Worker:
    """One child process, its pipes, and the requests it has not answered yet."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        outbox: wire.Outbox,
    ) -> None:
        self.process = process
        self._reader = reader
        self._outbox = outbox
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._closing = False
        self.alive = True
        self._listener = asyncio.create_task(self._listen())

    async def call(self, kind: int, protocol: str, attempt: tx.Attempt) -> Any:
        request_id = next(self._ids)
        answer = self._pending[request_id] = asyncio.get_running_loop().create_future()
        self._outbox.put((request_id, kind, protocol, wire.attempt_to_wire(attempt)))
        try:
            return await answer
        except asyncio.CancelledError:
            # The dispatcher gave up on it as it stops: stopped in the worker too, as an
            # in-process send would be, it cannot arrive after its lease was given back.
            self._pending.pop(request_id, None)
            if self.alive:
                self._outbox.put((request_id, wire.CANCEL, "", ()))
            raise

    async def _listen(self) -> None:
        try:
            while True:
                replies: list[wire.Reply] = await wire.read_frame(self._reader)
                for request_id, reply in replies:
                    answer = self._pending.pop(request_id, None)
                    # Done already if the dispatcher gave up on it (cancelled at stop).
                    if answer is not None and not answer.done():
                        answer.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.alive = False
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_result(_LOST)
            lost = len(self._pending)
            self._pending.clear()
            if not self._closing:
                returncode = await self.process.wait()
                log.event(
                    logger,
                    "delivery_worker_exited",
                    logging.ERROR,
                    pid=self.process.pid,
                    returncode=returncode,
                    unanswered=lost,
                )

    async def close(self) -> None:
        """Lets the worker answer what is in flight, then waits for it to exit."""
        self._closing = True
        self._outbox.close()
        try:
            returncode = await asyncio.wait_for(self.process.wait(), STOP_SECONDS)
        except TimeoutError:
            self.process.kill()
            returncode = await self.process.wait()
            log.event(logger, "delivery_worker_killed", logging.WARNING, pid=self.process.pid)
        await self._listener
        log.event(
            logger,
            "delivery_worker_stopped",
            logging.DEBUG,
            pid=self.process.pid,
            returncode=returncode,
        )


async def _spawn(options: wire.Options) -> _Worker:
    worker_reads, publisher_writes = os.pipe()
    publisher_reads, worker_writes = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "publisher.transport_worker",
            str(worker_reads),
            str(worker_writes),
            pass_fds=(worker_reads, worker_writes),
            stdin=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        os.close(publisher_writes)
        os.close(publisher_reads)
        raise
    finally:
        # The worker's ends are the worker's now; holding them would hide its exit.
        os.close(worker_reads)
        os.close(worker_writes)
    reader, pipe = await wire.connect(publisher_reads, publisher_writes)
    pipe.write(wire.frame(options))
    ready: object = None
    exiting = False
    try:
        ready = await asyncio.wait_for(wire.read_frame(reader), START_SECONDS)
    except (asyncio.IncompleteReadError, ConnectionError):
        # It closed its end of the pipe: it is exiting, or has.
        exiting = True
    except TimeoutError:
        pass
    except BaseException:
        # The caller gave up while it started (an attempt's budget ran out during a restart,
        # or the publisher is stopping): a worker nobody holds would live as long as the
        # publisher, and every later restart would leave one more.
        pipe.close()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if ready != wire.READY:
        pipe.close()
        if not exiting:
            # Not when it is exiting: kill() polls the process first, and reaping it there
            # leaves asyncio's watcher to report 255 instead of its exit status.
            process.kill()
        returncode = await process.wait()
        if not exiting:
            raise NotStarted(f"a delivery worker was not ready within {START_SECONDS:g}s")
        raise NotStarted(
            f"a delivery worker exited before it was ready (exit status {returncode}); "
            "what it printed is above"
        )
    log.event(logger, "delivery_worker_started", logging.DEBUG, pid=process.pid)
    return _Worker(process, reader, wire.Outbox(pipe))


class TransportPool:
    """``size`` delivery workers, started with ``start`` and stopped with ``close``."""

    def __init__(self, size: int, options: wire.Options) -> None:
        self._size = size
        self._options = options
        self._workers: list[_Worker] = []
        self._next = 0
        self._restarted_at = [0.0] * size
        self._restarting: list[asyncio.Lock] = []

    async def start(self) -> None:
        """Starts the workers side by side; NotStarted (and none left running) if one fails."""
        self._restarting = [asyncio.Lock() for _ in range(self._size)]
        spawned = await asyncio.gather(
            *(_spawn(self._options) for _ in range(self._size)), return_exceptions=True
        )
        self._workers = [worker for worker in spawned if isinstance(worker, _Worker)]
        failures = [error for error in spawned if isinstance(error, BaseException)]
        if failures:
            await self.close()
            raise failures[0]

    def transports(self) -> dict[model.Protocol, tx.Transport]:
        return {protocol: RemoteTransport(self, protocol.value) for protocol in model.Protocol}

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    async def call(self, kind: int, protocol: str, attempt: tx.Attempt) -> Any:
        """The worker's reply to one request; ``_LOST`` if the worker died before replying."""
        index = self._next
        self._next = (index + 1) % self._size
        worker = self._workers[index]
        if not worker.alive:
            try:
                worker = await self._restart(index)
            except Unavailable:
                # Another worker can take it while this one may not be started again yet.
                live = [other for other in self._workers if other.alive]
                if not live:
                    raise
                worker = live[0]
        return await worker.call(kind, protocol, attempt)

    async def _restart(self, index: int) -> _Worker:
        async with self._restarting[index]:
            worker = self._workers[index]
            if worker.alive:
                # Another attempt restarted it while this one waited for the lock.
                return worker
            if time.monotonic() - self._restarted_at[index] < RESTART_SECONDS:
                raise Unavailable("the delivery worker exited and was restarted just now")
            self._restarted_at[index] = time.monotonic()
            try:
                worker = self._workers[index] = await _spawn(self._options)
            except (OSError, NotStarted) as error:
                raise Unavailable(f"could not start a delivery worker: {error}") from None
            return worker

    async def close(self) -> None:
        await asyncio.gather(*(worker.close() for worker in self._workers))


class RemoteTransport:
    """A transport whose attempts a delivery worker makes (tx.Transport)."""

    def __init__(self, pool: TransportPool, protocol: str) -> None:
        self._pool = pool
        self._protocol = protocol

    async def send(self, attempt: tx.Attempt) -> tx.Result:
        try:
            reply = await self._pool.call(wire.SEND, self._protocol, attempt)
        except Unavailable as error:
            return tx.Result(tx.Outcome.FAILED, error=f"not sent: {error}")
        if reply is _LOST:
            return tx.Result(
                tx.Outcome.UNCERTAIN,
                error="the delivery worker exited before it said whether this was sent",
            )
        return wire.result_from_wire(reply)

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        try:
            reply = await self._pool.call(wire.STATUS, self._protocol, attempt)
        except Unavailable:
            return tx.Receipt.UNANSWERED
        if reply is _LOST:
            return tx.Receipt.UNANSWERED
        return wire.receipt_from_wire(reply)

    async def close(self) -> None:
        """Nothing of its own: the pool stops the workers."""
