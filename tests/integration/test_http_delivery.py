"""HTTP delivery through the whole publisher: emitted events reach a real aiohttp server on
127.0.0.1, are verified with independent libraries, and every outcome lands in the attempt log
(on SQLite and PostgreSQL, via the parametrised ``database_url`` fixture)."""

from __future__ import annotations

import base64
import hashlib
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import jwt
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from subscriber import app as subscriber_app
from subscriber import settings as subscriber_settings
from tests.integration.test_publisher_delivery import (
    DELIVERED,
    FAILED,
    PENDING,
    delivery_in,
    emit,
    only_delivery,
    register,
    schedule,
)
from tests.receiver import Answer, Receiver
from tests.support import LOOPBACK, OpenPublisher, eventually, key_of

if TYPE_CHECKING:
    Stub = publisher_pb2_grpc.PublisherServiceAsyncStub

HTTP = publisher_pb2.PROTOCOL_HTTP
FORM = publisher_pb2.BODY_FORMAT_FORM
# Non-ASCII and a character that form encoding must escape: the bytes must arrive unchanged.
PAYLOAD = '{"order": 42, "note": "café & co"}'.encode()
EVENT_TYPE = "order.paid"
OUTCOME_DELIVERED = publisher_pb2.ATTEMPT_OUTCOME_DELIVERED
OUTCOME_FAILED = publisher_pb2.ATTEMPT_OUTCOME_FAILED
OUTCOME_UNCERTAIN = publisher_pb2.ATTEMPT_OUTCOME_UNCERTAIN
OUTCOME_CONFIRMED = publisher_pb2.ATTEMPT_OUTCOME_CONFIRMED


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


async def emit_payload(stub: Stub, payload: bytes = PAYLOAD) -> publisher_pb2.EmitResponse:
    request = publisher_pb2.EmitRequest(type=EVENT_TYPE, payload=payload)
    response: publisher_pb2.EmitResponse = await stub.Emit(request)
    return response


def seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def jwt_claims(headers: dict[str, str], secret: str, audience: str) -> dict[str, Any]:
    """The delivery token's claims, checked by PyJWT alone."""
    scheme, _, token = headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    claims: dict[str, Any] = jwt.decode(
        token, key_of(secret), algorithms=["HS256"], audience=audience
    )
    return claims


# -- 1, 2: what arrives ------------------------------------------------------------------------


