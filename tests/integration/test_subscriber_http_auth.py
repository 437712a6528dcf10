"""What the reference subscriber's HTTP receiver accepts as a delivery or a status question:
captured publisher requests replayed and rewritten, and malformed headers sent byte for byte,
against a real aiohttp server on port 0 and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common import signing
from publisher import http_transport
from publisher import transport as tx
from subscriber import app
from tests import support
from tests.receiver import Receiver, running_receiver
from tests.subscriber_apps import Handled, SubscriberApps, delivery_token

SECRET = signing.generate_secret()
KEY = signing.secret_key(SECRET)
AUDIENCE = "sub_http_auth"
PAYLOAD = b'{"order":1,"total":"9.90"}'
DEADLINE = 20.0


def make_attempt(endpoint: str, **changes: Any) -> tx.Attempt:
    return support.make_attempt(
        endpoint, key=KEY, subscriber_id=AUDIENCE, payload=PAYLOAD, **changes
    )


@pytest.fixture
def handled() -> Handled:
    return Handled()


@pytest.fixture
async def subscriber(tmp_path: Path, handled: Handled) -> AsyncIterator[app.SubscriberApp]:
    apps = SubscriberApps(tmp_path)
    yield await apps.start(
        "--http-listen=127.0.0.1:0",
        f"--secret={SECRET}",
        f"--audience={AUDIENCE}",
        handler=handled,
    )
    await apps.stop_all()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as server:
        yield server


@pytest.fixture
async def transport() -> AsyncIterator[http_transport.HttpTransport]:
    sender = http_transport.HttpTransport(guard=None)
    yield sender
    await sender.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def url(subscriber: app.SubscriberApp, path: str = "/webhooks") -> str:
    return f"http://127.0.0.1:{subscriber.http_port}{path}"


async def post(
    http: aiohttp.ClientSession, subscriber: app.SubscriberApp, body: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with http.post(url(subscriber), data=body, headers=headers) as response:
        return response.status, await response.json()


async def captured_delivery(
    transport: http_transport.HttpTransport, receiver: Receiver, body_format: str
) -> tuple[dict[str, str], bytes]:
    """The headers and body of a delivery exactly as the publisher's transport sends it."""
    result = await transport.send(make_attempt(receiver.url("/capture"), body_format=body_format))
    assert result.outcome is tx.Outcome.DELIVERED
    [request] = receiver.posts("/capture")
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.startswith("webhook-") or name in ("authorization", "content-type")
    }
    return headers, request.body


async def raw_request(
    subscriber: app.SubscriberApp, method: str, path: str, headers: list[bytes], body: bytes = b""
) -> tuple[int, Any]:
    """Sends header lines byte for byte (aiohttp's client would encode them), returns the
    status and the JSON answer."""
    assert subscriber.http_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", subscriber.http_port)
    try:
        head = [
            f"{method} {path} HTTP/1.1".encode(),
            b"host: 127.0.0.1",
            f"content-length: {len(body)}".encode(),
            b"connection: close",
            *headers,
        ]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


# -- status questions (1) -----------------------------------------------------------------------


async def test_a_captured_status_question_cannot_deliver_its_event_over_http(
    subscriber: app.SubscriberApp,
    receiver: Receiver,
    transport: http_transport.HttpTransport,
    http: aiohttp.ClientSession,
    handled: Handled,
) -> None:
    """The status question's token POSTed with an empty body is 401 and records nothing, so the
    genuine delivery afterwards is recorded with its payload."""
    await transport.status(make_attempt("", status_url=receiver.url("/status/{event_id}")))
    [question] = receiver.status_queries()
    forged = {
        "authorization": question.headers["authorization"],
        "webhook-event-type": "order.created",
        "content-type": "application/json",
    }

    status, answer = await post(http, subscriber, b"", forged)
    genuine = await transport.send(make_attempt(url(subscriber)))

    assert status == 401
    assert "purpose is 'status'" in answer["error"]
    assert genuine.outcome is tx.Outcome.DELIVERED
    assert [(e.event_id, e.payload) for e in handled.entries] == [("evt-1", PAYLOAD)]


async def test_the_reference_subscriber_answers_http_status_questions_before_and_after(
    subscriber: app.SubscriberApp, transport: http_transport.HttpTransport
) -> None:
    """The status token opens the status route: unknown before the delivery, held after it."""
    attempt = make_attempt(
        url(subscriber), status_url=url(subscriber, "/webhooks/status/{event_id}")
    )

    before = await transport.status(attempt)
    await transport.send(attempt)
    after = await transport.status(attempt)

    assert (before, after) == (tx.Receipt.MISSING, tx.Receipt.HAS_IT)


# -- the JWT is required on deliveries (2) ------------------------------------------------------


