"""The subscriber over HTTP: a real aiohttp server on port 0, signed by the standardwebhooks package
and PyJWT, recorded in a real SQLite file."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc.aio
import pytest
from standardwebhooks.webhooks import Webhook

from common import grpc_server
from common.gen.webhooks.v1 import event_pb2, subscriber_pb2, subscriber_pb2_grpc
from subscriber import app, inbox
from tests.subscriber_apps import Handled, SubscriberApps, delivery_token

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
AUDIENCE = "sub_http"
# A guard against a hang, far above what any answer here takes.
DEADLINE_SECONDS = 20.0
TOLERANCE_SECONDS = 300
PAYLOAD = '{"order":1,"total":"9.90"}'


def token(event_id: str, payload: bytes, *, event_type: str = "order.created") -> str:
    signed = delivery_token(event_id, payload, key=KEY, audience=AUDIENCE, event_type=event_type)
    return "Bearer " + signed


def standard_headers(
    message_id: str, body: str, *, age_seconds: int = 0, event_type: str | None = "order.created"
) -> dict[str, str]:
    """Standard Webhooks headers made by the reference implementation, not by our code."""
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=age_seconds)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(message_id, when, body),
    }
    if event_type is not None:
        headers["webhook-event-type"] = event_type
    return headers


def signed_headers(message_id: str, body: str, payload: bytes | None = None) -> dict[str, str]:
    """What the publisher sends: Standard Webhooks headers over the body and a JWT over the
    payload (the body itself unless it is a form)."""
    signed = body.encode() if payload is None else payload
    return {**standard_headers(message_id, body), "authorization": token(message_id, signed)}


class StartSubscriber(Protocol):
    async def __call__(self, *flags: str) -> app.SubscriberApp: ...


@pytest.fixture
def handled() -> Handled:
    return Handled()


@pytest.fixture
async def start_subscriber(tmp_path: Path, handled: Handled) -> AsyncIterator[StartSubscriber]:
    """Starts subscribers with gRPC and HTTP on port 0 and a fresh SQLite file each."""
    apps = SubscriberApps(tmp_path)

    async def start(*flags: str) -> app.SubscriberApp:
        return await apps.start(
            "--http-listen=127.0.0.1:0",
            f"--secret={SECRET}",
            f"--audience={AUDIENCE}",
            f"--timestamp-tolerance={TOLERANCE_SECONDS}",
            *flags,
            handler=handled,
        )

    yield start
    await apps.stop_all()


@pytest.fixture
async def subscriber(start_subscriber: StartSubscriber) -> app.SubscriberApp:
    return await start_subscriber()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def url(subscriber: app.SubscriberApp, path: str = "/webhooks") -> str:
    return f"http://127.0.0.1:{subscriber.http_port}{path}"


async def post(
    http: aiohttp.ClientSession,
    subscriber: app.SubscriberApp,
    body: str | bytes,
    headers: dict[str, str],
    content_type: str = "application/json",
) -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    async with http.post(
        url(subscriber), data=data, headers={"content-type": content_type, **headers}
    ) as response:
        return response.status, await response.json()


async def test_standard_webhooks_delivery_is_recorded_with_its_raw_body(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession, handled: Handled
) -> None:
    """A body signed with Standard Webhooks headers and the JWT is stored byte for byte under
    webhook-id."""
    status, answer = await post(http, subscriber, PAYLOAD, signed_headers("msg_1", PAYLOAD))

    assert (status, answer) == (200, {"event_id": "msg_1", "duplicate": False})
    [entry] = handled.entries
    assert (entry.event_id, entry.event_type, entry.payload, entry.content_type) == (
        "msg_1",
        "order.created",
        PAYLOAD.encode(),
        "application/json",
    )
    receipt = await subscriber.inbox.status("msg_1")
    assert receipt is not None
    assert receipt.state is inbox.State.PROCESSED


async def test_jwt_delivery_takes_event_id_and_type_from_the_token(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession, handled: Handled
) -> None:
    """A Bearer JWT over the raw body is enough: its claims name the event."""
    status, answer = await post(
        http, subscriber, PAYLOAD, {"authorization": token("evt_1", PAYLOAD.encode())}
    )

    assert (status, answer) == (200, {"event_id": "evt_1", "duplicate": False})
    assert [(e.event_id, e.event_type) for e in handled.entries] == [("evt_1", "order.created")]


async def test_jwt_and_standard_headers_together_must_both_hold(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """Both signatures present: both are checked, and their event ids must agree."""
    headers = {**standard_headers("msg_1", PAYLOAD), "authorization": token("evt_2", b"{}")}

    status, answer = await post(http, subscriber, PAYLOAD, headers)

    assert status == 401
    assert "body_sha256" in answer["error"]
    headers["authorization"] = token("evt_2", PAYLOAD.encode())
    status, answer = await post(http, subscriber, PAYLOAD, headers)
    assert status == 401
    assert "does not match 'msg_1'" in answer["error"]
    assert await subscriber.inbox.count() == 0


@pytest.mark.parametrize("scheme", ["jwt", "jwt-and-standard"])
async def test_form_body_records_the_exact_bytes_of_its_payload_field(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession, handled: Handled, scheme: str
) -> None:
    """For forms the event is the payload field: a JWT signs those bytes, Standard the raw body."""
    payload = '{"note":"caf\u00e9 & 100%"}'
    body = urllib.parse.urlencode({"payload": payload, "content_type": "application/json"})
    headers = (
        {"authorization": token("evt_form", payload.encode())}
        if scheme == "jwt"
        else signed_headers("evt_form", body, payload.encode())
    )

    status, answer = await post(
        http, subscriber, body, headers, content_type="application/x-www-form-urlencoded"
    )

    assert (status, answer) == (200, {"event_id": "evt_form", "duplicate": False})
    [entry] = handled.entries
    assert (entry.payload, entry.content_type) == (payload.encode(), "application/json")


async def test_form_body_without_a_payload_field_is_400(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """A form that does not carry the event is malformed, however well signed."""
    body = urllib.parse.urlencode({"data": PAYLOAD})
    headers = standard_headers("msg_1", body)
    headers["authorization"] = token("msg_1", PAYLOAD.encode())

    status, answer = await post(
        http, subscriber, body, headers, content_type="application/x-www-form-urlencoded"
    )

    assert status == 400
    assert answer["error"].startswith("payload:")
    assert await subscriber.inbox.count() == 0


@pytest.mark.parametrize(
    ("event_id", "event_type", "content_type", "field"),
    [
        pytest.param("e" * 256, "order.created", "application/json", "event_id", id="event-id"),
        pytest.param("evt_1", "t" * 256, "application/json", "event_type", id="event-type"),
        pytest.param("evt_1", "order.created", "a/" + "b" * 254, "content_type", id="content-type"),
    ],
)
async def test_a_field_too_long_to_store_is_400_naming_it_and_records_nothing(
    subscriber: app.SubscriberApp,
    http: aiohttp.ClientSession,
    handled: Handled,
    event_id: str,
    event_type: str,
    content_type: str,
    field: str,
) -> None:
    """A validly signed delivery whose event id or type (from the token) or content type
    (the header) is longer than the inbox keeps is refused naming it, not stored cut short."""
    authorization = token(event_id, PAYLOAD.encode(), event_type=event_type)

    status, answer = await post(
        http, subscriber, PAYLOAD, {"authorization": authorization}, content_type=content_type
    )

    assert status == 400
    assert answer["error"].startswith(f"{field}: longer than 255")
    assert await subscriber.inbox.count() == 0
    assert handled.entries == []


@pytest.mark.parametrize(
    ("event_id", "event_type", "field"),
    [
        pytest.param("evt_\x00", "order.created", "event_id", id="event-id"),
        pytest.param("evt_1", "order.\x00", "event_type", id="event-type"),
    ],
)
async def test_a_nul_character_postgresql_cannot_store_is_400_and_records_nothing(
    start_subscriber: StartSubscriber,
    http: aiohttp.ClientSession,
    postgres_url: str,
    event_id: str,
    event_type: str,
    field: str,
) -> None:
    """PostgreSQL refuses NUL in text: a signed delivery whose token names such an event is
    a 400 naming the field, not a 500."""
    subscriber = await start_subscriber(f"--database-url={postgres_url}")
    authorization = token(event_id, PAYLOAD.encode(), event_type=event_type)

    status, answer = await post(http, subscriber, PAYLOAD, {"authorization": authorization})

    assert (status, answer["error"].partition(":")[0]) == (400, field)
    assert await subscriber.inbox.count() == 0


async def test_a_form_body_with_two_payload_fields_is_400(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """Two payload fields leave open which one the signature was meant for: refused."""
    body = urllib.parse.urlencode([("payload", PAYLOAD), ("payload", "{}")])

    status, answer = await post(
        http,
        subscriber,
        body,
        {"authorization": token("evt_form", PAYLOAD.encode())},
        content_type="application/x-www-form-urlencoded",
    )

    assert status == 400
    assert answer["error"].startswith("payload: a form body needs exactly one field, got 2")
    assert await subscriber.inbox.count() == 0


async def test_a_body_over_the_size_limit_is_413_with_a_reason(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """A body larger than any delivery can be (gRPC's 16 MiB message limit) is refused as
    too large, in JSON like every other error, and nothing is stored."""
    body = b"x" * (grpc_server.MAX_MESSAGE_BYTES + 1)
    headers = {"authorization": token("evt_big", body), "content-type": "text/plain"}

    async with http.post(url(subscriber), data=io.BytesIO(body), headers=headers) as response:
        status, answer = response.status, await response.json()

    assert status == 413
    assert answer["error"]
    assert await subscriber.inbox.count() == 0


def good_token() -> str:
    """A valid delivery token for msg_1 and PAYLOAD, made when the test runs (it expires)."""
    return token("msg_1", PAYLOAD.encode())


@pytest.mark.parametrize(
    ("make_headers", "reason"),
    [
        pytest.param(
            lambda: {**standard_headers("msg_1", PAYLOAD + " "), "authorization": good_token()},
            "no valid webhook-signature",
            id="standard-other-body",
        ),
        pytest.param(
            lambda: {
                **standard_headers("msg_1", PAYLOAD),
                "webhook-id": "msg_2",
                "authorization": good_token(),
            },
            "no valid webhook-signature",
            id="standard-other-id",
        ),
        pytest.param(
            lambda: {"authorization": token("evt_1", PAYLOAD.encode() + b" ")},
            "body_sha256 does not match",
            id="jwt-other-body",
        ),
        pytest.param(dict, "unsigned", id="unsigned"),
    ],
)
async def test_bad_signature_is_401_with_a_reason_and_records_nothing(
    subscriber: app.SubscriberApp,
    http: aiohttp.ClientSession,
    make_headers: Callable[[], dict[str, str]],
    reason: str,
) -> None:
    """A signature that does not cover this request is refused before anything is stored."""
    status, answer = await post(http, subscriber, PAYLOAD, make_headers())

    assert status == 401
    assert reason in answer["error"]
    assert await subscriber.inbox.count() == 0


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="unsigned"),
        pytest.param(
            "Bearer "
            + delivery_token("evt_1", b"{}", key=os.urandom(32), audience=AUDIENCE, event_type="t"),
            id="another-key",
        ),
    ],
)
async def test_a_request_without_a_good_token_is_refused_before_its_body_is_read(
    subscriber: app.SubscriberApp, authorization: str | None
) -> None:
    """The body is not waited for, let alone held, when the token already fails: the 401
    comes while most of a 1 MB body has not been sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", subscriber.http_port)
    try:
        head = [
            "POST /webhooks HTTP/1.1",
            "Host: 127.0.0.1",
            "Content-Type: application/json",
            "Content-Length: 1000000",
        ]
        if authorization is not None:
            head.append(f"Authorization: {authorization}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b"{" * 1000)
        await writer.drain()
        # Only a guard against a hang: the answer must come without the rest of the body.
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE_SECONDS)
    finally:
        writer.close()

    assert status_line.split()[1] == b"401"
    assert await subscriber.inbox.count() == 0


async def test_stale_timestamp_is_401_even_with_a_valid_signature(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """A captured request replayed after the tolerance window is refused."""
    headers = standard_headers("msg_1", PAYLOAD, age_seconds=TOLERANCE_SECONDS + 60)
    headers["authorization"] = token("msg_1", PAYLOAD.encode())

    status, answer = await post(http, subscriber, PAYLOAD, headers)

    assert status == 401
    assert re.fullmatch(r"webhook-timestamp is 36\d s old; tolerance is 300 s", answer["error"])
    assert await subscriber.inbox.count() == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"webhook-timestamp": "yesterday"}, "webhook-timestamp", id="bad-timestamp"),
        pytest.param({"webhook-id": ""}, "webhook-id", id="empty-webhook-id"),
    ],
)
async def test_malformed_standard_headers_are_400_naming_the_header(
    subscriber: app.SubscriberApp,
    http: aiohttp.ClientSession,
    change: dict[str, str],
    field: str,
) -> None:
    """A header that cannot be read is a malformed request, not a bad signature."""
    headers = {**signed_headers("msg_1", PAYLOAD), **change}

    status, answer = await post(http, subscriber, PAYLOAD, headers)

    assert status == 400
    assert answer["error"].startswith(f"{field}:")


