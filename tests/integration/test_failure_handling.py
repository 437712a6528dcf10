"""What the publisher does when deliveries go wrong, end to end in one process.

Asking the subscriber before guessing (uncertain attempts, resends, the last
attempt of a schedule), the periodic reconciliation sweep, dead-letter digests
and disable notices by email to a real SMTP server (aiosmtpd, served from the
test's own loop on 127.0.0.1), automatic disabling, replays and the catch-up
feed. Real gRPC servers on port 0; each test runs on an SQLite file and on
PostgreSQL (the parametrised ``database_url`` fixture).
"""

from __future__ import annotations

import asyncio
import collections
import email
import email.policy
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import pytest
from aiosmtpd.smtp import SMTP
from google.protobuf import timestamp_pb2

from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher import mailer
from publisher.app import PublisherApp
from tests.integration.test_publisher_delivery import (
    break_secret,
    delivery_in,
    emit,
    only_delivery,
    register,
    schedule,
    set_state,
)
from tests.support import FakeSubscriber, catch_up_metadata, eventually

if TYPE_CHECKING:
    Stub = publisher_pb2_grpc.PublisherServiceAsyncStub

T = TypeVar("T")

DELIVERED = publisher_pb2.DELIVERY_STATE_DELIVERED
PENDING = publisher_pb2.DELIVERY_STATE_PENDING
FAILED = publisher_pb2.DELIVERY_STATE_FAILED
UNCERTAIN = publisher_pb2.ATTEMPT_OUTCOME_UNCERTAIN
CONFIRMED = publisher_pb2.ATTEMPT_OUTCOME_CONFIRMED
ATTEMPT_DELIVERED = publisher_pb2.ATTEMPT_OUTCOME_DELIVERED
ATTEMPT_FAILED = publisher_pb2.ATTEMPT_OUTCOME_FAILED

PARTNER = "partner@example.com"
OPERATOR = "ops@example.com"
# The retry of the tests that wait for the publisher to act on its own initiative (the sweep,
# a re-enable): an hour, so that no test deadline comes near it and a result within the
# deadline cannot be the retry's. (With a minute and a 5 s deadline, a slow machine could
# fail them with nothing wrong.)
AN_HOUR = 3600.0


# -- a publisher with chosen settings, and a subscriber that is not up --------------------------

Start = Callable[..., Awaitable["Stub"]]


@pytest.fixture
async def start(
    start_publisher: Callable[..., Awaitable[PublisherApp]],
) -> AsyncIterator[Start]:
    """Starts a publisher with these settings (on this test's database) and returns a client."""
    channels: list[grpc.aio.Channel] = []

    async def started(**settings: Any) -> Stub:
        app = await start_publisher(**settings)
        channel = grpc.aio.insecure_channel(app.address)
        channels.append(channel)
        return publisher_pb2_grpc.PublisherServiceStub(channel)

    yield started
    for channel in channels:
        await channel.close(None)


# A subscriber that never comes back is a port that refuses connections (the ``nowhere``
# fixture). One that comes back refuses with UNAVAILABLE while it is "down" instead: to the
# publisher both are failed attempts, but a stopped one that comes back would leave the
# publisher's gRPC channel in its reconnect backoff for up to 2 s, failing the next attempts
# without trying, and that timing, not the behaviour under test, would decide the outcome.
def endpoint_of(fake: FakeSubscriber) -> str:
    return f"127.0.0.1:{fake.port}"


async def _value(value: T) -> T:
    return value


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def first_attempt_recorded(stub: Stub, event_id: str) -> publisher_pb2.Delivery:
    async def attempted() -> publisher_pb2.Delivery | None:
        delivery = await only_delivery(stub, event_id)
        return delivery if delivery.attempts else None

    return await eventually(attempted, what=f"the first attempt of {event_id} is recorded")


# -- a real SMTP server --------------------------------------------------------------------------


@dataclass
class Mail:
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        content: str = self.message.get_content()
        return content


@dataclass
class Inbox:
    """An aiosmtpd handler that keeps every message it is given."""

    mails: list[Mail] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.mails.append(Mail(rcpt_tos=list(envelope.rcpt_tos), message=parsed))
        return "250 Message accepted for delivery"

    def about(self, name: str) -> list[Mail]:
        """The mails whose subject names the subscriber ``name``."""
        return [mail for mail in self.mails if f'"{name}"' in mail.subject]


