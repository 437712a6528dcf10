"""Fixtures of the integration tests: an HTTP subscriber, and publishers with a client each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio
import pytest

from common.gen.webhooks.v1 import publisher_pb2_grpc
from publisher.app import PublisherApp
from tests.receiver import Receiver, running_receiver
from tests.support import LOOPBACK, OpenPublisher, Running


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as server:
        yield server


@pytest.fixture
async def open_publisher(
    start_publisher: Callable[..., Awaitable[PublisherApp]],
) -> AsyncIterator[OpenPublisher]:
    """Starts a publisher (loopback allowed unless ``allow_cidrs`` says otherwise) with a client."""
    channels: list[grpc.aio.Channel] = []

    async def open_(**overrides: Any) -> Running:
        overrides.setdefault("allow_cidrs", LOOPBACK)
        app = await start_publisher(**overrides)
        channel = grpc.aio.insecure_channel(app.address)
        channels.append(channel)
        return Running(app, publisher_pb2_grpc.PublisherServiceStub(channel))

    yield open_
    for channel in channels:
        await channel.close(None)