async def test_same_webhook_twice_is_a_200_duplicate_with_one_effect(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession, handled: Handled
) -> None:
    """A redelivery (fresh signature, same id and body) is acknowledged as a duplicate."""
    first = await post(http, subscriber, PAYLOAD, signed_headers("msg_1", PAYLOAD))
    second = await post(http, subscriber, PAYLOAD, signed_headers("msg_1", PAYLOAD))

    assert first == (200, {"event_id": "msg_1", "duplicate": False})
    assert second == (200, {"event_id": "msg_1", "duplicate": True})
    assert len(handled.entries) == 1
    assert await subscriber.inbox.duplicates() == 1


async def test_replay_of_a_webhook_id_with_a_different_body_is_409(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession, handled: Handled
) -> None:
    """A known webhook-id with another (validly signed) body is refused, not recorded."""
    await post(http, subscriber, PAYLOAD, signed_headers("msg_1", PAYLOAD))
    other = '{"order":1,"total":"0.01"}'

    status, answer = await post(http, subscriber, other, signed_headers("msg_1", other))

    assert status == 409
    assert "replay with a different body" in answer["error"]
    assert [e.payload for e in handled.entries] == [PAYLOAD.encode()]
    assert await subscriber.inbox.duplicates() == 0


async def test_event_delivered_over_grpc_then_http_is_recorded_once(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession, handled: Handled
) -> None:
    """Both receivers share one inbox, so switching transports does not double an effect."""
    event = event_pb2.Event(id="evt_1", type="order.created", payload=PAYLOAD.encode())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{subscriber.grpc_port}") as channel:
        await subscriber_pb2_grpc.SubscriberServiceStub(channel).Receive(
            subscriber_pb2.ReceiveRequest(event=event, attempt=1),
            metadata=(("authorization", token("evt_1", PAYLOAD.encode())),),
            timeout=30,
        )

    status, answer = await post(http, subscriber, PAYLOAD, signed_headers("evt_1", PAYLOAD))

    assert (status, answer) == (200, {"event_id": "evt_1", "duplicate": True})
    assert len(handled.entries) == 1