class SmtpServer:
    """aiosmtpd on 127.0.0.1, served from the test's loop; not listening until started."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self.inbox, hostname="smtp.test", loop=loop), "127.0.0.1", port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def settings(self) -> mailer.SmtpSettings:
        return mailer.SmtpSettings(
            host="127.0.0.1", port=self.port, operator_email=OPERATOR, timeout=5.0
        )

    async def mails_about(self, name: str) -> list[Mail]:
        """Waits until mail about the subscriber ``name`` arrived, and returns all there is."""
        return await eventually(lambda: _value(self.inbox.about(name)), what=f"mail about {name!r}")


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    server = SmtpServer()
    yield server
    await server.stop()


# -- asking before guessing ---------------------------------------------------------------------


async def test_an_attempt_that_timed_out_after_arriving_is_confirmed_by_status_not_resent(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """A subscriber that stored the event and then hung past the deadline is asked, says it has
    it, and the delivery is DELIVERED by one CONFIRMED attempt; it is never sent twice."""
    stub = await start(delivery_timeout=0.3)
    subscriber.hang = 2
    await register(stub, endpoint_of(subscriber))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert [a.outcome for a in delivery.attempts] == [CONFIRMED]
    assert "confirmed by status" in delivery.attempts[0].error
    assert subscriber.calls == [("receive", emitted.event_id), ("status", emitted.event_id)]
    assert subscriber.event_ids() == [emitted.event_id]


async def test_an_uncertain_attempt_that_did_not_arrive_is_asked_about_then_sent_again(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """An uncertain attempt the subscriber does not have leaves the delivery PENDING; the retry
    asks first, hears "unknown", and only then sends: outcomes UNCERTAIN, DELIVERED."""
    stub = await start(delivery_timeout=0.3)
    subscriber.lose_next = 1
    await register(stub, endpoint_of(subscriber), retry_schedule=schedule(0.5, 60))
    emitted = await emit(stub)

    # Not looked at in between: the retry comes 0.5 s after the first attempt, and a loaded
    # machine may poll after it. The second attempt shows the delivery stayed PENDING.
    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert [a.outcome for a in delivery.attempts] == [UNCERTAIN, ATTEMPT_DELIVERED]
    event_id = emitted.event_id
    assert subscriber.calls == [
        ("receive", event_id),
        ("status", event_id),  # after the uncertain attempt
        ("status", event_id),  # before the resend
        ("receive", event_id),
    ]


async def test_the_last_attempt_asks_before_dead_lettering_and_confirms_what_arrived(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """A subscriber that stores the event but answers an error on every attempt is asked after
    the schedule's last attempt: the delivery ends DELIVERED (CONFIRMED), not FAILED."""
    stub = await start(delivery_timeout=5.0)
    subscriber.fail_with = grpc.StatusCode.UNAVAILABLE
    subscriber.fail_after_accepting = True
    await register(stub, endpoint_of(subscriber), retry_schedule=schedule(0.1, 0.2))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert [a.outcome for a in delivery.attempts] == [ATTEMPT_FAILED, ATTEMPT_FAILED, CONFIRMED]
    assert "confirmed by status" in delivery.attempts[-1].error
    assert subscriber.calls[-2:] == [("receive", emitted.event_id), ("status", emitted.event_id)]
    assert len(subscriber.received) == 3


async def test_the_last_attempt_asks_and_dead_letters_what_never_arrived(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """A subscriber that never stores the event is asked once, after the last attempt, and the
    delivery is FAILED after len(schedule) + 1 attempts."""
    stub = await start(delivery_timeout=5.0)
    subscriber.fail_with = grpc.StatusCode.UNAVAILABLE
    await register(stub, endpoint_of(subscriber), retry_schedule=schedule(0.1, 0.2))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, FAILED)
    assert delivery.attempt_count == 3
    assert [a.outcome for a in delivery.attempts] == [ATTEMPT_FAILED] * 3
    assert subscriber.status_asked == [emitted.event_id]
    assert subscriber.calls[-1] == ("status", emitted.event_id)
    assert len(subscriber.received) == 3


