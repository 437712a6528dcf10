"""The kill soak: nothing is lost while the publisher is SIGKILLed and the subscriber bounces.

Emits N events at a steady rate (retrying each with its idempotency key while
the publisher is down, as a careful client does), SIGKILLs the publisher every
few seconds and restarts it on the same SQLite file, stops and starts the
reference subscriber at random, then waits for every delivery to drain. At the
end every event must be in the subscriber's inbox exactly once as an effect.

    python -m tests.soak [--events 2000] [--rate 200] [--kill-every 3] [--seed 1]

``make soak`` runs the full version; tests/e2e/test_soak.py a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2

from common import signing
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from tests.support import Process, eventually

# Quick retries, so that deliveries missed while the subscriber is down come back soon.
T = TypeVar("T")

RETRY_SCHEDULE = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


@dataclass
class Report:
    events: int = 0
    publisher_kills: int = 0
    subscriber_restarts: int = 0
    emit_retries: int = 0
    effects: int = 0
    missing: int = 0
    duplicates_absorbed: int = 0
    emit_seconds: float = 0.0
    drain_seconds: float = 0.0
    failed_deliveries: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.effects == self.events and self.missing == 0 and self.failed_deliveries == 0


class Cluster:
    """The two services as real processes, restartable, on files in ``workdir``.

    A publisher port of 0 lets the first start pick one; restarts keep it, as clients and
    the emitter hold its address. The subscriber's port is fixed, since it is registered
    before the subscriber (which needs the registered id) starts.
    """

    def __init__(
        self,
        workdir: Path,
        publisher_port: int,
        subscriber_port: int,
        http_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.publisher_address = f"127.0.0.1:{publisher_port}"
        self.subscriber_address = f"127.0.0.1:{subscriber_port}"
        # Deliveries over HTTP to the subscriber's receiver on this port, if given.
        self.http_address = None if http_port is None else f"127.0.0.1:{http_port}"
        self.secret = signing.generate_secret()
        self.subscriber_id = ""
        self.publisher: Process | None = None
        self.subscriber: Process | None = None

    async def start_publisher(self) -> None:
        # The SSRF guard refuses loopback unless allowed.
        allow = [] if self.http_address is None else ["--allow-cidr", "127.0.0.0/8"]
        self.publisher = Process(
            "publisher",
            [
                "--listen",
                self.publisher_address,
                "--database-url",
                "sqlite:///publisher.db",
                *allow,
            ],
            cwd=str(self.workdir),
        )
        serving = await self.publisher.logged("serving")
        self.publisher_address = str(serving["grpc"])

    async def kill_publisher(self) -> None:
        assert self.publisher is not None
        await self.publisher.kill()

    async def start_subscriber(self) -> None:
        self.subscriber = Process(
            "subscriber",
            [
                "--listen",
                self.subscriber_address,
                "--http-listen",
                self.http_address or "off",
                "--database-url",
                "sqlite:///subscriber.db",
                "--secret",
                self.secret,
                "--audience",
                self.subscriber_id,
            ],
            cwd=str(self.workdir),
        )
        await self.subscriber.logged("serving")

    async def stop_subscriber(self) -> None:
        if self.subscriber is not None:
            await self.subscriber.stop()
            self.subscriber = None

    async def stop(self) -> None:
        for process in (self.publisher, self.subscriber):
            if process is not None:
                await process.stop()

    def registration(self) -> publisher_pb2.RegisterSubscriberRequest:
        """The soak's subscriber, over gRPC or (with an HTTP address) over HTTP."""
        request = publisher_pb2.RegisterSubscriberRequest(
            name="soak",
            endpoint=self.subscriber_address,
            secret=self.secret,
            retry_schedule=[duration(s) for s in RETRY_SCHEDULE],
        )
        if self.http_address is not None:
            request.endpoint = f"http://{self.http_address}/webhooks"
            request.protocol = publisher_pb2.PROTOCOL_HTTP
            request.status_url = f"http://{self.http_address}/webhooks/status/{{event_id}}"
        return request

    def inbox(self) -> dict[str, int]:
        """event id -> how many times the subscriber was handed it."""
        with contextlib.closing(sqlite3.connect(self.workdir / "subscriber.db")) as db:
            return dict(db.execute("SELECT event_id, receive_count FROM inbox").fetchall())