async def test_caller_outside_the_ip_allowlist_is_403_with_a_reason(
    start_subscriber: StartSubscriber, http: aiohttp.ClientSession
) -> None:
    """The allowlist is checked before anything else, on both endpoints."""
    fenced = await start_subscriber("--allow-ip=10.0.0.0/8")

    status, answer = await post(http, fenced, PAYLOAD, standard_headers("msg_1", PAYLOAD))
    async with http.get(url(fenced, "/webhooks/status/msg_1")) as response:
        status_query = response.status

    assert status == 403
    assert "127.0.0.1 is not in the IP allowlist" in answer["error"]
    assert status_query == 403
    assert await fenced.inbox.count() == 0


async def test_forwarding_headers_do_not_change_the_address_the_allowlist_checks(
    start_subscriber: StartSubscriber, http: aiohttp.ClientSession, handled: Handled
) -> None:
    """X-Forwarded-For, Forwarded and X-Real-IP naming an allowed address do not let a
    caller from another address in, with a delivery that is otherwise valid."""
    fenced = await start_subscriber("--allow-ip=10.0.0.0/8")
    claimed = {
        "x-forwarded-for": "10.0.0.1",
        "forwarded": "for=10.0.0.1",
        "x-real-ip": "10.0.0.1",
    }

    status, answer = await post(
        http, fenced, PAYLOAD, {**signed_headers("evt_1", PAYLOAD), **claimed}
    )

    assert status == 403
    assert "127.0.0.1 is not in the IP allowlist" in answer["error"]
    assert await fenced.inbox.count() == 0
    assert handled.entries == []


