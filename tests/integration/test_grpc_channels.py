"""GrpcTransport's channels against real servers on port 0, on a clock the test moves: an idle
channel is closed and replaced, one with a call in flight is kept, and close() closes them all.

Whether a channel is closed is read from the process's open sockets (tests.support.socket_owner):
its connection's socket goes when the channel does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc.aio
import pytest

from common import signing
from common.gen.webhooks.v1 import subscriber_pb2
from publisher import grpc_transport
from publisher import transport as tx
from tests import support
from tests.support import FakeSubscriber, eventually, socket_owner

KEY = signing.secret_key(signing.generate_secret())
# A deadline for the test, far above any attempt timeout used here.
DEADLINE = 20.0
# Past the idle threshold and the time between sweeps: the next call sweeps, and a channel
# last used before this step is idle.
IDLE = grpc_transport.IDLE_SECONDS + grpc_transport.SWEEP_SECONDS

S = TypeVar("S", bound=FakeSubscriber)


class Clock:
    def __init__(self) -> None:
        # Real time to begin with, so that the delivery tokens are current.
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Holding(FakeSubscriber):
    """A FakeSubscriber whose Receive, once the call arrived, waits for ``release``."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # The client port of the call that arrived last.
    arrived_from: int = 0

    async def Receive(
        self, request: subscriber_pb2.ReceiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> subscriber_pb2.ReceiveResponse:
        self.arrived_from = port_of(context.peer())
        self.arrived.set()
        await self.release.wait()
        return await super().Receive(request, context)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def transport(clock: Clock) -> AsyncIterator[grpc_transport.GrpcTransport]:
    sender = grpc_transport.GrpcTransport(now=clock)
    yield sender
    await sender.close()


class Start(Protocol):
    async def __call__(self, subscriber: S) -> S: ...


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Starts subscribers on port 0, and stops them after the test."""
    started: list[FakeSubscriber] = []

    async def start_(subscriber: S) -> S:
        await subscriber.start()
        started.append(subscriber)
        return subscriber

    yield start_
    for subscriber in started:
        if isinstance(subscriber, Holding):
            subscriber.release.set()
        await subscriber.stop()


async def send(sender: grpc_transport.GrpcTransport, subscriber: FakeSubscriber) -> tx.Result:
    attempt = support.make_attempt(
        f"127.0.0.1:{subscriber.port}", key=KEY, subscriber_id="sub", payload=b"{}"
    )
    async with asyncio.timeout(DEADLINE):
        return await sender.send(attempt)


def port_of(peer: str) -> int:
    """The client port in a peer as gRPC names it ("ipv4:127.0.0.1:PORT")."""
    return int(peer.rsplit(":", 1)[1])


def last_port(subscriber: FakeSubscriber) -> int:
    """The client port of the last call the subscriber received: its connection's socket."""
    return port_of(subscriber.received[-1].peer)


def open_here(port: int) -> bool:
    """Whether this process holds the client socket of that port."""
    return socket_owner(port, [os.getpid()]) is not None


async def closed(port: int) -> None:
    async def gone() -> bool:
        return not open_here(port)

    await eventually(gone, deadline=DEADLINE, what=f"the connection from port {port} closed")


async def test_an_idle_channel_is_closed_and_the_next_send_delivers_on_a_new_one(
    clock: Clock,
    transport: grpc_transport.GrpcTransport,
    start: Start,
) -> None:
    """A channel unused for the idle threshold is closed by the sweep of a later call to
    another endpoint, and the next send to its endpoint connects again and is delivered."""
    idle, other = await start(FakeSubscriber()), await start(FakeSubscriber())
    assert (await send(transport, idle)).outcome is tx.Outcome.DELIVERED
    first = last_port(idle)
    assert open_here(first)

    clock.now += IDLE
    assert (await send(transport, other)).outcome is tx.Outcome.DELIVERED
    await closed(first)
    again = await send(transport, idle)

    assert again.outcome is tx.Outcome.DELIVERED
    assert len(idle.received) == 2
    assert last_port(idle) != first
    assert open_here(last_port(other))


async def test_a_channel_with_a_call_in_flight_outlives_a_sweep_that_closes_idle_ones(
    clock: Clock,
    transport: grpc_transport.GrpcTransport,
    start: Start,
) -> None:
    """A call that started before the idle threshold and is still in flight when a sweep runs
    keeps its channel: the sweep closes an idle channel beside it, the held call is answered
    DELIVERED, and the next send to that endpoint goes over the same connection."""
    holding = await start(Holding())
    idle, other = await start(FakeSubscriber()), await start(FakeSubscriber())
    held = asyncio.create_task(send(transport, holding))
    async with asyncio.timeout(DEADLINE):
        await holding.arrived.wait()
    # Opened after the held call's channel: a sweep closes channels in the order they were
    # opened, so one that closed the held call's channel did so before it closed this one.
    assert (await send(transport, idle)).outcome is tx.Outcome.DELIVERED

    clock.now += IDLE
    assert (await send(transport, other)).outcome is tx.Outcome.DELIVERED
    await closed(last_port(idle))
    holding.release.set()
    result = await held
    after = await send(transport, holding)

    assert result.outcome is tx.Outcome.DELIVERED
    assert after.outcome is tx.Outcome.DELIVERED
    assert holding.received[0].peer == holding.received[1].peer


async def test_close_closes_every_channel_after_a_sweep_closed_one(
    clock: Clock,
    transport: grpc_transport.GrpcTransport,
    start: Start,
) -> None:
    """After a sweep closed an idle channel and a later send opened a new one, close() closes
    every channel left: the new one, the one the sweep kept, and one with a call in flight,
    which it cancels (a sweep would have left that one)."""
    holding = await start(Holding())
    idle, other = await start(FakeSubscriber()), await start(FakeSubscriber())
    assert (await send(transport, idle)).outcome is tx.Outcome.DELIVERED
    replaced = last_port(idle)
    clock.now += IDLE
    assert (await send(transport, other)).outcome is tx.Outcome.DELIVERED
    await closed(replaced)
    assert (await send(transport, idle)).outcome is tx.Outcome.DELIVERED
    held = asyncio.create_task(send(transport, holding))
    async with asyncio.timeout(DEADLINE):
        await holding.arrived.wait()
    ports = [last_port(idle), last_port(other), holding.arrived_from]
    assert all(open_here(port) for port in ports)

    await transport.close()

    with pytest.raises(asyncio.CancelledError):
        await held
    for port in ports:
        await closed(port)