async def test_the_reconciliation_sweep_confirms_an_uncertain_delivery_long_before_its_retry(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """With a sweep every 0.2 s, an uncertain delivery whose retry is an hour away is confirmed
    as soon as the subscriber reports having it, and the sweep's questions never resend it."""
    stub = await start(delivery_timeout=0.3, reconcile_interval=0.2)
    subscriber.lose_next = 1
    await register(stub, endpoint_of(subscriber), retry_schedule=schedule(AN_HOUR))
    emitted = await emit(stub)
    event_id = emitted.event_id

    first = await first_attempt_recorded(stub, event_id)
    assert [a.outcome for a in first.attempts] == [UNCERTAIN]
    # The sweep asks again while the subscriber still says "unknown"...
    await eventually(
        lambda: _value(len(subscriber.status_asked) >= 2), what="the sweep asks the subscriber"
    )
    # ...and later the subscriber has it (say its own catch-up found the event).
    subscriber.accepted.add(event_id)

    async def delivered() -> publisher_pb2.Delivery | None:
        delivery = await only_delivery(stub, event_id)
        return delivery if delivery.state == DELIVERED else None

    delivery = await eventually(delivered, what="confirmed by the sweep")
    assert subscriber.event_ids() == [event_id], f"sent again: {subscriber.calls}"
    assert delivery.attempts[-1].outcome == CONFIRMED
    assert "confirmed by status" in delivery.attempts[-1].error


async def test_one_delivery_that_cannot_be_asked_about_does_not_stop_the_sweep_for_others(
    start: Start, subscriber: FakeSubscriber, database_url: str
) -> None:
    """Two uncertain deliveries in one sweep; one subscriber's secret cannot sign (written
    around the API). The other is still confirmed promptly, and nothing is sent again."""
    stub = await start(delivery_timeout=0.3, reconcile_interval=0.2)
    other = FakeSubscriber()
    await other.start()
    try:
        emitted, subscriber_ids = {}, {}
        for fake, name in ((subscriber, "good"), (other, "broken")):
            fake.lose_next = 1
            registered = await register(
                stub,
                endpoint_of(fake),
                name=name,
                event_types=[f"{name}.event"],
                retry_schedule=schedule(AN_HOUR),
            )
            subscriber_ids[name] = registered.subscriber.id
            emitted[name] = (await emit(stub, f"{name}.event")).event_id
            await first_attempt_recorded(stub, emitted[name])
        await break_secret(database_url, subscriber_ids["broken"])
        subscriber.accepted.add(emitted["good"])

        async def confirmed() -> publisher_pb2.Delivery | None:
            delivery = await only_delivery(stub, emitted["good"])
            return delivery if delivery.state == DELIVERED else None

        delivery = await eventually(confirmed, what="the good one confirmed")
        assert delivery.attempts[-1].outcome == CONFIRMED
        assert subscriber.event_ids() == [emitted["good"]]
        broken = await only_delivery(stub, emitted["broken"])
        assert broken.state == PENDING
        assert [a.outcome for a in broken.attempts] == [UNCERTAIN]
        assert other.event_ids() == [emitted["broken"]]
    finally:
        await other.stop()


# -- people at the end: dead-letter digests ------------------------------------------------------


async def fail_one_for_a_witness(stub: Stub, smtp: SmtpServer, endpoint: str, name: str) -> None:
    """Dead-letters a delivery to a new subscriber ``name`` and waits for its digest: proof that
    a notifier round began after this call did, and sent what it owed."""
    await register(
        stub,
        endpoint,
        name=name,
        event_types=[f"witness.{name}"],
        retry_schedule=schedule(0.1),
        contact_email=f"{name}@example.com",
    )
    emitted = await emit(stub, f"witness.{name}")
    await delivery_in(stub, emitted.event_id, FAILED)
    await smtp.mails_about(name)


async def test_an_exhausted_delivery_sends_one_digest_per_window_to_contact_and_operators(
    start: Start, nowhere: str, smtp: SmtpServer
) -> None:
    """A delivery that used up its schedule is emailed to the subscriber's contact and to the
    operators, naming the subscriber, the event, the delivery and the Redeliver command; a
    second dead letter while the window is open sends nothing more."""
    await smtp.start()
    stub = await start(smtp=smtp.settings(), notify_interval=0.2, notify_window=3600)
    await register(
        stub,
        nowhere,
        name="billing",
        event_types=["order.*"],
        retry_schedule=schedule(0.1, 0.2),
        contact_email=PARTNER,
    )
    first = await emit(stub)

    failed = await delivery_in(stub, first.event_id, FAILED)
    (digest,) = await smtp.mails_about("billing")
    assert digest.rcpt_tos == [PARTNER, OPERATOR]
    assert digest.message["To"] == f"{PARTNER}, {OPERATOR}"
    assert '"billing"' in digest.subject
    assert "failed" in digest.subject
    assert first.event_id in digest.body
    assert failed.id in digest.body
    assert "webhooks.v1.PublisherService/Redeliver" in digest.body
    assert f'"delivery_id": "{failed.id}"' in digest.body

    second = await emit(stub)
    await delivery_in(stub, second.event_id, FAILED)
    # The round that sent the first witness's digest saw billing's second dead letter; the
    # second witness's digest comes from a later round, so that round had ended by then.
    await fail_one_for_a_witness(stub, smtp, nowhere, "witness-1")
    await fail_one_for_a_witness(stub, smtp, nowhere, "witness-2")
    assert len(smtp.inbox.about("billing")) == 1


async def test_a_digest_that_could_not_be_sent_is_sent_once_the_smtp_server_is_up(
    start: Start, nowhere: str, smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the SMTP server down when a delivery is dead-lettered, the failed send is logged and
    the digest arrives after the server comes up."""
    caplog.set_level(logging.WARNING, logger="publisher.notifier")

    def send_failed() -> list[logging.LogRecord]:
        return [
            record
            for record in caplog.records
            if record.name == "publisher.notifier" and record.getMessage() == "email_failed"
        ]

    with socket.socket() as reserved:
        # Bound but not listening: every connection to the port is refused, and it stays ours.
        reserved.bind(("127.0.0.1", 0))
        smtp.port = reserved.getsockname()[1]
        stub = await start(smtp=smtp.settings(), notify_interval=0.2)
        await register(
            stub,
            nowhere,
            name="billing",
            retry_schedule=schedule(0.1),
            contact_email=PARTNER,
        )
        emitted = await emit(stub)
        failed = await delivery_in(stub, emitted.event_id, FAILED)
        records = await eventually(lambda: _value(send_failed()), what="email_failed is logged")
        assert "connection refused" in getattr(records[0], "fields", {})["error"]
    await smtp.start(smtp.port)

    (digest,) = await smtp.mails_about("billing")
    assert digest.rcpt_tos == [PARTNER, OPERATOR]
    assert failed.id in digest.body


# -- automatic disabling -------------------------------------------------------------------------


async def disabled_after_failing(
    stub: Stub, subscriber: FakeSubscriber
) -> tuple[publisher_pb2.Subscriber, publisher_pb2.EmitResponse]:
    """Registers ``subscriber``, refusing every delivery, with a retry an hour away, emits an
    event, and waits until the publisher disables it; returns it and the event."""
    subscriber.fail_with = grpc.StatusCode.UNAVAILABLE
    registered = await register(
        stub,
        endpoint_of(subscriber),
        name="billing",
        retry_schedule=schedule(AN_HOUR),
        contact_email=PARTNER,
    )
    emitted = await emit(stub)
    request = publisher_pb2.GetSubscriberRequest(subscriber_id=registered.subscriber.id)

    async def disabled() -> publisher_pb2.Subscriber | None:
        found = (await stub.GetSubscriber(request)).subscriber
        return found if found.state == publisher_pb2.SUBSCRIBER_STATE_DISABLED else None

    return await eventually(disabled, what="the subscriber is disabled"), emitted


async def test_a_subscriber_failing_for_disable_after_is_disabled_told_and_resumed(
    start: Start, subscriber: FakeSubscriber, smtp: SmtpServer
) -> None:
    """A subscriber whose deliveries have only failed for ``disable_after`` is disabled with a
    reason and a notice by email; new events still get (held) deliveries, and re-enabling it
    once it is up delivers them."""
    await smtp.start()
    stub = await start(smtp=smtp.settings(), notify_interval=0.2, disable_after=0.5)
    disabled, first = await disabled_after_failing(stub, subscriber)
    assert "failed since" in disabled.state_reason

    (notice,) = await smtp.mails_about("billing")
    assert "disabled" in notice.subject
    assert notice.rcpt_tos == [PARTNER, OPERATOR]
    waiting = await only_delivery(stub, first.event_id)
    assert waiting.state == PENDING
    assert waiting.attempt_count == 1

    held = await emit(stub)
    assert held.delivery_count == 1
    delivery = await only_delivery(stub, held.event_id)
    assert delivery.state == PENDING
    assert delivery.attempt_count == 0

    subscriber.fail_with = None
    active = await set_state(stub, disabled.id, publisher_pb2.SUBSCRIBER_STATE_ACTIVE)
    assert active.state_reason == ""
    delivered = await delivery_in(stub, held.event_id, DELIVERED)
    assert [a.outcome for a in delivered.attempts] == [ATTEMPT_DELIVERED]
    # The delivery that was waiting for a retry goes out again at once as well.
    await delivery_in(stub, first.event_id, DELIVERED)
    assert sorted(subscriber.event_ids()) == sorted([first.event_id] * 2 + [held.event_id])


async def test_re_enabling_delivers_at_once_a_delivery_held_while_it_waited_for_a_retry(
    start: Start, subscriber: FakeSubscriber, smtp: SmtpServer
) -> None:
    """The delivery that was waiting for its retry (an hour away) when the subscriber was
    disabled is held like the rest, and is delivered at once when the subscriber is re-enabled."""
    await smtp.start()
    stub = await start(smtp=smtp.settings(), notify_interval=0.2, disable_after=0.5)
    disabled, first = await disabled_after_failing(stub, subscriber)

    subscriber.fail_with = None
    await set_state(stub, disabled.id, publisher_pb2.SUBSCRIBER_STATE_ACTIVE)

    async def delivered() -> publisher_pb2.Delivery | None:
        delivery = await only_delivery(stub, first.event_id)
        return delivery if delivery.state == DELIVERED else None

    await eventually(delivered, what="the held delivery is delivered")
    assert subscriber.event_ids() == [first.event_id] * 2


# -- replays ------------------------------------------------------------------------------------


async def test_replay_requeues_failed_deliveries_and_by_type_delivered_ones_too(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """Replaying a subscriber since the beginning requeues its two FAILED deliveries, which are
    then delivered; replaying by event type requeues every matching delivery, delivered ones
    included, and the subscriber receives them again."""
    stub = await start()
    subscriber.fail_with = grpc.StatusCode.UNAVAILABLE
    registered = await register(stub, endpoint_of(subscriber), retry_schedule=schedule(0.1, 0.2))
    first, second = await emit(stub), await emit(stub)
    for emitted in first, second:
        await delivery_in(stub, emitted.event_id, FAILED)
    subscriber.fail_with = None
    subscriber.received.clear()
    other = await emit(stub, "user.created")
    await delivery_in(stub, other.event_id, DELIVERED)

    replayed = await stub.ReplayDeliveries(
        publisher_pb2.ReplayDeliveriesRequest(
            subscriber_id=registered.subscriber.id, since=timestamp_pb2.Timestamp()
        )
    )
    assert replayed.requeued_count == 2
    for emitted in first, second:
        await delivery_in(stub, emitted.event_id, DELIVERED)
    ids = first.event_id, second.event_id, other.event_id
    assert collections.Counter(subscriber.event_ids()) == dict.fromkeys(ids, 1)

    by_type = await stub.ReplayDeliveries(
        publisher_pb2.ReplayDeliveriesRequest(
            since=timestamp_pb2.Timestamp(), event_types=["order.*"]
        )
    )
    assert by_type.requeued_count == 2
    twice = {first.event_id: 2, second.event_id: 2, other.event_id: 1}
    await eventually(
        lambda: _value(collections.Counter(subscriber.event_ids()) == twice),
        what="both order events are received again",
    )
    for emitted in first, second:
        await delivery_in(stub, emitted.event_id, DELIVERED)


async def test_replay_needs_a_subscriber_or_event_types_and_a_known_subscriber(
    start: Start,
) -> None:
    """A replay naming neither a subscriber nor event types is INVALID_ARGUMENT naming
    subscriber_id; one naming an unknown subscriber is NOT_FOUND."""
    stub = await start()
    error = await rpc_error(stub.ReplayDeliveries(publisher_pb2.ReplayDeliveriesRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subscriber_id" in (error.details() or "")

    error = await rpc_error(
        stub.ReplayDeliveries(publisher_pb2.ReplayDeliveriesRequest(subscriber_id="sub_missing"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_redeliver_of_a_failed_delivery_delivers_it(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """Redeliver gives a FAILED delivery a fresh schedule, and it is delivered."""
    stub = await start()
    subscriber.fail_with = grpc.StatusCode.UNAVAILABLE
    await register(stub, endpoint_of(subscriber), retry_schedule=schedule(0.1))
    emitted = await emit(stub)
    failed = await delivery_in(stub, emitted.event_id, FAILED)
    subscriber.fail_with = None

    await stub.Redeliver(publisher_pb2.RedeliverRequest(delivery_id=failed.id))
    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert [a.outcome for a in delivery.attempts] == [
        ATTEMPT_FAILED,
        ATTEMPT_FAILED,
        ATTEMPT_DELIVERED,
    ]
    assert subscriber.event_ids() == [emitted.event_id] * 3


# -- the catch-up feed ---------------------------------------------------------------------------


async def test_catch_up_feed_lists_the_subscribers_events_in_order_page_by_page(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """With its own token a subscriber lists exactly the events it was meant to get, in emit
    order; pages follow next_cursor, and past the end the page is empty and the cursor stays."""
    stub = await start()
    registered = await register(stub, endpoint_of(subscriber), event_types=["order.*"])
    types = ["order.paid", "user.created", "order.shipped", "user.deleted", "order.refunded"]
    emitted = [await emit(stub, event_type) for event_type in types]
    expected = [e.event_id for e, t in zip(emitted, types, strict=True) if t.startswith("order.")]
    subscriber_id = registered.subscriber.id
    auth = catch_up_metadata(registered.secret, subscriber_id)

    def page(cursor: str = "", size: int = 0) -> Awaitable[publisher_pb2.ListEventsResponse]:
        request = publisher_pb2.ListEventsRequest(
            subscriber_id=subscriber_id, cursor=cursor, page_size=size
        )
        return stub.ListEvents(request, metadata=auth)

    everything = await page()
    assert [e.id for e in everything.events] == expected
    assert [e.type for e in everything.events] == ["order.paid", "order.shipped", "order.refunded"]

    first = await page(size=2)
    second = await page(first.next_cursor, size=2)
    end = await page(second.next_cursor, size=2)
    assert [e.id for e in first.events] == expected[:2]
    assert [e.id for e in second.events] == expected[2:]
    assert list(end.events) == []
    assert end.next_cursor == second.next_cursor


async def test_catch_up_feed_refuses_other_tokens_and_bad_cursors(
    start: Start, subscriber: FakeSubscriber
) -> None:
    """No token, another subscriber's token, a token for another audience and an expired token
    are UNAUTHENTICATED; a cursor the feed never returned is INVALID_ARGUMENT naming cursor."""
    stub = await start()
    registered = await register(stub, endpoint_of(subscriber))
    other = await register(stub, endpoint_of(subscriber), name="other")
    await emit(stub)
    mine, secret = registered.subscriber.id, registered.secret
    request = publisher_pb2.ListEventsRequest(subscriber_id=mine)

    refused = {
        "no token": (),
        "another subscriber's token": catch_up_metadata(other.secret, other.subscriber.id),
        "my key, another subscriber's id": catch_up_metadata(secret, other.subscriber.id),
        "another audience": catch_up_metadata(secret, mine, audience="someone-else"),
        "expired": catch_up_metadata(secret, mine, now=time.time() - 3600),
    }
    for case, metadata in refused.items():
        error = await rpc_error(stub.ListEvents(request, metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, case

    bad_cursor = publisher_pb2.ListEventsRequest(subscriber_id=mine, cursor="abc")
    error = await rpc_error(stub.ListEvents(bad_cursor, metadata=catch_up_metadata(secret, mine)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cursor" in (error.details() or "")
    page = await stub.ListEvents(request, metadata=catch_up_metadata(secret, mine))
    assert len(page.events) == 1
