"""HTTP delivery against a real aiohttp server on 127.0.0.1, verified with independent libraries."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from common import errors, signing
from publisher import http_transport, ssrf
from publisher import transport as tx
from tests import support
from tests.receiver import on_loopback

SECRET = signing.generate_secret()
OLD_SECRET = signing.generate_secret()
KEY = signing.secret_key(SECRET)
OLD_KEY = signing.secret_key(OLD_SECRET)
PAYLOAD = '{"order": 42, "note": "café & co"}'.encode()
ISSUER = "publisher.test"
SUBSCRIBER_ID = "sub-1"
# A deadline for the test, far above any attempt timeout used here: reaching it
# means the transport hung, and the test fails instead of waiting forever.
DEADLINE = 10.0
# Retry-After as an HTTP date, and the clock the transport reads when it sees it.
RETRY_DATE = "Wed, 21 Oct 2037 07:28:00 GMT"
RETRY_DATE_NOW = email.utils.parsedate_to_datetime(RETRY_DATE).timestamp() - 90


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Subscriber:
    """A webhook receiver that records every request it gets."""

    base: str = ""
    received: list[Received] = field(default_factory=list)
    # Set at teardown, so that requests held open let the server stop.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a streaming response finds that the client went away.
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def paths(self) -> list[str]:
        return [request.path for request in self.received]

    async def record(self, request: web.Request) -> None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        query = dict(request.query)
        self.received.append(Received(request.path, headers, await request.read(), query))

    async def ok(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        return web.Response(status=204)

    async def status(self, request: web.Request) -> web.StreamResponse:
        """Answers /status/<code>; the query names headers and a body to send back."""
        await self.record(request)
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        if "location" in request.query:
            headers["Location"] = request.query["location"]
        body = request.query.get("body", "") * int(request.query.get("repeat", "1"))
        return web.Response(status=int(request.match_info["code"]), headers=headers, text=body)

    async def hold(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        await self.release.wait()
        return web.Response(status=204)

    async def hang_up(self, request: web.Request) -> web.StreamResponse:
        """Reads the request, then closes the connection without answering."""
        await self.record(request)
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=204)

    async def truncate(self, request: web.Request) -> web.StreamResponse:
        """Answers 200, then closes the connection in the middle of the body."""
        await self.record(request)
        response = web.StreamResponse(status=200)
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return response

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """A 500 whose body never ends: fast chunks, or slow ones with ?pause=<seconds>."""
        await self.record(request)
        pause = float(request.query.get("pause", "0"))
        chunk = b"x" * 65536 if pause == 0 else b"slow "
        response = web.StreamResponse(status=500)
        await response.prepare(request)
        try:
            while not self.release.is_set():
                await response.write(chunk)
                await asyncio.sleep(pause)
        except ConnectionError:
            self.hung_up.set()
        return response


@pytest.fixture
async def subscriber() -> AsyncIterator[Subscriber]:
    receiver = Subscriber()
    app = web.Application()
    app.router.add_post("/ok", receiver.ok)
    app.router.add_post("/target", receiver.ok)
    app.router.add_post("/status/{code}", receiver.status)
    # Status URLs: a status question is a GET, answered the same way.
    app.router.add_get("/status/{code}", receiver.status)
    app.router.add_post("/hold", receiver.hold)
    app.router.add_post("/stream", receiver.stream)
    app.router.add_post("/hang-up", receiver.hang_up)
    app.router.add_post("/truncate", receiver.truncate)
    async with on_loopback(app) as receiver.base:
        yield receiver
        receiver.release.set()


@pytest.fixture
async def transport() -> AsyncIterator[http_transport.HttpTransport]:
    sender = http_transport.HttpTransport(guard=ssrf.Guard(["127.0.0.0/8"]))
    yield sender
    await sender.close()


def make_attempt(endpoint: str, **changes: Any) -> tx.Attempt:
    return support.make_attempt(
        endpoint, key=KEY, subscriber_id=SUBSCRIBER_ID, payload=PAYLOAD, issuer=ISSUER, **changes
    )


async def send(sender: http_transport.HttpTransport, attempt: tx.Attempt) -> tx.Result:
    async with asyncio.timeout(DEADLINE):
        return await sender.send(attempt)


def decode_token(received: Received, key: bytes = KEY) -> dict[str, Any]:
    scheme, _, token = received.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=["HS256"], audience=SUBSCRIBER_ID, issuer=ISSUER
    )
    return claims


async def test_a_2xx_is_delivered_with_standard_webhooks_headers_that_verify(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(transport, make_attempt(subscriber.url("/ok")))

    assert result == tx.Result(tx.Outcome.DELIVERED, status_code=204)
    [received] = subscriber.received
    assert received.body == PAYLOAD
    assert received.headers["content-type"] == "application/json"
    assert Webhook(SECRET).verify(received.body, received.headers) == {
        "order": 42,
        "note": "café & co",
    }


async def test_the_jwt_verifies_with_pyjwt_and_binds_the_exact_body(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    await send(transport, make_attempt(subscriber.url("/ok"), attempt=3))

    [received] = subscriber.received
    claims = decode_token(received)
    assert claims["body_sha256"] == hashlib.sha256(received.body).hexdigest()
    assert claims["event_id"] == "evt-1"
    assert claims["event_type"] == "order.created"
    assert claims["attempt"] == 3


async def test_delivery_headers_name_the_event_the_delivery_and_the_attempt(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    await send(transport, make_attempt(subscriber.url("/ok"), attempt=1))
    await send(transport, make_attempt(subscriber.url("/ok"), attempt=2))

    first, second = (request.headers for request in subscriber.received)
    assert first["webhook-id"] == second["webhook-id"] == "evt-1"
    assert first["webhook-event-type"] == "order.created"
    assert first["webhook-delivery-id"] == "dlv-1"
    assert (first["webhook-attempt"], second["webhook-attempt"]) == ("1", "2")
    assert first["user-agent"].startswith("grpc-webhooks/")
    assert int(first["webhook-timestamp"]) > 0


async def test_two_keys_give_two_signatures_that_each_verify(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    await send(transport, make_attempt(subscriber.url("/ok"), keys=(KEY, OLD_KEY)))

    [received] = subscriber.received
    assert len(received.headers["webhook-signature"].split()) == 2
    Webhook(SECRET).verify(received.body, received.headers)
    Webhook(OLD_SECRET).verify(received.body, received.headers)
    # The token is signed with the newest key only.
    decode_token(received, KEY)
    with pytest.raises(jwt.InvalidSignatureError):
        decode_token(received, OLD_KEY)


async def test_a_form_body_carries_the_payload_signed_over_the_form_and_the_jwt_over_the_payload(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(transport, make_attempt(subscriber.url("/ok"), body_format="form"))

    assert result.outcome is tx.Outcome.DELIVERED
    [received] = subscriber.received
    assert received.headers["content-type"] == "application/x-www-form-urlencoded"
    form = urllib.parse.parse_qs(received.body.decode("ascii"), strict_parsing=True)
    assert form == {"payload": [PAYLOAD.decode()]}
    Webhook(SECRET).verify(received.body, received.headers, json_parse=False)
    # The JWT binds the event's payload, as on gRPC; the form field carries it.
    assert decode_token(received)["body_sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


async def test_a_redirect_is_not_followed_and_fails_naming_the_location(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    target = subscriber.url("/target")
    query = urllib.parse.urlencode({"location": target})
    result = await send(transport, make_attempt(subscriber.url(f"/status/301?{query}")))

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == 301
    assert "redirect not followed" in result.error
    assert target in result.error
    assert "/target" not in subscriber.paths()


@pytest.mark.parametrize(
    ("code", "retry_after", "expected"),
    [
        (429, "120", 120.0),
        (503, "7", 7.0),
        (429, RETRY_DATE, 90.0),
        (503, RETRY_DATE, 90.0),
        (429, "-5", None),
        (429, "soon", None),
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
async def test_429_and_503_fail_with_the_retry_after_the_subscriber_asked_for(
    subscriber: Subscriber, code: int, retry_after: str, expected: float | None
) -> None:
    sender = http_transport.HttpTransport(
        guard=ssrf.Guard(["127.0.0.0/8"]), now=lambda: RETRY_DATE_NOW
    )
    query = urllib.parse.urlencode({"retry_after": retry_after})
    try:
        result = await send(sender, make_attempt(subscriber.url(f"/status/{code}?{query}")))
    finally:
        await sender.close()

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == code
    assert result.retry_after == expected
    assert not result.gone


async def test_410_fails_and_says_the_subscriber_is_gone(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(transport, make_attempt(subscriber.url("/status/410?body=unsubscribed")))

    assert result == tx.Result(
        tx.Outcome.FAILED, status_code=410, error="HTTP 410: unsubscribed", gone=True
    )


async def test_500_fails_with_the_status_and_a_1_kib_excerpt_of_the_body(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(
        transport, make_attempt(subscriber.url("/status/500?body=boom+&repeat=2000"))
    )

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == 500
    assert result.error.startswith("HTTP 500: boom boom")
    assert result.error == "HTTP 500: " + tx.excerpt("boom " * 2000)
    assert result.retry_after is None
    assert not result.gone


async def test_a_subscriber_that_answers_after_the_timeout_leaves_the_outcome_uncertain(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(transport, make_attempt(subscriber.url("/hold"), timeout=0.3))

    assert result.outcome is tx.Outcome.UNCERTAIN
    assert result.status_code == 0
    assert "timed out" in result.error
    assert subscriber.paths() == ["/hold"]


async def test_a_connection_closed_before_the_answer_leaves_the_outcome_uncertain(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(transport, make_attempt(subscriber.url("/hang-up")))

    assert result.outcome is tx.Outcome.UNCERTAIN
    assert result.status_code == 0
    assert result.error.startswith("sent, but no answer: ")
    assert subscriber.paths() == ["/hang-up"]


async def test_a_2xx_whose_body_breaks_off_is_delivered_since_the_status_is_the_answer(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    result = await send(transport, make_attempt(subscriber.url("/truncate")))

    assert result == tx.Result(tx.Outcome.DELIVERED, status_code=200)


async def test_an_event_type_that_would_inject_a_header_fails_as_never_sent(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    attempt = make_attempt(subscriber.url("/ok"), event_type="order.created\r\nx-admin: yes")
    result = await send(transport, attempt)

    assert result.outcome is tx.Outcome.FAILED
    assert result.error.startswith("not sent: ")
    assert subscriber.received == []


async def test_an_endless_body_is_read_up_to_the_cap_and_the_connection_dropped(
    subscriber: Subscriber,
) -> None:
    sender = http_transport.HttpTransport(
        guard=ssrf.Guard(["127.0.0.0/8"]), max_response_bytes=4096
    )
    try:
        # The attempt timeout is above the test deadline: only the cap can end it in time.
        result = await send(sender, make_attempt(subscriber.url("/stream"), timeout=60.0))
    finally:
        await sender.close()

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == 500
    assert result.error == "HTTP 500: " + tx.excerpt("x" * 4096)
    async with asyncio.timeout(DEADLINE):
        await subscriber.hung_up.wait()


async def test_a_slowly_streamed_body_does_not_hold_the_attempt_past_its_timeout(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    # The body never ends: without the attempt's timeout the send would reach DEADLINE.
    result = await send(transport, make_attempt(subscriber.url("/stream?pause=0.02"), timeout=0.5))

    # The status arrived before the timeout, so it is the answer; the body is cut short.
    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == 500
    assert result.error.startswith("HTTP 500: slow slow ")


async def test_a_closed_port_fails_as_never_sent(
    transport: http_transport.HttpTransport,
) -> None:
    with support.refusing_port() as port:
        result = await send(transport, make_attempt(f"http://127.0.0.1:{port}/ok"))

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == 0
    assert result.error.startswith("not sent: ")


async def test_a_timeout_before_the_request_left_fails_instead_of_being_uncertain(
    monkeypatch: pytest.MonkeyPatch, transport: http_transport.HttpTransport
) -> None:
    async def stalled_dns(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", stalled_dns)
    result = await send(transport, make_attempt("http://stalled.example/ok", timeout=0.3))

    assert result.outcome is tx.Outcome.FAILED
    assert result.error == "not sent: timed out after 0.3s"


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost"])
async def test_the_guard_refuses_loopback_without_an_allowlist_and_nothing_is_sent(
    subscriber: Subscriber, host: str
) -> None:
    sender = http_transport.HttpTransport(guard=ssrf.Guard([]))
    port = subscriber.base.rsplit(":", 1)[1]
    try:
        result = await send(sender, make_attempt(f"http://{host}:{port}/ok"))
    finally:
        await sender.close()

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == 0
    assert "loopback" in result.error
    assert subscriber.received == []


async def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(
    monkeypatch: pytest.MonkeyPatch,
    subscriber: Subscriber,
    transport: http_transport.HttpTransport,
) -> None:
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real_getaddrinfo: Callable[..., Any] = loop.getaddrinfo

    async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        # A rebinding name: the first answer is allowed, any later one would not be.
        address = "127.0.0.1" if len(lookups) == 1 else "10.0.0.1"
        return await real_getaddrinfo(address, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    port = subscriber.base.rsplit(":", 1)[1]
    result = await send(transport, make_attempt(f"http://partner.example:{port}/ok"))

    assert result.outcome is tx.Outcome.DELIVERED
    assert lookups == ["partner.example"]
    [received] = subscriber.received
    assert received.headers["host"] == f"partner.example:{port}"


async def test_a_numeric_name_that_is_not_an_address_is_not_sent_nor_looked_up(
    monkeypatch: pytest.MonkeyPatch, subscriber: Subscriber
) -> None:
    """A host of digits and dots is refused as written: the system resolver would send
    1.2.3.4.5 to DNS, whose answer could differ between the check (public here) and the
    connection (loopback, which this guard refuses)."""
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real_getaddrinfo: Callable[..., Any] = loop.getaddrinfo

    async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "1.2.3.4.5":
            return await real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        address = "93.184.215.14" if len(lookups) == 1 else "127.0.0.1"
        return await real_getaddrinfo(address, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    port = subscriber.base.rsplit(":", 1)[1]
    sender = http_transport.HttpTransport(guard=ssrf.Guard([]))
    try:
        result = await send(sender, make_attempt(f"http://1.2.3.4.5:{port}/ok"))
    finally:
        await sender.close()

    assert result.outcome is tx.Outcome.FAILED
    assert result.error == (
        "not sent: refused 1.2.3.4.5: not an IP address in standard form (a.b.c.d or [IPv6])"
    )
    assert lookups == []
    assert subscriber.received == []


async def test_proxy_variables_in_the_environment_are_not_used(
    monkeypatch: pytest.MonkeyPatch,
    subscriber: Subscriber,
    transport: http_transport.HttpTransport,
) -> None:
    """The POST and the status question go straight to the checked address, never through
    HTTP_PROXY and the like: a proxy would look the host up itself, past the guard."""
    proxied: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        proxied.append(str(request.url))
        return web.Response(status=204)

    proxy = web.Application()
    proxy.router.add_route("*", "/{path:.*}", record)
    async with on_loopback(proxy) as proxy_url:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy_url)
            monkeypatch.setenv(name.lower(), proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        attempt = make_attempt(
            subscriber.url("/ok"), status_url=subscriber.url("/status/404?event={event_id}")
        )
        result = await send(transport, attempt)
        async with asyncio.timeout(DEADLINE):
            receipt = await transport.status(attempt)

    assert result.outcome is tx.Outcome.DELIVERED
    assert receipt is tx.Receipt.MISSING
    assert subscriber.paths() == ["/ok", "/status/404"]
    assert proxied == []


async def test_an_unguarded_transport_delivers_to_loopback(subscriber: Subscriber) -> None:
    sender = http_transport.HttpTransport(guard=None)
    try:
        result = await send(sender, make_attempt(subscriber.url("/ok")))
    finally:
        await sender.close()

    assert result.outcome is tx.Outcome.DELIVERED


async def test_a_status_question_carries_a_status_token_that_cannot_pass_for_a_delivery(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    """The GET's JWT verifies with PyJWT and names the event with purpose "status" and no
    body_sha256, so a subscriber cannot take it for an empty delivery of the event."""
    attempt = make_attempt(
        subscriber.url("/ok"), status_url=subscriber.url("/status/404?event={event_id}")
    )

    async with asyncio.timeout(DEADLINE):
        receipt = await transport.status(attempt)

    assert receipt is tx.Receipt.MISSING
    [question] = subscriber.received
    claims = decode_token(question)
    assert (claims["event_id"], claims["purpose"]) == ("evt-1", "status")
    assert "body_sha256" not in claims
    with pytest.raises(errors.Unauthenticated, match="purpose is 'status'"):
        signing.verify_delivery(
            question.headers["authorization"].removeprefix("Bearer "),
            [KEY],
            audience=SUBSCRIBER_ID,
            payload=b"",
        )


async def test_a_status_answer_nested_too_deep_to_parse_is_unanswered_not_raised(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    """A 200 whose body is 60,000 nested arrays (RecursionError in json.loads) is no answer:
    status() never raises."""
    attempt = make_attempt(
        subscriber.url("/ok"),
        status_url=subscriber.url("/status/200?body=%5B&repeat=60000&event={event_id}"),
    )

    async with asyncio.timeout(DEADLINE):
        receipt = await transport.status(attempt)

    assert receipt is tx.Receipt.UNANSWERED
    [question] = subscriber.received
    assert question.path == "/status/200"


async def test_a_status_url_with_a_space_and_a_non_ascii_character_is_asked_encoded(
    subscriber: Subscriber, transport: http_transport.HttpTransport
) -> None:
    """Registration takes such a URL; the request line cannot carry it as written."""
    attempt = make_attempt(
        subscriber.url("/ok"),
        status_url=subscriber.url("/status/404?note=a b&name=café&event={event_id}"),
    )

    async with asyncio.timeout(DEADLINE):
        receipt = await transport.status(attempt)

    assert receipt is tx.Receipt.MISSING
    [question] = subscriber.received
    assert question.path == "/status/404"
    assert question.query == {"note": "a b", "name": "café", "event": attempt.event_id}
