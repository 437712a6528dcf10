"""Test helpers: waiting with a deadline, a programmable gRPC subscriber, process control."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import jwt
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from common import signing
from common.gen.webhooks.v1 import publisher_pb2_grpc, subscriber_pb2, subscriber_pb2_grpc
from publisher import model
from publisher import transport as tx
from publisher.app import PublisherApp
from publisher.store import AttemptRecord

T = TypeVar("T")

# HTTP subscribers in tests listen on loopback, which the SSRF guard refuses by default.
LOOPBACK = ("127.0.0.0/8",)

DEFAULT_DEADLINE = 20.0
# How long a lost Receive call keeps its caller waiting.
LOST_CALL_SECONDS = 30.0


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    deadline: float = DEFAULT_DEADLINE,
    what: str = "",
) -> T:
    """Polls ``check`` until it returns something truthy; fails the test at the deadline."""
    end = time.monotonic() + deadline
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what or check!r}; last={last!r}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses every connection while the block runs.

    Bound but not listening, it stays this test's: a port bound once and let go may be
    taken by anyone (gRPC servers even share ports, with SO_REUSEPORT), and a test that
    meant to reach nobody would reach them.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


def socket_owner(local_port: int, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the TCP socket whose local port is ``local_port``, if any.

    Tells which process made a connection that a test's server accepted: its peer port
    is the client socket's local port, and /proc links each socket to its holder.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == local_port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return pid
    return None


def children_of(pid: int) -> list[int]:
    """The process ids of ``pid``'s running children."""
    found: list[int] = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in (thread / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped yet is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def key_of(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def catch_up_metadata(
    secret: str, subscriber_id: str, *, audience: str = "grpc-webhooks", now: float | None = None
) -> tuple[tuple[str, str], ...]:
    """The metadata of a ListEvents call signed as the subscriber with ``secret``."""
    token = signing.sign_catch_up(
        signing.secret_key(secret),
        subscriber_id=subscriber_id,
        audience=audience,
        now=time.time() if now is None else now,
    )
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Received:
    request: subscriber_pb2.ReceiveRequest
    metadata: dict[str, str]
    # The caller's address as gRPC names it ("ipv4:127.0.0.1:PORT").
    peer: str = ""


@dataclass
class FakeSubscriber(subscriber_pb2_grpc.SubscriberServiceServicer):
    """A real gRPC subscriber on port 0 whose answers a test can script.

    ``fail_with`` makes Receive answer that status; ``hang`` makes it wait
    (after recording) before answering, to simulate a slow subscriber.
    ``fail_after_accepting`` stores the event before answering ``fail_with``, like a
    subscriber that crashes between its commit and its answer; ``lose_next`` makes the
    next calls arrive but never be stored nor answered in time, like a request lost in
    the subscriber; ``calls`` keeps every Receive and GetStatus in the order they came.
    """

    fail_with: grpc.StatusCode | None = None
    hang: float = 0.0
    received: list[Received] = field(default_factory=list)
    status_asked: list[str] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    fail_after_accepting: bool = False
    lose_next: int = 0
    calls: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _server: grpc.aio.Server | None = None

    async def Receive(
        self, request: subscriber_pb2.ReceiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> subscriber_pb2.ReceiveResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.received.append(Received(request, metadata, context.peer()))
        self.calls.append(("receive", request.event.id))
        if self.lose_next > 0:
            self.lose_next -= 1
            # Far past any deadline a test sets: the caller gives up without an answer.
            await asyncio.sleep(LOST_CALL_SECONDS)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "lost")
        if self.fail_with is None or self.fail_after_accepting:
            # Accepted durably before any hang: GetStatus then says RECEIVED.
            self.accepted.add(request.event.id)
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.fail_with is not None:
            await context.abort(self.fail_with, "scripted failure")
        return subscriber_pb2.ReceiveResponse()

    async def GetStatus(
        self, request: subscriber_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> subscriber_pb2.GetStatusResponse:
        """RECEIVED for an event Receive accepted (even if it then hung)."""
        self.status_asked.append(request.event_id)
        self.calls.append(("status", request.event_id))
        if request.event_id in self.accepted:
            return subscriber_pb2.GetStatusResponse(state=subscriber_pb2.RECEIPT_STATE_RECEIVED)
        return subscriber_pb2.GetStatusResponse(state=subscriber_pb2.RECEIPT_STATE_UNKNOWN)

    def event_ids(self) -> list[str]:
        return [r.request.event.id for r in self.received]

    async def start(self, port: int = 0) -> str:
        server = grpc.aio.server()
        subscriber_pb2_grpc.add_SubscriberServiceServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        self._server = server
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None


def claims_of(received: Received, secret: str, audience: str) -> dict[str, Any]:
    """Verifies a delivery's JWT with PyJWT and nothing of ours, and returns its claims."""
    token = received.metadata["authorization"].removeprefix("Bearer ")
    claims: dict[str, Any] = jwt.decode(
        token, key_of(secret), algorithms=["HS256"], audience=audience
    )
    return claims


class Process:
    """A service started as a real process, read through its JSON log lines on stderr."""

    def __init__(self, module: str, args: list[str], cwd: str, env: dict[str, str] | None = None):
        self.module = module
        self.args = args
        self.lines: list[dict[str, Any]] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self._reader = asyncio.get_running_loop().run_in_executor(None, self._read)

    def _read(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"event": "text", "text": line.rstrip()})

    async def logged(self, event: str, deadline: float = DEFAULT_DEADLINE) -> dict[str, Any]:
        async def find() -> dict[str, Any] | None:
            if self._proc.poll() is not None and not any(
                line.get("event") == event for line in self.lines
            ):
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
                raise AssertionError(
                    f"{self.module} exited with {self._proc.returncode}: {self.lines}"
                )
            return next((line for line in self.lines if line.get("event") == event), None)

        return await eventually(find, deadline=deadline, what=f"{self.module} logs {event!r}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def kill(self) -> int:
        """SIGKILL: no chance to clean up, as when a machine dies."""
        self._proc.send_signal(signal.SIGKILL)
        return await self._reap()

    async def stop(self, deadline: float = 30.0) -> int:
        """SIGTERM, then the exit code (SIGKILL if it does not stop in time)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._proc.wait), deadline)
        except TimeoutError:
            self._proc.kill()
        return await self._reap()

    async def _reap(self) -> int:
        code = await asyncio.to_thread(self._proc.wait)
        await asyncio.wait_for(asyncio.shield(self._reader), 5)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        return code


class Held:
    """A transport whose sends wait until ``finish`` lets them end, oldest first."""

    def __init__(self) -> None:
        self._sends: list[tuple[asyncio.Future[None], asyncio.Task[Any]]] = []

    async def send(self, attempt: tx.Attempt) -> tx.Result:
        released = asyncio.get_running_loop().create_future()
        task = asyncio.current_task()
        assert task is not None
        self._sends.append((released, task))
        await released
        return tx.Result(tx.Outcome.DELIVERED)

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        return tx.Receipt.UNANSWERED

    async def close(self) -> None:
        return None

    def in_flight(self) -> int:
        return sum(not released.done() for released, _ in self._sends)

    def started(self) -> int:
        """Sends begun so far, ended or not."""
        return len(self._sends)

    async def finish(self, count: int, *, together: bool = False) -> None:
        """Ends the ``count`` oldest sends and waits for their deliveries to end: one by
        one, or ``together`` in the same turn of the event loop.

        The dispatcher frees a send's slot in a callback its delivery task had before
        this one waits for it, so the slot is free when this returns.
        """
        held = [(released, task) for released, task in self._sends if not released.done()]
        ending = held[:count]
        for released, task in ending:
            released.set_result(None)
            if not together:
                await task
        await asyncio.gather(*(task for _, task in ending))


def store_subscriber_spec(name: str, *event_types: str) -> model.SubscriberSpec:
    """A gRPC subscriber nobody listens for (127.0.0.1:1), retried after a minute: for tests
    of the store alone, which never send."""
    return model.SubscriberSpec(
        name=name,
        endpoint="127.0.0.1:1",
        protocol=model.Protocol.GRPC,
        event_types=event_types,
        retry_schedule=(60.0,),
        contact_email="",
        body_format=model.BodyFormat.RAW,
        status_url="",
    )


def attempt_record(
    claim: model.Claim,
    *,
    owner: str = "replica",
    outcome: str = "delivered",
    state: model.DeliveryState = model.DeliveryState.DELIVERED,
    at: float | None = None,
    next_attempt_at: float | None = None,
    error: str = "",
) -> AttemptRecord:
    """What a dispatcher would record for ``claim``'s attempt, made ``at`` (now)."""
    when = time.time() if at is None else at
    return AttemptRecord(
        delivery_id=claim.delivery_id,
        attempt=claim.attempt,
        owner=owner,
        started_at=when,
        duration=0.01,
        outcome=outcome,
        status_code=0,
        error=error,
        new_state=state,
        next_attempt_at=when if next_attempt_at is None else next_attempt_at,
        subscriber_id=claim.subscriber.id,
    )


@dataclass
class Running:
    """A publisher started by the ``open_publisher`` fixture, and a client of it."""

    app: PublisherApp
    stub: publisher_pb2_grpc.PublisherServiceAsyncStub


OpenPublisher = Callable[..., Awaitable[Running]]


def make_attempt(
    endpoint: str,
    *,
    key: bytes,
    subscriber_id: str,
    payload: bytes,
    issuer: str = "publisher.test",
    **changes: Any,
) -> tx.Attempt:
    """An attempt of event evt-1 (order.created) as the dispatcher hands it to a transport."""
    fields: dict[str, Any] = {
        "delivery_id": "dlv-1",
        "attempt": 1,
        "event_id": "evt-1",
        "event_type": "order.created",
        "payload": payload,
        "content_type": "application/json",
        "created_at": 1_700_000_000.0,
        "subscriber_id": subscriber_id,
        "endpoint": endpoint,
        "body_format": "raw",
        "keys": (key,),
        "issuer": issuer,
        "timeout": 5.0,
    }
    fields.update(changes)
    return tx.Attempt(**fields)


# pg_locks covers the whole server: a wait in another database (another test run sharing
# the server) must not pass for the one a test waits for, or it would go on too early and
# test nothing.
WAITING_IN_THIS_DATABASE = (
    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
    " WHERE NOT granted AND datname = current_database()"
)


async def lock_awaited(engine: AsyncEngine) -> bool:
    """PostgreSQL: whether some transaction in this engine's database is waiting for a lock."""
    async with engine.connect() as conn:
        waiting = await conn.scalar(sa.text(WAITING_IN_THIS_DATABASE))
    return bool(waiting)