async def get_status(
    http: aiohttp.ClientSession, subscriber: app.SubscriberApp, event_id: str, authorization: str
) -> tuple[int, Any]:
    async with http.get(
        url(subscriber, f"/webhooks/status/{event_id}"), headers={"authorization": authorization}
    ) as response:
        return response.status, await response.json()


async def test_status_endpoint_reports_unknown_then_processed(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """GET /webhooks/status/{id} answers from the inbox, with the receipt time once received."""
    unknown = await get_status(http, subscriber, "msg_1", token("msg_1", b""))
    before = time.time()
    await post(http, subscriber, PAYLOAD, signed_headers("msg_1", PAYLOAD))

    status, answer = await get_status(http, subscriber, "msg_1", token("msg_1", b""))

    assert unknown == (200, {"event_id": "msg_1", "state": "unknown", "received_at": None})
    assert status == 200
    assert answer["state"] == "processed"
    assert before - 1 <= answer["received_at"] <= time.time() + 1


@pytest.mark.parametrize(
    "make_authorization",
    [
        pytest.param(lambda: token("msg_2", b""), id="token-for-another-event"),
        pytest.param(lambda: token("msg_1", PAYLOAD.encode()), id="delivery-token"),
        pytest.param(str, id="no-token"),
    ],
)
async def test_status_endpoint_needs_a_token_for_that_event_over_an_empty_payload(
    subscriber: app.SubscriberApp,
    http: aiohttp.ClientSession,
    make_authorization: Callable[[], str],
) -> None:
    """Status queries are signed over b"" for exactly the event asked about, else 401."""
    status, answer = await get_status(http, subscriber, "msg_1", make_authorization())

    assert status == 401
    assert answer["error"]


async def test_unknown_path_is_answered_with_a_json_error(
    subscriber: app.SubscriberApp, http: aiohttp.ClientSession
) -> None:
    """Every error, including the router's own, is JSON with an error field."""
    async with http.get(url(subscriber, "/nope")) as response:
        assert response.status == 404
        assert await response.json() == {"error": "Not Found"}
