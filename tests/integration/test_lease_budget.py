"""A lease outlasts the longest attempt, so the dispatcher never takes back its own delivery.

A resend after an uncertain attempt asks the subscriber first, sends, and asks again: three
steps with a deadline each. Against a subscriber that answers none of them, the attempt takes
all three deadlines; if the lease ran out first, the delivery would be claimed again while
still in flight, sent again off the schedule, and its outcome fenced off, for ever. Real
gRPC servers on port 0, on an SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from common import signing
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc, subscriber_pb2
from publisher import model
from publisher import transport as tx
from publisher.app import PublisherApp
from publisher.dispatcher import Dispatcher
from publisher.store import Store
from tests.integration.test_publisher_delivery import emit, only_delivery, register, schedule
from tests.support import LOST_CALL_SECONDS, FakeSubscriber, eventually, store_subscriber_spec

UNCERTAIN = publisher_pb2.ATTEMPT_OUTCOME_UNCERTAIN
PENDING = publisher_pb2.DELIVERY_STATE_PENDING
DEADLINE = 0.5


class Unresponsive(FakeSubscriber):
    """Takes every call and answers none: Receive and GetStatus both outlast any deadline."""

    async def GetStatus(
        self, request: subscriber_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> subscriber_pb2.GetStatusResponse:
        self.calls.append(("status", request.event_id))
        await asyncio.sleep(LOST_CALL_SECONDS)
        return subscriber_pb2.GetStatusResponse(state=subscriber_pb2.RECEIPT_STATE_UNKNOWN)


@pytest.fixture
async def unresponsive() -> AsyncIterator[Unresponsive]:
    fake = Unresponsive(lose_next=1_000_000)
    await fake.start()
    yield fake
    await fake.stop()


async def test_a_resend_nobody_answers_is_recorded_once_and_waits_for_its_retry(
    start_publisher: Callable[..., Awaitable[PublisherApp]], unresponsive: Unresponsive
) -> None:
    """Attempt 1 times out (uncertain); attempt 2 asks, sends and asks, each to its deadline.
    Its outcome is recorded, and the next attempt waits for the schedule's minute."""
    app = await start_publisher(delivery_timeout=DEADLINE)
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = publisher_pb2_grpc.PublisherServiceStub(channel)
        await register(
            stub, f"127.0.0.1:{unresponsive.port}", retry_schedule=schedule(0.2, 60, 120)
        )
        event_id = (await emit(stub)).event_id

        async def two_attempts_logged() -> publisher_pb2.Delivery | None:
            delivery = await only_delivery(stub, event_id)
            return delivery if len(delivery.attempts) >= 2 else None

        delivery = await eventually(two_attempts_logged, what="the resend's outcome is recorded")
        # Without a lease as long as the resend, attempt 2 was claimed again as attempt 3
        # before its outcome was written, and no second attempt was ever logged.
        assert [a.number for a in delivery.attempts] == [1, 2]
        assert [a.outcome for a in delivery.attempts] == [UNCERTAIN, UNCERTAIN]
        assert delivery.state == PENDING
        sent = [call for call in unresponsive.calls if call[0] == "receive"]
        assert sent == [("receive", event_id)] * 2


class Overrunning:
    """A transport whose send ignores its deadline."""

    def __init__(self) -> None:
        self.sent = asyncio.Event()

    async def send(self, attempt: tx.Attempt) -> tx.Result:
        self.sent.set()
        await asyncio.sleep(LOST_CALL_SECONDS)
        return tx.Result(tx.Outcome.DELIVERED)

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        return tx.Receipt.UNANSWERED

    async def close(self) -> None:
        return None


async def test_an_attempt_that_overruns_its_budget_is_cut_off_and_recorded_as_uncertain(
    store: Store,
) -> None:
    """A transport that ignores its deadline is stopped at the attempt's budget, inside the
    lease, and the outcome is written as uncertain (it may have been sent)."""
    dispatcher, overrunning, event_id = await _started(store, "overrun-test")
    try:
        delivery = await eventually(
            functools.partial(_logged, store, event_id),
            what="the overrunning attempt is recorded",
        )
    finally:
        await dispatcher.stop(grace=1.0)
    assert overrunning.sent.is_set()
    (attempt,) = delivery.log
    assert attempt.outcome == "uncertain"
    assert "budget" in attempt.error
    assert delivery.state == model.DeliveryState.PENDING


async def _started(store: Store, owner: str) -> tuple[Dispatcher, Overrunning, str]:
    """A subscriber, one event for it, and a started dispatcher whose sends overrun their
    deadline; and that event's id."""
    await store.create_subscriber(store_subscriber_spec("a", "a.*"), signing.generate_secret())
    (emitted,) = await store.emit([model.NewEvent("a.x", b"{}", "application/json", "")])
    overrunning = Overrunning()
    dispatcher = Dispatcher(
        store,
        {model.Protocol.GRPC: overrunning, model.Protocol.HTTP: overrunning},
        owner=owner,
        issuer="test",
        delivery_timeout=DEADLINE,
        max_in_flight=4,
        max_in_flight_per_subscriber=4,
        claim_batch=4,
    )
    assert dispatcher.attempt_budget < dispatcher.lease_seconds
    dispatcher.start()
    return dispatcher, overrunning, emitted.event_id


async def _logged(store: Store, event_id: str) -> model.Delivery | None:
    (delivery,) = await store.list_deliveries(model.DeliveryFilter(event_id=event_id), 10, "")
    full = await store.get_delivery(delivery.id)
    return full if full.log else None


async def test_a_send_started_later_is_cut_off_at_its_own_budget(store: Store) -> None:
    """One timer watches every send's budget: set for the first, it must set itself again
    for a send that started later and was still within its budget when the first ran out."""
    dispatcher, overrunning, first = await _started(store, "overrun-later")
    try:
        await eventually(lambda: _set(overrunning.sent), what="the first send")
        (second,) = await store.emit([model.NewEvent("a.y", b"{}", "application/json", "")])
        dispatcher.wake()
        logged = [
            await eventually(functools.partial(_logged, store, event_id), what="its outcome")
            for event_id in (first, second.event_id)
        ]
    finally:
        await dispatcher.stop(grace=1.0)
    for delivery in logged:
        (attempt,) = delivery.log
        assert (attempt.outcome, delivery.state) == ("uncertain", model.DeliveryState.PENDING)
        assert "budget" in attempt.error


async def test_a_send_cancelled_by_a_stop_is_given_back_not_recorded(store: Store) -> None:
    """The stop's cancel is not the budget's: the attempt is not written as uncertain, and
    the delivery is released to be sent again at once."""
    dispatcher, overrunning, event_id = await _started(store, "overrun-stop")
    try:
        await eventually(lambda: _set(overrunning.sent), what="the send")
    finally:
        await dispatcher.stop(grace=0.0)
    (delivery,) = await store.list_deliveries(model.DeliveryFilter(event_id=event_id), 10, "")
    full = await store.get_delivery(delivery.id)
    assert full.log == ()
    assert full.state == model.DeliveryState.PENDING
    assert await store.claim("next", 10, lease_seconds=60.0)


async def _set(flag: asyncio.Event) -> bool:
    return flag.is_set()
