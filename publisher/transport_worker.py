"""A delivery worker: the publisher's transports, run in a child process.

``python -m publisher.transport_worker READ_FD WRITE_FD`` is started by the
publisher (publisher/transport_pool.py), never by hand. It reads requests from
READ_FD, makes each attempt or status question in a task of its own with the
same transports the publisher uses in-process, and writes the results to
WRITE_FD (publisher/worker_wire.py). It never touches the database: the
publisher decides what to send and records what happened.

It ignores SIGINT and SIGTERM, which a terminal or a service manager sends to
the whole process group: the publisher decides when its workers stop, by
closing the pipe once the attempts in flight have answered. The pipe closes
too when the publisher dies, so a worker finishes its attempts and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

from common import log
from publisher import collector, model, ssrf
from publisher import transport as tx
from publisher import worker_wire as wire
from publisher.grpc_transport import GrpcTransport
from publisher.http_transport import HttpTransport

logger = logging.getLogger("publisher.transport_worker")


def transports(options: wire.Options) -> dict[model.Protocol, tx.Transport]:
    """The transports that make attempts: a worker's, or the publisher's own without workers."""
    return {
        model.Protocol.GRPC: GrpcTransport(now=time.time),
        model.Protocol.HTTP: HttpTransport(
            guard=ssrf.Guard(options.allow_cidrs),
            connect_timeout=options.connect_timeout,
            pool_limit=options.pool_limit,
        ),
    }


async def serve(read_fd: int, write_fd: int) -> None:
    reader, pipe = await wire.connect(read_fd, write_fd)
    try:
        options = await wire.read_frame(reader)
    except asyncio.IncompleteReadError:
        return
    log.configure(options.log_level)
    # By protocol name, as requests name them.
    running = {protocol.value: transport for protocol, transport in transports(options).items()}
    pipe.write(wire.frame(wire.READY))
    requests = _Requests(running, wire.Outbox(pipe))
    # Its attempts in flight are at most the publisher's (see publisher.collector).
    collector.settle(options.pool_limit)
    try:
        while True:
            try:
                batch: list[wire.Request] = await wire.read_frame(reader)
            except asyncio.IncompleteReadError:
                break
            for request in batch:
                requests.take(request)
        await requests.finish()
    finally:
        for transport in running.values():
            await transport.close()
        requests.replies.close()


class _Requests:
    """The requests being answered, by id, so that the publisher can cancel one."""

    def __init__(self, running: dict[str, tx.Transport], replies: wire.Outbox) -> None:
        self._running = running
        self.replies = replies
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def take(self, request: wire.Request) -> None:
        request_id, kind = request[0], request[1]
        if kind == wire.CANCEL:
            task = self._tasks.get(request_id)
            if task is not None:
                task.cancel()
            return
        self._tasks[request_id] = asyncio.get_running_loop().create_task(self._answer(request))

    async def finish(self) -> None:
        """Waits for every request taken to be answered (or cancelled)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def _answer(self, request: wire.Request) -> None:
        request_id, kind, protocol, fields = request
        reply: object
        try:
            transport = self._running[protocol]
            attempt = wire.attempt_from_wire(fields)
            if kind == wire.STATUS:
                reply = (await transport.status(attempt)).value
            else:
                reply = wire.result_to_wire(await transport.send(attempt))
        except Exception as error:
            # As in the dispatcher: a bug fails the attempt on the schedule (or leaves the
            # question unanswered) instead of holding its delivery, and its send slot,
            # until the worker exits.
            logger.exception("request raised")
            if kind == wire.STATUS:
                reply = tx.Receipt.UNANSWERED.value
            else:
                failed = tx.Result(
                    tx.Outcome.FAILED, error=tx.excerpt(f"internal error: {error!r}")
                )
                reply = wire.result_to_wire(failed)
        finally:
            self._tasks.pop(request_id, None)
        self.replies.put((request_id, reply))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    read_fd, write_fd = (int(arg) for arg in sys.argv[1:3])
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(read_fd, write_fd))
    else:
        uvloop.run(serve(read_fd, write_fd))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