async def test_an_http_delivery_posts_the_exact_payload_signed_for_standard_webhooks_and_pyjwt(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """The POST carries the payload's exact bytes as JSON, both signatures verify independently,
    the headers name the event, delivery and attempt, and the publisher records DELIVERED 200."""
    stub = (await open_publisher()).stub
    secret = new_secret()
    registered = await register(stub, receiver.url("/hook"), protocol=HTTP, secret=secret)
    emitted = await emit_payload(stub)

    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    [request] = receiver.posts("/hook")
    assert request.body == PAYLOAD
    assert request.headers["content-type"] == "application/json"
    assert Webhook(secret).verify(request.body, request.headers) == {
        "order": 42,
        "note": "café & co",
    }
    claims = jwt_claims(request.headers, secret, registered.subscriber.id)
    assert claims["body_sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert claims["event_id"] == emitted.event_id
    assert claims["event_type"] == EVENT_TYPE
    assert claims["attempt"] == 1
    assert request.headers["webhook-id"] == emitted.event_id
    assert request.headers["webhook-event-type"] == EVENT_TYPE
    assert request.headers["webhook-delivery-id"] == delivery.id
    assert request.headers["webhook-attempt"] == "1"
    assert request.headers["user-agent"].startswith("grpc-webhooks/")
    assert [(a.outcome, a.status_code) for a in delivery.attempts] == [(OUTCOME_DELIVERED, 200)]


async def test_during_a_secret_rotation_each_valid_secret_signs_and_then_only_the_new_one(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """After RotateSecret the old and the new secret each verify a delivery (standardwebhooks),
    the JWT is the new secret's; once the old one expires, only the new one signs."""
    stub = (await open_publisher()).stub
    old = new_secret()
    registered = await register(stub, receiver.url("/hook"), protocol=HTTP, secret=old)
    subscriber_id = registered.subscriber.id
    new = new_secret()
    rotated = await stub.RotateSecret(
        publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id, secret=new)
    )
    assert rotated.secret == new
    assert seconds(rotated.previous_expires_at) > time.time() + 23 * 3600

    first = await emit_payload(stub)
    await delivery_in(stub, first.event_id, DELIVERED)
    [during] = receiver.posts("/hook")
    assert len(during.headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        Webhook(secret).verify(during.body, during.headers)
    assert jwt_claims(during.headers, new, subscriber_id)["event_id"] == first.event_id

    no_grace = duration_pb2.Duration(seconds=0)
    latest = await stub.RotateSecret(
        publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id, previous_valid_for=no_grace)
    )
    assert latest.secret.startswith("whsec_")
    second = await emit_payload(stub)
    await delivery_in(stub, second.event_id, DELIVERED)
    [_, after] = receiver.posts("/hook")
    assert len(after.headers["webhook-signature"].split()) == 1
    Webhook(latest.secret).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(after.body, after.headers)


async def test_an_update_during_a_rotation_keeps_the_previous_secret_signing(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """Renaming the subscriber mid-rotation must not cut short the old secret's grace:
    a partner still verifying with it would reject every delivery."""
    stub = (await open_publisher()).stub
    old = new_secret()
    registered = await register(stub, receiver.url("/hook"), protocol=HTTP, secret=old)
    subscriber_id = registered.subscriber.id
    await stub.RotateSecret(publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id))
    await stub.UpdateSubscriber(
        publisher_pb2.UpdateSubscriberRequest(
            subscriber=publisher_pb2.Subscriber(id=subscriber_id, name="renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )

    emitted = await emit_payload(stub)
    await delivery_in(stub, emitted.event_id, DELIVERED)
    [delivered] = receiver.posts("/hook")
    Webhook(old).verify(delivered.body, delivered.headers)


async def test_rotate_secret_refuses_bad_input_naming_the_field(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    stub = (await open_publisher()).stub
    registered = await register(stub, receiver.url("/hook"), protocol=HTTP)
    subscriber_id = registered.subscriber.id
    cases = [
        (publisher_pb2.RotateSecretRequest(), grpc.StatusCode.INVALID_ARGUMENT, "subscriber_id"),
        (
            publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id, secret="whsec_AAAA"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "secret",
        ),
        (
            publisher_pb2.RotateSecretRequest(
                subscriber_id=subscriber_id, previous_valid_for=duration_pb2.Duration(seconds=-1)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "previous_valid_for",
        ),
        (
            publisher_pb2.RotateSecretRequest(subscriber_id="sub_unknown"),
            grpc.StatusCode.NOT_FOUND,
            "subscriber_id",
        ),
    ]
    for request, code, named in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RotateSecret(request)
        assert caught.value.code() == code
        assert (caught.value.details() or "").startswith(f"{named}: ")


async def test_a_form_subscriber_gets_the_payload_in_a_form_field_signed_over_the_raw_form(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """BODY_FORMAT_FORM sends application/x-www-form-urlencoded with the payload in `payload`;
    the Standard Webhooks signature covers the form body, the JWT the payload."""
    stub = (await open_publisher()).stub
    secret = new_secret()
    registered = await register(
        stub, receiver.url("/form"), protocol=HTTP, body_format=FORM, secret=secret
    )
    emitted = await emit_payload(stub)

    await delivery_in(stub, emitted.event_id, DELIVERED)
    [request] = receiver.posts("/form")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = urllib.parse.parse_qs(request.body.decode("ascii"), strict_parsing=True)
    assert form == {"payload": [PAYLOAD.decode()]}
    Webhook(secret).verify(request.body, request.headers, json_parse=False)
    claims = jwt_claims(request.headers, secret, registered.subscriber.id)
    assert claims["body_sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


# -- 3: outcomes -------------------------------------------------------------------------------


async def test_a_500_is_retried_on_the_schedule_and_the_log_keeps_the_body_excerpt(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """A 500 then a 200 ends DELIVERED after two attempts: FAILED(500, body excerpt), DELIVERED."""
    stub = (await open_publisher()).stub
    endpoint = receiver.script(
        "/flaky", Answer(status=500, body="database is down"), Answer(status=200)
    )
    await register(stub, endpoint, protocol=HTTP, retry_schedule=schedule(0.1, 0.2, 5))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert [(a.number, a.outcome, a.status_code) for a in delivery.attempts] == [
        (1, OUTCOME_FAILED, 500),
        (2, OUTCOME_DELIVERED, 200),
    ]
    assert delivery.attempts[0].error == "HTTP 500: database is down"
    assert len(receiver.posts("/flaky")) == 2


async def test_every_delivery_in_flight_holds_its_own_connection(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """With --max-in-flight above the HTTP client's default pool of 100, a slow subscriber
    still gets every one of the deliveries in flight at once, rather than 100 and a queue."""
    in_flight = 120
    stub = (await open_publisher(max_in_flight=in_flight)).stub
    endpoint = receiver.script("/slow", Answer(hang=True))
    await register(stub, endpoint, protocol=HTTP)
    batch = [publisher_pb2.EmitRequest(type=EVENT_TYPE, payload=PAYLOAD)] * in_flight
    await stub.EmitBatch(publisher_pb2.EmitBatchRequest(events=batch))

    async def all_arrived() -> bool:
        return len(receiver.posts("/slow")) == in_flight

    await eventually(all_arrived, what=f"{in_flight} POSTs held open at once")


async def test_a_redirect_fails_every_attempt_and_its_target_is_never_requested(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """A 301 is a FAILED attempt saying the redirect was not followed; Location is never hit."""
    stub = (await open_publisher()).stub
    target = receiver.url("/target")
    endpoint = receiver.script("/moved", Answer(status=301, headers={"Location": target}))
    await register(stub, endpoint, protocol=HTTP, retry_schedule=schedule(0.05, 0.1))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, FAILED)
    assert [(a.outcome, a.status_code) for a in delivery.attempts] == [(OUTCOME_FAILED, 301)] * 3
    for attempt in delivery.attempts:
        assert "redirect not followed" in attempt.error
        assert target in attempt.error
    assert len(receiver.posts("/moved")) == 3
    assert [r for r in receiver.requests if r.path == "/target"] == []


async def test_retry_after_on_a_429_delays_the_next_attempt_beyond_the_schedule(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """`Retry-After: 1` on a 429 moves the retry due at 0.05 s to at least 1 s after the first."""
    stub = (await open_publisher()).stub
    endpoint = receiver.script(
        "/busy", Answer(status=429, headers={"Retry-After": "1"}), Answer(status=200)
    )
    await register(stub, endpoint, protocol=HTTP, retry_schedule=schedule(0.05, 0.1, 5))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    first, second = delivery.attempts
    assert (first.outcome, first.status_code) == (OUTCOME_FAILED, 429)
    assert (second.outcome, second.status_code) == (OUTCOME_DELIVERED, 200)
    # Recorded start times, not a wait of ours: the schedule alone would retry after ~0.05 s.
    assert seconds(second.started_at) - seconds(first.started_at) >= 0.9


async def test_a_410_disables_the_subscriber_and_holds_its_deliveries(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """410 Gone disables the subscriber (the reason says 410); its delivery stays pending with
    no further attempt, and a later event's delivery is not sent while it is disabled."""
    stub = (await open_publisher()).stub
    endpoint = receiver.script("/gone", Answer(status=410, body="unsubscribed"))
    gone = await register(stub, endpoint, protocol=HTTP, retry_schedule=schedule(0.05, 0.1, 5))
    first = await emit(stub)

    async def disabled() -> publisher_pb2.Subscriber | None:
        response = await stub.GetSubscriber(
            publisher_pb2.GetSubscriberRequest(subscriber_id=gone.subscriber.id)
        )
        subscriber = response.subscriber
        return subscriber if subscriber.state == publisher_pb2.SUBSCRIBER_STATE_DISABLED else None

    subscriber = await eventually(disabled, what="the subscriber is disabled")
    assert "410" in subscriber.state_reason
    held = await only_delivery(stub, first.event_id)
    assert held.state == PENDING
    assert [(a.outcome, a.status_code) for a in held.attempts] == [(OUTCOME_FAILED, 410)]
    assert held.attempts[0].error == "HTTP 410: unsubscribed"

    # Once the retry would be due, a witness's delivery is claimed in the same round as it
    # would be (claims go by due time); the claim counts the attempt before anything is sent.
    retry_due = seconds(held.next_attempt_at)
    await eventually(lambda: _now_after(retry_due), what="the retry slot has passed")
    await register(stub, receiver.url("/witness"), protocol=HTTP)
    second = await emit(stub)
    await eventually(lambda: _value(receiver.got(second.event_id)), what="the witness gets it")

    listing = await stub.ListDeliveries(
        publisher_pb2.ListDeliveriesRequest(subscriber_id=gone.subscriber.id)
    )
    counts = {d.event_id: (d.state, d.attempt_count) for d in listing.deliveries}
    assert counts == {first.event_id: (PENDING, 1), second.event_id: (PENDING, 0)}
    assert len(receiver.posts("/gone")) == 1


async def test_a_subscriber_that_answers_after_the_timeout_leaves_the_delivery_uncertain(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """Without a status URL, a request held past delivery_timeout is an UNCERTAIN attempt and
    the delivery stays PENDING for its next slot."""
    stub = (await open_publisher(delivery_timeout=0.5)).stub
    endpoint = receiver.script("/slow", Answer(hang=True))
    await register(stub, endpoint, protocol=HTTP, retry_schedule=schedule(60))
    emitted = await emit(stub)

    delivery = await first_attempt(stub, emitted.event_id)
    assert delivery.state == PENDING
    [attempt] = delivery.attempts
    assert (attempt.outcome, attempt.status_code) == (OUTCOME_UNCERTAIN, 0)
    assert attempt.error == "sent, but no answer: timed out after 0.5s"
    assert seconds(delivery.next_attempt_at) > time.time() + 30
    assert len(receiver.posts("/slow")) == 1


async def test_a_status_url_that_says_received_confirms_an_uncertain_attempt(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """With a status URL answering "received", the timed-out attempt becomes CONFIRMED and the
    delivery DELIVERED after one POST; the status query is signed for the event."""
    stub = (await open_publisher(delivery_timeout=0.5)).stub
    secret = new_secret()
    endpoint = receiver.script("/slow", Answer(hang=True))
    registered = await register(
        stub,
        endpoint,
        protocol=HTTP,
        secret=secret,
        retry_schedule=schedule(60),
        status_url=receiver.url("/status/{event_id}"),
    )
    emitted = await emit(stub)

    delivery = await first_attempt(stub, emitted.event_id)
    [attempt] = delivery.attempts
    assert (attempt.outcome, attempt.error) == (
        OUTCOME_CONFIRMED,
        "confirmed by status: the subscriber has the event "
        "(sent, but no answer: timed out after 0.5s)",
    )
    assert delivery.state == DELIVERED
    assert len(receiver.posts("/slow")) == 1
    [query] = receiver.status_queries()
    assert query.path == f"/status/{emitted.event_id}"
    claims = jwt_claims(query.headers, secret, registered.subscriber.id)
    assert (claims["event_id"], claims["purpose"]) == (emitted.event_id, "status")
    assert "body_sha256" not in claims


# -- 4: the SSRF guard -------------------------------------------------------------------------

REFUSED_ENDPOINTS = [
    ("http://127.0.0.1:80/x", "loopback"),
    ("http://[::1]/x", "loopback"),
    ("http://169.254.169.254/latest", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://localhost:8080/", "loopback"),
    ("http://nonexistent.invalid/", "does not resolve"),
]


async def registration_refusal(stub: Stub, endpoint: str, **fields: object) -> str:
    """The details of the INVALID_ARGUMENT that registering ``endpoint`` gets."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await register(stub, endpoint, protocol=HTTP, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, endpoint
    return caught.value.details() or ""


async def test_registration_refuses_endpoints_that_are_not_public(
    open_publisher: OpenPublisher,
) -> None:
    """Without an allowlist, loopback, link-local, private and unresolvable endpoints are
    refused with INVALID_ARGUMENT naming the field and the address class."""
    stub = (await open_publisher(allow_cidrs=())).stub
    for endpoint, address_class in REFUSED_ENDPOINTS:
        details = await registration_refusal(stub, endpoint)
        assert details.startswith("endpoint: "), (endpoint, details)
        assert address_class in details, (endpoint, details)
    # A public endpoint does not excuse a loopback status URL.
    details = await registration_refusal(
        stub, "http://93.184.215.14/hook", status_url="http://127.0.0.1/s/{event_id}"
    )
    assert details.startswith("status_url: ")
    assert "loopback" in details
    listing = await stub.ListSubscribers(publisher_pb2.ListSubscribersRequest())
    assert list(listing.subscribers) == []


async def test_registration_refuses_a_host_that_only_decodes_to_an_address(
    open_publisher: OpenPublisher,
) -> None:
    """134744072 is 8.8.8.8 to the C resolver, but not an address as written: refused with
    INVALID_ARGUMENT, as each delivery to it would be."""
    stub = (await open_publisher(allow_cidrs=())).stub
    details = await registration_refusal(stub, "http://134744072/hook")
    assert details == (
        "endpoint: refused 134744072: not an IP address in standard form (a.b.c.d or [IPv6])"
    )


async def test_an_allowlist_opens_its_ranges_and_nothing_else(
    open_publisher: OpenPublisher,
) -> None:
    """With allow_cidrs 127.0.0.0/8, 127.0.0.1 is accepted and 10.0.0.1 is still refused."""
    stub = (await open_publisher(allow_cidrs=LOOPBACK)).stub
    accepted = await register(stub, "http://127.0.0.1:80/x", protocol=HTTP)
    assert accepted.subscriber.endpoint == "http://127.0.0.1:80/x"
    details = await registration_refusal(stub, "http://10.0.0.1/")
    assert details.startswith("endpoint: ")
    assert "private" in details


async def test_the_guard_checks_again_at_attempt_time_and_sends_nothing(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """A loopback subscriber registered while allowed is refused by a publisher without the
    allowlist: every attempt FAILED naming the refused address, and the server never hit."""
    allowing = await open_publisher(allow_cidrs=LOOPBACK)
    await register(
        allowing.stub, receiver.url("/hook"), protocol=HTTP, retry_schedule=schedule(0.05, 0.1)
    )
    # One publisher at a time on SQLite; the second one takes over the same database.
    await allowing.app.stop()
    strict = await open_publisher(allow_cidrs=())
    emitted = await emit(strict.stub)

    delivery = await delivery_in(strict.stub, emitted.event_id, FAILED)
    assert [(a.outcome, a.status_code) for a in delivery.attempts] == [(OUTCOME_FAILED, 0)] * 3
    for attempt in delivery.attempts:
        assert "refused 127.0.0.1: loopback" in attempt.error
    assert receiver.requests == []


# -- 5: end to end with the reference subscriber ------------------------------------------------


@dataclass
class Partner:
    """A registered HTTP subscriber served by a reference subscriber's HTTP receiver."""

    id: str
    app: subscriber_app.SubscriberApp


async def start_partner(stub: Stub, tmp_path: Path, name: str, **fields: object) -> Partner:
    """Registers with our own secret, starts the reference subscriber for that id, and points
    the registration at its HTTP receiver."""
    secret = new_secret()
    registered = await register(
        stub, "http://127.0.0.1:9/placeholder", protocol=HTTP, secret=secret, name=name, **fields
    )
    subscriber_id = registered.subscriber.id
    config = subscriber_settings.parse(
        [
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--database-url",
            f"sqlite:///{tmp_path / f'{name}.db'}",
            "--secret",
            secret,
            "--audience",
            subscriber_id,
        ]
    )
    app = subscriber_app.SubscriberApp(config)
    await app.start()
    base = f"http://127.0.0.1:{app.http_port}/webhooks"
    updated = await stub.UpdateSubscriber(
        publisher_pb2.UpdateSubscriberRequest(
            subscriber=publisher_pb2.Subscriber(
                id=subscriber_id, endpoint=base, status_url=base + "/status/{event_id}"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["endpoint", "status_url"]),
        )
    )
    assert updated.subscriber.endpoint == base
    return Partner(subscriber_id, app)


async def test_the_reference_subscriber_records_raw_and_form_deliveries_once_each(
    open_publisher: OpenPublisher, tmp_path: Path
) -> None:
    """Raw and form deliveries pass the reference receiver's checks (audience included), each
    event lands in each inbox once, and a redelivery is absorbed as a duplicate."""
    stub = (await open_publisher()).stub
    partners: list[Partner] = []
    try:
        partners.append(await start_partner(stub, tmp_path, "raw"))
        partners.append(await start_partner(stub, tmp_path, "form", body_format=FORM))
        events = [
            (await emit_payload(stub, PAYLOAD)).event_id,
            (await emit_payload(stub, b'{"order": 43}')).event_id,
        ]

        deliveries: dict[tuple[str, str], publisher_pb2.Delivery] = {}
        for event_id in events:
            listing = await stub.ListDeliveries(
                publisher_pb2.ListDeliveriesRequest(event_id=event_id)
            )
            for summary in listing.deliveries:
                delivery = await delivered(stub, summary.id)
                assert [a.outcome for a in delivery.attempts] == [OUTCOME_DELIVERED]
                deliveries[summary.subscriber_id, event_id] = delivery
        assert set(deliveries) == {(p.id, e) for p in partners for e in events}
        for partner in partners:
            inbox = partner.app.inbox
            assert await inbox.count() == 2
            for event_id in events:
                receipt = await inbox.status(event_id)
                assert receipt is not None, (partner.id, event_id)
                assert receipt.receive_count == 1
            assert await inbox.duplicates() == 0

        raw = partners[0]
        again = deliveries[raw.id, events[0]]
        await stub.Redeliver(publisher_pb2.RedeliverRequest(delivery_id=again.id))
        redelivered = await delivered(stub, again.id, attempts=2)
        assert redelivered.attempt_count == 2
        assert await raw.app.inbox.count() == 2
        assert await raw.app.inbox.duplicates() == 1
        receipt = await raw.app.inbox.status(events[0])
        assert receipt is not None
        assert receipt.receive_count == 2
    finally:
        for partner in partners:
            await partner.app.stop()


async def delivered(stub: Stub, delivery_id: str, attempts: int = 1) -> publisher_pb2.Delivery:
    async def check() -> publisher_pb2.Delivery | None:
        response = await stub.GetDelivery(publisher_pb2.GetDeliveryRequest(delivery_id=delivery_id))
        delivery = response.delivery
        done = delivery.state == DELIVERED and len(delivery.attempts) == attempts
        return delivery if done else None

    return await eventually(check, what=f"{delivery_id} delivered after {attempts} attempt(s)")


async def first_attempt(stub: Stub, event_id: str) -> publisher_pb2.Delivery:
    """The event's only delivery once a first attempt that left an error is recorded.

    GetDelivery reads the delivery row before its log, so on PostgreSQL a view can hold the
    new attempt but the row of before it; waiting for the row's last_error too rules that out.
    """

    async def attempted() -> publisher_pb2.Delivery | None:
        delivery = await only_delivery(stub, event_id)
        return delivery if delivery.attempts and delivery.last_error else None

    return await eventually(attempted, what=f"an attempt to deliver {event_id} is recorded")


async def _now_after(when: float) -> bool:
    return time.time() > when


async def _value(value: bool) -> bool:
    return value
