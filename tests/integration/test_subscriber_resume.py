"""Events recorded but never handled, by a crash between the inbox's commit and the handler or by
a stop that outlasted its grace period, are handled when the subscriber starts again: the app is
constructed twice on one SQLite file, as a restart does, with a real gRPC server on port 0."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

import grpc
import grpc.aio
import pytest

from common import db, grpc_server
from common.gen.webhooks.v1 import event_pb2, subscriber_pb2, subscriber_pb2_grpc
from subscriber import app, handlers, inbox, settings
from tests.subscriber_apps import Handled, delivery_token
from tests.support import eventually

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
AUDIENCE = "sub_resume"
PAYLOAD = b'{"order":1}'
DEADLINE_SECONDS = 20.0


class Start(Protocol):
    async def __call__(self, handler: handlers.Handler) -> app.SubscriberApp: ...


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "inbox.db"


@pytest.fixture
async def start(database: Path) -> AsyncIterator[Start]:
    """Starts subscribers on ``database``, one after another as restarts; stops those left."""
    running: list[app.SubscriberApp] = []

    async def started(handler: handlers.Handler) -> app.SubscriberApp:
        config = settings.parse(
            [
                "--listen=127.0.0.1:0",
                "--http-listen=off",
                f"--database-url=sqlite:///{database}",
                f"--secret={SECRET}",
                f"--audience={AUDIENCE}",
            ]
        )
        subscriber = app.SubscriberApp(config, handler=handler)
        await subscriber.start()
        running.append(subscriber)
        return subscriber

    yield started
    # Stopping one a test stopped already does nothing more.
    for subscriber in running:
        await subscriber.stop()


def entry(event_id: str) -> inbox.Entry:
    return inbox.Entry(
        event_id=event_id,
        event_type="order.created",
        payload=PAYLOAD,
        content_type="application/json",
        created_at=1_700_000_000.0,
        delivery_id="dlv_" + event_id,
        attempt=2,
    )


async def crashed_after_recording(
    database: Path, *event_ids: str, clock: Callable[[], float] | None = None
) -> None:
    """What a process that died right after its inbox commits leaves: the events recorded,
    "received", and no handler run."""
    engine = db.create_engine(f"sqlite:///{database}")
    store = inbox.Inbox(engine) if clock is None else inbox.Inbox(engine, clock=clock)
    await store.start()
    for event_id in event_ids:
        assert await store.record(entry(event_id))
    await store.stop()
    await engine.dispose()


async def deliver(
    subscriber: app.SubscriberApp, event_id: str, deadline: float = DEADLINE_SECONDS
) -> bool:
    """Receive over gRPC with a PyJWT token; True if the subscriber called it a duplicate."""
    event = event_pb2.Event(
        id=event_id, type="order.created", payload=PAYLOAD, content_type="application/json"
    )
    token = delivery_token(event_id, PAYLOAD, key=KEY, audience=AUDIENCE)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{subscriber.grpc_port}") as channel:
        response = await subscriber_pb2_grpc.SubscriberServiceStub(channel).Receive(
            subscriber_pb2.ReceiveRequest(event=event, delivery_id="dlv_again", attempt=3),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=deadline,
        )
    return response.duplicate


async def states(subscriber: app.SubscriberApp, *event_ids: str) -> list[inbox.State | None]:
    receipts = [await subscriber.inbox.status(event_id) for event_id in event_ids]
    return [None if receipt is None else receipt.state for receipt in receipts]


def settled(
    subscriber: app.SubscriberApp, *event_ids: str
) -> Callable[[], Awaitable[list[inbox.State | None] | None]]:
    """A check for ``eventually``: the events' states once none is "received" any more."""

    async def check() -> list[inbox.State | None] | None:
        found = await states(subscriber, *event_ids)
        return None if inbox.State.RECEIVED in found or None in found else found

    return check


