"""The publisher under test: started as ``python -m publisher``, driven through its gRPC API.

The bare relay of the floor scenarios (tests.bench.relay) serves the same API and is
started and driven the same way.

Also the PostgreSQL databases the bench creates for it and drops afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import grpc.aio
from sqlalchemy.engine import make_url

from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc

from . import procs, runtime

SERVING_TIMEOUT = 60.0
PENDING = publisher_pb2.DELIVERY_STATE_PENDING
DELIVERED = publisher_pb2.DELIVERY_STATE_DELIVERED


class Publisher:
    def __init__(self, process: procs.Process, address: str) -> None:
        self.process = process
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=runtime.GRPC_OPTIONS)
        self.stub: publisher_pb2_grpc.PublisherServiceAsyncStub = (
            publisher_pb2_grpc.PublisherServiceStub(self.channel)
        )

    async def register(self, endpoint: str, name: str = "bench", *types: str) -> str:
        """Registers a subscriber at ``endpoint`` (host:port or http:// URL); returns its id."""
        response = await self.stub.RegisterSubscriber(
            publisher_pb2.RegisterSubscriberRequest(
                name=name, endpoint=endpoint, event_types=list(types)
            ),
            timeout=30.0,
        )
        return response.subscriber.id

    async def settled_at(
        self, *, within: float, subscriber_id: str = "", event_id: str = ""
    ) -> float:
        """Polls until no delivery of the subscriber (or event) is pending; returns when."""
        deadline = time.monotonic() + within
        request = publisher_pb2.ListDeliveriesRequest(
            subscriber_id=subscriber_id, event_id=event_id, state=PENDING, page_size=1
        )
        while True:
            response = await self.stub.ListDeliveries(request, timeout=30.0)
            if not response.deliveries:
                return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"deliveries still pending after {within:g}s")
            await asyncio.sleep(0.01)

    async def count(self, state: int, *, subscriber_id: str = "", event_id: str = "") -> int:
        """How many deliveries are in ``state``, paging 1,000 at a time."""
        total, token = 0, ""
        for _ in range(100_000):
            response = await self.stub.ListDeliveries(
                publisher_pb2.ListDeliveriesRequest(
                    subscriber_id=subscriber_id,
                    event_id=event_id,
                    state=state,  # type: ignore[arg-type]
                    page_size=1000,
                    page_token=token,
                ),
                timeout=30.0,
            )
            total += len(response.deliveries)
            token = response.next_page_token
            if not token:
                return total
        raise RuntimeError("too many pages of deliveries")


async def start_publisher(
    group: procs.Group,
    database_url: str,
    *,
    per_subscriber: int,
    workers: int = 0,
    name: str = "publisher",
) -> Publisher:
    """A publisher whose one subscriber may have ``per_subscriber`` sends in flight, half
    of its slots, as its defaults have it (256 of 512), sending from ``workers`` delivery
    workers (0, its default: from its own process)."""
    return await _serve(
        group,
        name,
        [
            "publisher",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--max-in-flight",
            str(2 * per_subscriber),
            "--max-in-flight-per-subscriber",
            str(per_subscriber),
            # The HTTP ack server listens on loopback, which the SSRF guard refuses by default.
            "--allow-cidr",
            "127.0.0.0/8",
            "--delivery-workers",
            str(workers),
        ],
    )


async def start_relay(
    group: procs.Group, deliver: str, *, max_in_flight: int, name: str = "relay"
) -> Publisher:
    """The floor (tests.bench.relay) in the publisher's place: same API, same ready line."""
    return await _serve(
        group,
        name,
        ["tests.bench.relay", "--deliver", deliver, "--max-in-flight", str(max_in_flight)],
    )


async def _serve(group: procs.Group, name: str, module_args: list[str]) -> Publisher:
    """Starts ``python -m <module_args>`` and waits for its ``serving`` log line."""
    process = await group.start(name, [procs.PYTHON, "-m", *module_args])
    serving = await group.wait_log(
        process, lambda line: line.get("event") == "serving", SERVING_TIMEOUT
    )
    publisher = Publisher(process, str(serving["grpc"]))
    group.defer(lambda: publisher.channel.close(None))
    await asyncio.wait_for(publisher.channel.channel_ready(), 10.0)
    return publisher


async def migrate(group: procs.Group, database_url: str) -> None:
    """Creates the schema as an operator would (``webhook-publisher migrate``)."""
    process = await group.start(
        "migrate", [procs.PYTHON, "-m", "publisher", "migrate", "--database-url", database_url]
    )
    await process.exited(SERVING_TIMEOUT)


async def postgres_problem(url: str) -> str:
    """Why PostgreSQL at ``url`` cannot be used ("" when it can)."""
    try:
        connection = await asyncpg.connect(_asyncpg_dsn(url), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return f"PostgreSQL at {url} is unreachable: {error or type(error).__name__}"
    await connection.close()
    return ""


@asynccontextmanager
async def postgres_database(url: str) -> AsyncIterator[str]:
    """A fresh database on the server of ``url``, dropped on leaving; yields its URL."""
    name = f"webhooks_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(_asyncpg_dsn(url), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