@contextlib.asynccontextmanager
async def publisher_stub(
    address: str,
) -> AsyncIterator[publisher_pb2_grpc.PublisherServiceAsyncStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield publisher_pb2_grpc.PublisherServiceStub(channel)


async def call_until_served(factory: Callable[[], Awaitable[T]], report: Report) -> T:
    """Retries an RPC while the publisher is down or restarting."""
    while True:
        try:
            return await factory()
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            report.emit_retries += 1
            await asyncio.sleep(0.05)


async def soak(
    events: int,
    rate: float,
    kill_every: float,
    seed: int,
    workdir: Path,
    *,
    kill_at: Sequence[int] = (),
    subscriber_bounces: bool = True,
    drain_deadline: float = 300.0,
    http: bool = False,
) -> Report:
    if any(mark > events for mark in kill_at):
        # A kill point past the last emit would never come.
        raise ValueError(f"kill_at {list(kill_at)}: every mark must be at most events={events}")
    rng = random.Random(seed)
    report = Report(events=events)
    cluster = Cluster(workdir, 0, free_port(), free_port() if http else None)
    await cluster.start_publisher()
    emitted: dict[str, str] = {}
    try:
        async with publisher_stub(cluster.publisher_address) as stub:
            registered = await stub.RegisterSubscriber(cluster.registration())
            cluster.subscriber_id = registered.subscriber.id
            await cluster.start_subscriber()

            started = time.monotonic()
            emitting = asyncio.create_task(_emit_all(stub, events, rate, emitted, report))
            chaos = asyncio.create_task(
                _chaos(
                    cluster,
                    emitting,
                    _kill_points(kill_every, kill_at, emitted),
                    rng,
                    report,
                    subscriber_bounces,
                    counted=bool(kill_at),
                )
            )
            await emitting
            await chaos
            report.emit_seconds = time.monotonic() - started

            if cluster.subscriber is None:
                await cluster.start_subscriber()
            drain_started = time.monotonic()

            async def drained() -> bool:
                pending = await stub.ListDeliveries(
                    publisher_pb2.ListDeliveriesRequest(
                        state=publisher_pb2.DELIVERY_STATE_PENDING, page_size=1
                    )
                )
                return not pending.deliveries

            await eventually(drained, deadline=drain_deadline, what="every delivery settled")
            report.drain_seconds = time.monotonic() - drain_started
            failed = await stub.ListDeliveries(
                publisher_pb2.ListDeliveriesRequest(
                    state=publisher_pb2.DELIVERY_STATE_FAILED, page_size=1000
                )
            )
            report.failed_deliveries = len(failed.deliveries)
    finally:
        await cluster.stop()
    inbox = cluster.inbox()
    report.effects = sum(1 for event_id in emitted.values() if event_id in inbox)
    report.missing = events - report.effects
    report.duplicates_absorbed = sum(count - 1 for count in inbox.values())
    if len(inbox) != len(set(emitted.values())):
        report.notes.append(f"inbox has {len(inbox)} events, {len(emitted)} were emitted")
    return report


async def _emit_all(
    stub: publisher_pb2_grpc.PublisherServiceAsyncStub,
    events: int,
    rate: float,
    emitted: dict[str, str],
    report: Report,
) -> None:
    start = time.monotonic()
    for index in range(events):
        # A steady rate: event i is due at start + i / rate.
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        key = f"soak-{index}"
        payload = json.dumps({"n": index}).encode()
        request = publisher_pb2.EmitRequest(type="soak.tick", payload=payload, idempotency_key=key)

        def send(r: publisher_pb2.EmitRequest = request) -> Awaitable[publisher_pb2.EmitResponse]:
            return stub.Emit(r, timeout=5)

        response = await call_until_served(send, report)
        emitted[key] = response.event_id


async def _kill_points(
    kill_every: float, kill_at: Sequence[int], emitted: dict[str, str]
) -> AsyncIterator[None]:
    """When to kill: every ``kill_every`` seconds, or once each count in ``kill_at`` is
    emitted (a fixed number of kills, whatever the machine's speed)."""
    if not kill_at:
        while True:
            await asyncio.sleep(kill_every)
            yield
    for mark in kill_at:
        while len(emitted) < mark:  # noqa: ASYNC110 - the emitter owns the dict; poll it
            await asyncio.sleep(0.01)
        yield


async def _chaos(
    cluster: Cluster,
    emitting: asyncio.Task[None],
    kill_points: AsyncIterator[None],
    rng: random.Random,
    report: Report,
    subscriber_bounces: bool,
    *,
    counted: bool,
) -> None:
    """Kills and restarts the publisher at each kill point, bouncing the subscriber at times.

    Counted kill points are all taken, even those the emits pass while the publisher
    restarts from the one before (those come right after the last emit): a slow restart
    must not decide how many kills a run gets. Timed ones stop with the emits.
    """
    while True:
        point = asyncio.ensure_future(anext(kill_points))
        await asyncio.wait([point, emitting], return_when=asyncio.FIRST_COMPLETED)
        if not point.done() and counted and not emitting.cancelled() and not emitting.exception():
            # Every count has been emitted, so this point is due at once.
            await asyncio.wait([point])
        if not point.done():
            point.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await point
            break
        if point.exception() is not None:
            break  # Every kill point has passed.
        await cluster.kill_publisher()
        report.publisher_kills += 1
        if subscriber_bounces and rng.random() < 0.5:
            await cluster.stop_subscriber()
            report.subscriber_restarts += 1
        await cluster.start_publisher()
        if cluster.subscriber is None:
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await cluster.start_subscriber()


def duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--http", action="store_true", help="deliver over HTTP, not gRPC")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webhooks-soak-") as workdir:
        report = asyncio.run(
            soak(args.events, args.rate, args.kill_every, args.seed, Path(workdir), http=args.http)
        )
    for name, value in asdict(report).items():
        print(f"{name:>22}: {value}")
    print(f"{'result':>22}: {'OK' if report.ok else 'FAILED'}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