async def test_a_captured_delivery_is_accepted_as_sent_with_the_event_type_of_its_token(
    subscriber: app.SubscriberApp,
    receiver: Receiver,
    transport: http_transport.HttpTransport,
    http: aiohttp.ClientSession,
    handled: Handled,
) -> None:
    """What the publisher sends (Standard Webhooks headers and the JWT) is accepted as it is."""
    headers, body = await captured_delivery(transport, receiver, "raw")

    status, answer = await post(http, subscriber, body, headers)

    assert (status, answer) == (200, {"event_id": "evt-1", "duplicate": False})
    assert [(e.event_type, e.payload) for e in handled.entries] == [("order.created", PAYLOAD)]


@pytest.mark.parametrize("body_format", ["raw", "form"])
async def test_a_replay_stripped_of_its_jwt_is_401_even_with_a_valid_standard_signature(
    subscriber: app.SubscriberApp,
    receiver: Receiver,
    transport: http_transport.HttpTransport,
    http: aiohttp.ClientSession,
    body_format: str,
) -> None:
    """Within the timestamp tolerance a captured delivery still has a valid webhook-signature,
    which covers neither event type nor content type: without the JWT it is refused, so those
    cannot be rewritten."""
    headers, body = await captured_delivery(transport, receiver, body_format)
    del headers["authorization"]
    headers["webhook-event-type"] = "account.deleted"
    headers["content-type"] = "text/plain"

    status, answer = await post(http, subscriber, body, headers)

    assert status == 401
    assert answer["error"].startswith("unsigned: authorization: Bearer <token> is required")
    assert await subscriber.inbox.count() == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"webhook-event-type": "account.deleted"}, "token event type 'order.created'"),
        ({"content-type": "text/plain"}, "body_sha256 does not match"),
    ],
    ids=["forged-event-type", "form-read-as-raw"],
)
async def test_a_replay_with_its_jwt_cannot_change_what_the_jwt_signs(
    subscriber: app.SubscriberApp,
    receiver: Receiver,
    transport: http_transport.HttpTransport,
    http: aiohttp.ClientSession,
    change: dict[str, str],
    reason: str,
) -> None:
    """The JWT names the event type and binds the payload: another type, or a form body read as
    the payload itself, is 401."""
    headers, body = await captured_delivery(transport, receiver, "form")

    status, answer = await post(http, subscriber, body, {**headers, **change})

    assert status == 401
    assert reason in answer["error"]
    assert await subscriber.inbox.count() == 0


async def test_a_jwt_without_an_event_type_is_401_whatever_the_header_says(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """The event type must come from the signed token; the header alone is not signed."""
    token = delivery_token("evt-1", PAYLOAD, key=KEY, audience=AUDIENCE, event_type="")
    headers = {"authorization": f"Bearer {token}", "webhook-event-type": "order.created"}

    status, answer = await post(http, subscriber, PAYLOAD, headers)

    assert status == 401
    assert "token has no event_type" in answer["error"]
    assert await subscriber.inbox.count() == 0


# -- malformed headers are 4xx with a reason, never 500 (5) -------------------------------------


def signed(event_id: str = "evt-1") -> bytes:
    token = delivery_token(event_id, PAYLOAD, key=KEY, audience=AUDIENCE)
    return b"authorization: Bearer " + token.encode()


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        pytest.param(
            [b"webhook-id: evt-1", b"webhook-timestamp: " + b"9" * 400, b"webhook-signature: v1,A"],
            400,
            "webhook-timestamp: is out of range for epoch seconds",
            id="timestamp-past-float-range",
        ),
        pytest.param(
            [
                b"webhook-id: evt-1",
                b"webhook-timestamp: NOW",
                "webhook-signature: v1,\u00e9".encode(),
            ],
            401,
            "no valid webhook-signature",
            id="non-ascii-signature",
        ),
        pytest.param(
            [b"authorization: Bearer a\xff.b.c"],
            401,
            "invalid token: it is not ASCII",
            id="non-utf8-authorization",
        ),
        pytest.param(
            ["authorization: Bearer \u00e9.b.c".encode()],
            401,
            "invalid token: it is not ASCII",
            id="non-ascii-authorization",
        ),
    ],
)
async def test_a_malformed_delivery_header_is_a_4xx_with_a_reason(
    subscriber: app.SubscriberApp, headers: list[bytes], status: int, reason: str
) -> None:
    """Headers no signature can hold are refused with the reason, recording nothing."""
    now = str(int(time.time())).encode()
    headers = [line.replace(b"NOW", now) for line in headers]
    if not any(line.startswith(b"authorization:") for line in headers):
        headers = [*headers, signed()]

    answer = await raw_request(
        subscriber,
        "POST",
        "/webhooks",
        [b"content-type: application/json", b"webhook-event-type: order.created", *headers],
        PAYLOAD,
    )

    assert answer == (status, {"error": reason})
    assert await subscriber.inbox.count() == 0


async def test_a_status_question_with_undecodable_authorization_bytes_is_401(
    subscriber: app.SubscriberApp,
) -> None:
    """The status route refuses a token that is not ASCII with a reason, not a 500."""
    answer = await raw_request(
        subscriber, "GET", "/webhooks/status/evt-1", [b"authorization: Bearer a\xff.b.c"]
    )

    assert answer == (401, {"error": "invalid token: it is not ASCII"})
