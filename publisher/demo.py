"""``make run``: the publisher and the reference subscriber on loopback, and one delivered event.

Starts both services as real processes on their default ports with the
embedded SQLite default (their files live in ``.demo/``), registers the
subscriber, emits an event, shows it delivered and verified, and keeps both
serving until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import signal
import sys
import time
from typing import Any

import grpc.aio

from common import signing
from common.gen.webhooks.v1 import (
    publisher_pb2,
    publisher_pb2_grpc,
    subscriber_pb2,
    subscriber_pb2_grpc,
)

PUBLISHER = "127.0.0.1:50051"
SUBSCRIBER = "127.0.0.1:50052"
SUBSCRIBER_HTTP = "127.0.0.1:8080"
WORKDIR = pathlib.Path(".demo")
DEMO_NAME = "demo-reference-subscriber"
STARTUP_SECONDS = 30.0


class Service:
    """A child process whose JSON log lines are echoed with a prefix and watched."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.serving = asyncio.get_running_loop().create_future()
        self._echo = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, name: str, module: str, *args: str) -> Service:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=WORKDIR,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        service = cls(name, proc)
        try:
            await asyncio.wait_for(asyncio.shield(service.serving), STARTUP_SECONDS)
        except TimeoutError:
            await service.stop()
            raise SystemExit(f"{name} did not start within {STARTUP_SECONDS:.0f} s") from None
        return service

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            print(f"[{self.name}] {line}", file=sys.stderr)
            with contextlib.suppress(ValueError):
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == "serving" and not self.serving.done():
                    self.serving.set_result(record)
        if not self.serving.done():
            self.serving.set_exception(
                SystemExit(f"{self.name} exited with {await self.proc.wait()} before serving")
            )

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._echo


def say(text: str = "") -> None:
    print(text, flush=True)


async def register(stub: publisher_pb2_grpc.PublisherServiceAsyncStub, secret: str) -> str:
    """Registers the reference subscriber, replacing the one an earlier demo run left."""
    listing = await stub.ListSubscribers(publisher_pb2.ListSubscribersRequest(page_size=1000))
    for old in listing.subscribers:
        if old.name == DEMO_NAME:
            await stub.DeleteSubscriber(publisher_pb2.DeleteSubscriberRequest(subscriber_id=old.id))
    response = await stub.RegisterSubscriber(
        publisher_pb2.RegisterSubscriberRequest(
            name=DEMO_NAME,
            endpoint=SUBSCRIBER,
            protocol=publisher_pb2.PROTOCOL_GRPC,
            event_types=["order.*"],
            secret=secret,
        )
    )
    return response.subscriber.id


async def demo() -> None:
    secret = signing.generate_secret()
    say(f"Starting the publisher on {PUBLISHER} (SQLite: {WORKDIR / 'webhooks.db'}) ...")
    publisher = await Service.start("publisher", "publisher", "--listen", PUBLISHER)
    services = [publisher]
    try:
        async with grpc.aio.insecure_channel(PUBLISHER) as channel:
            stub: publisher_pb2_grpc.PublisherServiceAsyncStub = (
                publisher_pb2_grpc.PublisherServiceStub(channel)
            )
            subscriber_id = await register(stub, secret)
            say(f"Registered subscriber {subscriber_id} for order.* at {SUBSCRIBER}.")
            say(f"Starting the reference subscriber on {SUBSCRIBER} (HTTP {SUBSCRIBER_HTTP}) ...")
            services.append(
                await Service.start(
                    "subscriber",
                    "subscriber",
                    "--listen",
                    SUBSCRIBER,
                    "--http-listen",
                    SUBSCRIBER_HTTP,
                    "--secret",
                    secret,
                    "--audience",
                    subscriber_id,
                )
            )
            await show_one_delivery(stub, subscriber_id, secret)
        say()
        say("Both services keep serving. Try, with grpcurl:")
        say(
            f'  grpcurl -plaintext -d \'{{"type": "order.paid", "payload": "e30="}}\' '
            f"{PUBLISHER} webhooks.v1.PublisherService/Emit"
        )
        say(
            f'  grpcurl -plaintext -d \'{{"subscriber_id": "{subscriber_id}"}}\' '
            f"{PUBLISHER} webhooks.v1.PublisherService/ListDeliveries"
        )
        say("Press Ctrl-C to stop.")
        await wait_for_ctrl_c()
    finally:
        say("Stopping ...")
        for service in reversed(services):
            await service.stop()


async def show_one_delivery(
    stub: publisher_pb2_grpc.PublisherServiceAsyncStub, subscriber_id: str, secret: str
) -> None:
    payload = json.dumps({"order_id": "A-1001", "amount_cents": 4200}).encode()
    started = time.monotonic()
    emitted = await stub.Emit(publisher_pb2.EmitRequest(type="order.created", payload=payload))
    say(f"Emitted event {emitted.event_id} (order.created) to {emitted.delivery_count} subscriber.")
    deadline = time.monotonic() + 30
    while True:
        listing = await stub.ListDeliveries(
            publisher_pb2.ListDeliveriesRequest(event_id=emitted.event_id)
        )
        delivery = listing.deliveries[0]
        if delivery.state == publisher_pb2.DELIVERY_STATE_DELIVERED:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"not delivered within 30 s: {delivery}")
        await asyncio.sleep(0.05)
    elapsed = (time.monotonic() - started) * 1000
    say(
        f"Delivered: delivery {delivery.id} is DELIVERED after {delivery.attempt_count} "
        f"attempt(s), {elapsed:.0f} ms after Emit."
    )
    # Asked as the publisher asks, with a status token (signing.sign_status).
    token = signing.sign_status(
        signing.secret_key(secret),
        issuer="grpc-webhooks",
        audience=subscriber_id,
        event_id=emitted.event_id,
        now=time.time(),
    )
    async with grpc.aio.insecure_channel(SUBSCRIBER) as channel:
        status = await subscriber_pb2_grpc.SubscriberServiceStub(channel).GetStatus(
            subscriber_pb2.GetStatusRequest(event_id=emitted.event_id),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    state = subscriber_pb2.ReceiptState.Name(status.state)
    say(f"Verified: the subscriber checked the JWT signature and says {state} for this event.")


async def wait_for_ctrl_c() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    WORKDIR.mkdir(exist_ok=True)
    asyncio.run(demo())


if __name__ == "__main__":
    main()