async def test_an_event_recorded_before_a_crash_is_handled_on_the_next_start(
    start: Start, database: Path
) -> None:
    """The handler runs once on the recorded event, as last delivered, and it ends processed."""
    await crashed_after_recording(database, "evt_1")
    handled = Handled()

    subscriber = await start(handled)

    assert await eventually(settled(subscriber, "evt_1")) == [inbox.State.PROCESSED]
    assert handled.entries == [entry("evt_1")]


async def test_an_event_whose_handler_outlasted_the_stop_grace_is_handled_after_a_restart(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first process stops while the handler still runs, and exits with it unfinished: the
    event stays "received", a redelivery would only be a duplicate, so the next start handles it."""
    monkeypatch.setattr(grpc_server, "GRACE_SECONDS", 0.2)
    began, exits, ended = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def unfinished(entry: inbox.Entry) -> None:
        began.set()
        await exits.wait()
        ended.set()
        # The process is gone: nothing after this point of the handler runs.
        raise asyncio.CancelledError

    first = await start(unfinished)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await deliver(first, "evt_1", deadline=0.5)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(began.wait(), DEADLINE_SECONDS)
    await first.stop()
    exits.set()
    # Bounded: a stop that cancelled the handler would leave this unset for ever.
    await asyncio.wait_for(ended.wait(), DEADLINE_SECONDS)

    handled = Handled()
    second = await start(handled)

    assert await eventually(settled(second, "evt_1")) == [inbox.State.PROCESSED]
    assert await deliver(second, "evt_1") is True
    assert [e.event_id for e in handled.entries] == ["evt_1"]


async def test_unhandled_events_are_handled_in_recorded_order_and_a_failure_is_marked_failed(
    start: Start, database: Path
) -> None:
    """Oldest first, whatever their ids; a handler that raises leaves its event failed, and an
    event handled before the crash is not handled again."""
    times: Iterator[float] = iter([1.0, 2.0, 3.0, 4.0])
    await crashed_after_recording(database, "evt_c", "evt_a", "evt_b", clock=lambda: next(times))
    engine = db.create_engine(f"sqlite:///{database}")
    store = inbox.Inbox(engine)
    await store.start()
    await store.mark("evt_b", inbox.State.PROCESSED)
    await store.stop()
    await engine.dispose()
    order: list[str] = []

    async def handler(entry: inbox.Entry) -> None:
        order.append(entry.event_id)
        if entry.event_id == "evt_a":
            raise RuntimeError("handler bug")

    subscriber = await start(handler)

    assert await eventually(settled(subscriber, "evt_c", "evt_a", "evt_b")) == [
        inbox.State.PROCESSED,
        inbox.State.FAILED,
        inbox.State.PROCESSED,
    ]
    assert order == ["evt_c", "evt_a"]


async def test_deliveries_during_the_resume_run_each_handler_once(
    start: Start, database: Path
) -> None:
    """While the resume holds its first event, redeliveries of it and of the next are duplicates
    and a new event is handled by its own delivery: after it, each was handled exactly once."""
    await crashed_after_recording(database, "evt_1", "evt_2")
    release = asyncio.Event()
    handled = Handled()

    async def held(entry: inbox.Entry) -> None:
        await handled(entry)
        if entry.event_id == "evt_1":
            await release.wait()

    subscriber = await start(held)
    await eventually(lambda: _value(handled.entries), what="the resume took up evt_1")

    duplicates = [await deliver(subscriber, event_id) for event_id in ("evt_1", "evt_2", "evt_3")]
    release.set()

    assert duplicates == [True, True, False]
    assert (
        await eventually(settled(subscriber, "evt_1", "evt_2", "evt_3"))
        == [inbox.State.PROCESSED] * 3
    )
    assert sorted(e.event_id for e in handled.entries) == ["evt_1", "evt_2", "evt_3"]


async def _value(value: list[inbox.Entry]) -> list[inbox.Entry]:
    return value
