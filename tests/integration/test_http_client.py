"""The HTTP/1.1 client of deliveries (publisher.http_client) against real servers on 127.0.0.1.

Connection reuse and the pool, response framing, the caps on what is read, when a failed
request counts as sent, the Host header and request target, TLS, close(), and one scenario on
uvloop, which the publisher runs on.

aiohttp servers answer where any correct server will do. Where a test needs exact bytes, a
misbehaving server, or a count of the connections a server accepted and saw closed, a minimal
server over asyncio streams (RawServer) answers instead. No test sleeps: every wait is for a
condition, under DEADLINE, and the only timers are the client's own (request deadlines and the
idle sweep) where a test is about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import select
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import uvloop
import yarl
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from publisher import http_client
from publisher.http_client import Failed, Response
from tests.receiver import on_loopback
from tests.support import refusing_port

# A deadline for the test, far above any request timeout used here: reaching it means the
# client (or a server) hung, and the test fails instead of waiting forever.
DEADLINE = 10.0
# The request timeout where a test does not mean to reach it.
TIMEOUT = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reported instead of raising: an exception in a protocol callback,
    a future's exception nobody retrieved, a task destroyed while pending. Any fails the test."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield reported
    gc.collect()  # A future dropped with its exception unread reports it when collected.
    loop.set_exception_handler(None)
    assert [context.get("message") for context in reported] == []


# The client


@contextlib.asynccontextmanager
async def open_client(**changes: Any) -> AsyncIterator[http_client.Client]:
    """A client with settings no test reaches unless it means to, closed after the block."""
    settings: dict[str, Any] = {
        "resolve": None,
        "connect_timeout": TIMEOUT,
        "max_response_bytes": 65536,
        "pool_limit": 10,
        # Far off: no idle connection is swept during a test that does not ask for it.
        "idle_seconds": 60.0,
    }
    client = http_client.Client(**{**settings, **changes})
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def client() -> AsyncIterator[http_client.Client]:
    async with open_client() as sender:
        yield sender


async def call(
    client: http_client.Client,
    url: str | yarl.URL,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,  # noqa: ASYNC109 (the request's own, passed on to the client)
) -> Response:
    async with asyncio.timeout(DEADLINE):
        return await client.request(
            method, yarl.URL(url) if isinstance(url, str) else url, headers or {}, body, timeout
        )


async def to_loopback(host: str, port: int) -> list[str]:
    """A resolve that sends every name to 127.0.0.1."""
    return ["127.0.0.1"]


async def queued_in_pool(client: http_client.Client, count: int) -> None:
    """Waits until ``count`` requests wait in the client's queue for a connection.

    The queue is the client's own: from outside, a request queued and one not yet started
    look alike, and a test of the queue needs its requests in it.
    """
    async with asyncio.timeout(DEADLINE):
        while len(client._waiting) < count:  # noqa: ASYNC110 (no event tells of the queue)
            await asyncio.sleep(0.01)


# A server that speaks just enough HTTP/1.1, with exact bytes


@dataclass
class Seen:
    """A request as RawServer read it off the wire."""

    connection: int  # Which accepted connection carried it, counted from 0.
    head: bytes  # The request line and headers, through the blank line.
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def path(self) -> str:
        return self.request_line.split(" ")[1]

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, colon, value = line.decode("latin-1").partition(":")
            if colon and key.strip().lower() == name:
                return value.strip()
        return None


@dataclass(frozen=True)
class Reply:
    """What RawServer writes for a request, and what it does next: "keep" reads the next
    request; "close" shuts its sending side, as a server closing the connection does, and
    waits for the client to close its own; "close on release" answers, then does the same
    once the test sets ``RawServer.release``."""

    data: bytes = OK
    then: Literal["keep", "close", "close on release"] = "keep"


# Given the server and a request: the reply, or None to close the connection unanswered.
Answerer = Callable[["RawServer", Seen], Awaitable[Reply | None]]


def always(data: bytes, then: Literal["keep", "close", "close on release"] = "keep") -> Answerer:
    async def answer(server: RawServer, seen: Seen) -> Reply:
        return Reply(data, then)

    return answer


async def held(server: RawServer, seen: Seen) -> Reply:
    """Answers 200 once the test sets ``server.release``."""
    await server.release.wait()
    return Reply()


async def unanswered(server: RawServer, seen: Seen) -> None:
    """Reads the request, then closes the connection without a word."""


@dataclass
class RawServer:
    """A minimal HTTP/1.1 server: reads each request, answers what ``answer`` says, and counts
    the connections it accepted, holds open, and saw the client close."""

    answer: Answerer
    host: str = "127.0.0.1"
    port: int = 0
    accepted: int = 0
    open: int = 0
    most_open: int = 0
    closed_by_client: int = 0
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _stopping: bool = False

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def connections(self) -> list[int]:
        """Which connection carried each request, in the order they came."""
        return [seen.connection for seen in self.seen]

    async def until(self, check: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(DEADLINE), self._changed:
                await self._changed.wait_for(check)
        except TimeoutError:
            raise AssertionError(f"not within {DEADLINE}s: {what}") from None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.accepted
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._writers.append(writer)
        try:
            await self._exchanges(number, reader, writer)
        except ConnectionError:
            self._client_closed()  # Reset rather than closed: closed all the same.
        finally:
            writer.close()
            self.open -= 1
            await self._note()

    async def _exchanges(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                self._client_closed()
                return
            seen = Seen(number, head, b"")
            seen.body = await reader.readexactly(int(seen.header("content-length") or 0))
            self.seen.append(seen)
            await self._note()
            reply = await self.answer(self, seen)
            if reply is None:
                return
            writer.write(reply.data)
            await writer.drain()
            if reply.then == "keep":
                continue
            if reply.then == "close on release":
                await self.release.wait()
            writer.write_eof()
            await reader.read()  # Anything more the client sends, until it closes.
            self._client_closed()
            return

    def _client_closed(self) -> None:
        if not self._stopping:  # The server closing its connections at the end is not one.
            self.closed_by_client += 1

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def stop(self) -> None:
        self._stopping = True
        self.release.set()
        for writer in self._writers:
            writer.close()
        await self.until(lambda: self.open == 0, "the raw server's connections to end")


@contextlib.asynccontextmanager
async def raw_server(
    answer: Answerer | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[RawServer]:
    """A RawServer on a port of its own (answering 200 "ok" unless told otherwise)."""
    server = RawServer(answer or always(OK), host)
    listener = await asyncio.start_server(server.serve, host, 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()
        await server.stop()


# Keep-alive and the pool


async def test_sequential_requests_to_one_origin_share_one_connection(
    client: http_client.Client,
) -> None:
    async with raw_server() as server:
        responses = [
            await call(client, server.url("/first"), body=b"1"),
            await call(client, server.url("/second"), method="GET"),
            await call(client, server.url("/third"), body=b"3"),
        ]

    assert [(r.status, r.body) for r in responses] == [(200, b"ok")] * 3
    assert [seen.path for seen in server.seen] == ["/first", "/second", "/third"]
    assert server.connections() == [0, 0, 0]
    assert server.accepted == 1


async def test_a_connection_past_its_age_is_not_reused_and_the_name_is_resolved_again() -> None:
    """A busy subscriber's connection would otherwise live for ever, and a new DNS answer for
    its name (checked by the guard's resolve) would never be used."""
    resolved: list[str] = []

    async def counting(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    async with raw_server() as server, open_client(resolve=counting, max_age_seconds=0.0) as client:
        port = yarl.URL(server.url("/")).port
        first = await call(client, f"http://partner.example:{port}/first")
        second = await call(client, f"http://partner.example:{port}/second")
        await server.until(lambda: server.closed_by_client == 1, "the client to close the first")

    assert (first.status, second.status) == (200, 200)
    assert server.connections() == [0, 1]
    assert resolved == ["partner.example", "partner.example"]


async def test_after_the_server_closes_an_idle_connection_the_next_request_opens_a_new_one(
    client: http_client.Client,
) -> None:
    async with raw_server(always(OK, then="close on release")) as server:
        first = await call(client, server.url("/first"), body=b"1")
        server.release.set()
        await server.until(
            lambda: server.closed_by_client == 1, "the client to close what the server closed"
        )
        second = await call(client, server.url("/second"), body=b"2")

    assert (first.status, second.status) == (200, 200)
    assert server.connections() == [0, 1]


async def test_no_more_than_pool_limit_connections_open_and_queued_requests_complete_later() -> (
    None
):
    async with open_client(pool_limit=2) as client, raw_server(held) as server:
        requests = [
            asyncio.create_task(call(client, server.url(f"/{n}"), body=b"x")) for n in range(6)
        ]
        await server.until(lambda: len(server.seen) == 2, "two requests held by the server")
        await queued_in_pool(client, 4)
        server.release.set()
        async with asyncio.timeout(DEADLINE):
            responses = await asyncio.gather(*requests)

    assert [response.status for response in responses] == [200] * 6
    assert sorted(seen.path for seen in server.seen) == [f"/{n}" for n in range(6)]
    assert server.most_open == 2
    # The queued requests went out on the connections handed back, not on new ones.
    assert server.accepted == 2


async def test_a_request_timing_out_in_the_queue_for_a_connection_fails_as_not_sent() -> None:
    async with open_client(pool_limit=1) as client, raw_server(held) as server:
        first = asyncio.create_task(call(client, server.url("/held")))
        await server.until(lambda: len(server.seen) == 1, "the first request held")
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/queued"), timeout=0.2)
        server.release.set()
        responses = [await first, await call(client, server.url("/after"))]

    assert failed.value.sent is False
    assert str(failed.value) == "timed out after 0.2s"
    assert [response.status for response in responses] == [200, 200]
    assert [seen.path for seen in server.seen] == ["/held", "/after"]


async def test_a_queued_request_cancelled_as_it_is_handed_a_connection_passes_it_on() -> None:
    """/b is next in the queue when /a's answer hands its connection back; /b is cancelled
    before it runs, and /c, behind it, must get the connection rather than wait for a sweep."""
    async with open_client(pool_limit=1) as client, raw_server(held) as server:
        queued: list[asyncio.Task[Response]] = []

        async def queue_two_then_release() -> None:
            await server.until(lambda: len(server.seen) == 1, "/a held")
            queued.extend(asyncio.create_task(call(client, server.url(p))) for p in ("/b", "/c"))
            await queued_in_pool(client, 2)
            server.release.set()

        helper = asyncio.create_task(queue_two_then_release())
        first = await call(client, server.url("/a"))
        # Nothing ran since /a's connection went back and woke /b.
        queued[0].cancel()
        third = await queued[1]
        await helper

    assert (first.status, third.status) == (200, 200)
    assert queued[0].cancelled()
    assert [seen.path for seen in server.seen] == ["/a", "/c"]


async def test_a_request_that_timed_out_while_connecting_gives_its_pool_slot_back() -> None:
    async def stalled_then_loopback(host: str, port: int) -> list[str]:
        if host == "stalled.example":
            await asyncio.Event().wait()
        return ["127.0.0.1"]

    async with (
        open_client(pool_limit=1, resolve=stalled_then_loopback) as client,
        raw_server() as server,
    ):
        with pytest.raises(Failed):
            await call(client, f"http://stalled.example:{server.port}/", timeout=0.2)
        # With the only slot lost, this would wait in the queue until its timeout.
        response = await call(client, f"http://served.example:{server.port}/after")

    assert response.status == 200
    assert [seen.path for seen in server.seen] == ["/after"]


async def test_an_idle_connection_is_closed_after_idle_seconds() -> None:
    async with open_client(idle_seconds=0.2) as client, raw_server() as server:
        await call(client, server.url("/"))
        await server.until(
            lambda: server.closed_by_client == 1, "the client to close its idle connection"
        )

    assert server.accepted == 1


async def test_a_connection_answered_with_connection_close_is_not_reused(
    client: http_client.Client,
) -> None:
    """The server says it will close, but leaves the connection open: the client must close
    it, and open another for the next request."""
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(always(closing)) as server:
        first = await call(client, server.url("/first"))
        await server.until(lambda: server.closed_by_client == 1, "the client to close it")
        second = await call(client, server.url("/second"))

    assert (first.status, second.status) == (200, 200)
    assert server.connections() == [0, 1]


# Response framing


async def test_a_chunked_body_is_read_whole_and_the_connection_reused(
    client: http_client.Client,
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with raw_server(always(chunked)) as server:
        first = await call(client, server.url("/first"))
        second = await call(client, server.url("/second"))

    assert (first.status, first.body) == (200, b"hello world")
    assert first.headers == {"transfer-encoding": "chunked"}
    assert second.body == b"hello world"
    assert server.connections() == [0, 0]


async def test_a_body_without_a_length_is_read_until_the_server_closes(
    client: http_client.Client,
) -> None:
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, until the end"
    async with raw_server(always(until_close, then="close")) as server:
        response = await call(client, server.url("/"))

    assert response.status == 200
    assert response.headers == {"content-type": "text/plain"}
    assert response.body == b"all of it, until the end"


async def test_an_interim_103_early_hints_is_passed_over_for_the_final_answer(
    client: http_client.Client,
) -> None:
    hints_then_answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone"
    )
    async with raw_server(always(hints_then_answer)) as server:
        response = await call(client, server.url("/"))

    assert response.status == 201
    assert response.headers == {"content-length": "4", "x-final": "yes"}
    assert response.body == b"done"


async def test_a_204_has_no_body_and_its_connection_is_reused(
    client: http_client.Client,
) -> None:
    """No length and no body: read as a body until the close, the answer would take the
    whole timeout and the connection with it."""
    async with raw_server(always(b"HTTP/1.1 204 No Content\r\nX-Seen: yes\r\n\r\n")) as server:
        first = await call(client, server.url("/first"))
        second = await call(client, server.url("/second"))

    assert (first.status, first.headers, first.body) == (204, {"x-seen": "yes"}, b"")
    assert second.status == 204
    assert server.connections() == [0, 0]


async def test_header_names_come_back_lower_cased_with_the_first_of_repeated_values(
    client: http_client.Client,
) -> None:
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nX-Repeated: first\r\n"
        b"x-REPEATED: second\r\nContent-Length: 0\r\n\r\n"
    )
    async with raw_server(always(answer)) as server:
        response = await call(client, server.url("/"))

    assert response.status == 429
    assert response.headers == {"retry-after": "7", "x-repeated": "first", "content-length": "0"}


# The caps on what is read, and the deadline


async def test_a_head_that_never_ends_is_cut_off_past_max_head_bytes_as_sent(
    client: http_client.Client,
) -> None:
    endless = b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * http_client.MAX_HEAD_BYTES
    async with raw_server(always(endless)) as server:
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/"))
        await server.until(lambda: server.closed_by_client == 1, "the client to hang up")

    assert failed.value.sent is True
    assert str(failed.value) == f"response head over {http_client.MAX_HEAD_BYTES} bytes"


async def test_a_whole_head_over_max_head_bytes_fails_as_sent_even_when_read_at_once(
    client: http_client.Client,
) -> None:
    """The head ends, a little past the cap, in one write: on loopback the client reads it in
    one go, and the cap must hold however the bytes were split on the way."""
    oversized = (
        b"HTTP/1.1 200 OK\r\nX-Filler: "
        + b"a" * http_client.MAX_HEAD_BYTES
        + b"\r\nContent-Length: 2\r\n\r\nok"
    )
    async with raw_server(always(oversized)) as server:
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/"))

    assert failed.value.sent is True
    assert str(failed.value) == f"response head over {http_client.MAX_HEAD_BYTES} bytes"


async def test_a_body_over_max_response_bytes_is_cut_to_the_cap_and_the_connection_dropped() -> (
    None
):
    long_body = b"HTTP/1.1 500 Oops\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    async with (
        open_client(max_response_bytes=100) as client,
        raw_server(always(long_body)) as server,
    ):
        first = await call(client, server.url("/first"))
        await server.until(lambda: server.closed_by_client == 1, "the client to drop it")
        second = await call(client, server.url("/second"))

    assert (first.status, first.body) == (500, b"x" * 100)
    assert second.body == b"x" * 100
    assert server.connections() == [0, 1]


async def test_a_malformed_status_line_fails_as_sent(client: http_client.Client) -> None:
    async with raw_server(always(b"HTTP/1.1 abc\r\n\r\n")) as server:
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/"))

    assert failed.value.sent is True
    assert str(failed.value).startswith("malformed response")
    assert len(server.seen) == 1


async def test_bytes_after_the_end_of_an_answer_are_not_taken_for_part_of_it(
    client: http_client.Client,
) -> None:
    """A 500 with a 4-byte body, then in the same write a second answer nobody asked for.
    The answer is the 500; what follows breaks the connection's framing, so it is dropped."""
    answer_and_more = (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nbad!"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    )
    async with raw_server(always(answer_and_more)) as server:
        first = await call(client, server.url("/first"))
        await call(client, server.url("/second"))

    assert (first.status, first.body) == (500, b"bad!")
    assert server.connections() == [0, 1]


async def test_an_unasked_for_101_fails_as_sent_without_an_error_in_the_event_loop(
    client: http_client.Client, loop_errors: list[dict[str, Any]]
) -> None:
    """The client never asks to upgrade: a 101 is a malformed answer, not a crash of the
    protocol's data_received (which the loop reports as a fatal error)."""
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    async with raw_server(always(upgrade)) as server:
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/"))

    reported = [context.get("message") for context in loop_errors]
    loop_errors.clear()  # Reported here, not once more by the fixture.
    assert failed.value.sent is True
    assert reported == []


async def test_no_answer_by_the_deadline_fails_as_sent(client: http_client.Client) -> None:
    # Writes nothing, and reads on: the client hanging up is the next thing it sees.
    async with raw_server(always(b"")) as server:
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/"), timeout=0.2)
        await server.until(lambda: server.closed_by_client == 1, "the client to hang up")

    assert failed.value.sent is True
    assert str(failed.value) == "timed out after 0.2s"


async def test_a_body_still_coming_at_the_deadline_comes_back_as_far_as_it_came(
    client: http_client.Client,
) -> None:
    """The status is the answer; the connection, mid-body, cannot be reused."""
    partial = b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\nonly this"
    async with raw_server(always(partial)) as server:
        # Ample for the head to arrive on loopback; the body never completes.
        response = await call(client, server.url("/"), timeout=1.0)
        await server.until(lambda: server.closed_by_client == 1, "the client to hang up")

    assert (response.status, response.body) == (503, b"only this")


# Sent or not sent


async def test_a_refused_connection_fails_as_not_sent(client: http_client.Client) -> None:
    with refusing_port() as port, pytest.raises(Failed) as failed:
        await call(client, f"http://127.0.0.1:{port}/")

    assert failed.value.sent is False


async def test_a_resolve_stalled_past_the_timeout_fails_as_not_sent() -> None:
    async def stalled(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with open_client(resolve=stalled) as client:
        with pytest.raises(Failed) as failed:
            await call(client, "http://partner.example/", timeout=0.2)

    assert failed.value.sent is False
    assert str(failed.value) == "timed out after 0.2s"


async def test_a_server_that_reads_the_request_and_closes_fails_as_sent(
    client: http_client.Client,
) -> None:
    async with raw_server(unanswered) as server:
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/"), body=b"payload")

    assert failed.value.sent is True
    assert [seen.body for seen in server.seen] == [b"payload"]


# What goes on the wire


async def test_a_header_value_holding_cr_lf_is_refused_and_nothing_reaches_the_server(
    client: http_client.Client,
) -> None:
    async with raw_server() as server:
        with pytest.raises(ValueError, match="control character"):
            await call(client, server.url("/"), headers={"x-note": "fine\r\nx-injected: yes"})
        # Anything the refused request had sent would have come first.
        await call(client, server.url("/after"))

    assert [seen.path for seen in server.seen] == ["/after"]
    assert server.seen[0].header("x-injected") is None


async def test_a_header_name_holding_cr_lf_is_refused_and_nothing_reaches_the_server(
    client: http_client.Client,
) -> None:
    async with raw_server() as server:
        with pytest.raises(ValueError):  # noqa: PT011 (the message is the client's to choose)
            await call(client, server.url("/"), headers={"x-note\r\nx-injected": "yes"})
        await call(client, server.url("/after"))

    assert [seen.path for seen in server.seen] == ["/after"]


async def test_a_request_target_holding_a_space_is_refused_and_nothing_reaches_the_server(
    client: http_client.Client,
) -> None:
    """An encoded URL is taken as it is (the status question builds one from the subscriber's
    status_url, which may hold a space): a space would split the request line."""
    async with raw_server() as server:
        url = yarl.URL(server.url("/status/evt-1?note=a HTTP/1.0"), encoded=True)
        with pytest.raises(ValueError):  # noqa: PT011 (the message is the client's to choose)
            await call(client, url, method="GET")
        await call(client, server.url("/after"))

    assert [seen.request_line for seen in server.seen] == ["POST /after HTTP/1.1"]


def ipv6_loopback_unavailable() -> str | None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        return f"IPv6 loopback (::1) is unavailable here: {error}"
    return None


async def test_the_host_header_of_an_ipv6_literal_is_bracketed_with_the_port(
    client: http_client.Client,
) -> None:
    reason = ipv6_loopback_unavailable()
    if reason:
        pytest.skip(reason)
    async with raw_server(host="::1") as server:
        response = await call(client, f"http://[::1]:{server.port}/", method="GET")

    assert response.status == 200
    assert server.seen[0].header("host") == f"[::1]:{server.port}"


async def test_the_host_header_names_the_host_resolve_was_asked_about_not_its_address() -> None:
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    async with open_client(resolve=resolve) as client, raw_server() as server:
        await call(client, f"http://partner.example:{server.port}/hook")

    assert asked == [("partner.example", server.port)]
    assert server.seen[0].header("host") == f"partner.example:{server.port}"


async def test_the_request_target_keeps_path_and_query_percent_encoding_as_given(
    client: http_client.Client,
) -> None:
    target = "/hooks/a%2Fb/caf%C3%A9%20au%20lait?q=a%2Bb&sum=1%3D1&euro=%E2%82%AC&empty="
    async with raw_server() as server:
        await call(client, server.url(target), method="GET")
        await call(client, yarl.URL(server.url(target), encoded=True), method="GET")

    assert [seen.request_line for seen in server.seen] == [f"GET {target} HTTP/1.1"] * 2


# TLS


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    """A CA of the test's own, and a server certificate it signed for 127.0.0.1 and
    localhost."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grpc-webhooks test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = Certificates(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass
class TlsSubscriber:
    port: int = 0
    received: list[bytes] = field(default_factory=list)

    async def deliver(self, request: web.Request) -> web.StreamResponse:
        self.received.append(await request.read())
        return web.Response(status=204)


@pytest.fixture
async def tls_subscriber(certificates: Certificates) -> AsyncIterator[TlsSubscriber]:
    """An aiohttp server on https://127.0.0.1 with the certificate the test CA signed."""
    subscriber = TlsSubscriber()
    app = web.Application()
    app.router.add_post("/deliver", subscriber.deliver)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.cert, certificates.key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    subscriber.port = runner.addresses[0][1]
    try:
        yield subscriber
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_over_tls_a_client_trusting_the_ca_delivers_to_the_certified_name_or_address(
    certificates: Certificates, tls_subscriber: TlsSubscriber, host: str
) -> None:
    trusting = ssl.create_default_context(cafile=certificates.ca)
    async with open_client(resolve=to_loopback, tls=trusting) as client:
        response = await call(
            client, f"https://{host}:{tls_subscriber.port}/deliver", body=b"payload"
        )

    assert response.status == 204
    assert tls_subscriber.received == [b"payload"]


async def test_over_tls_a_server_the_default_context_does_not_trust_is_never_sent_to(
    tls_subscriber: TlsSubscriber,
) -> None:
    async with open_client(resolve=to_loopback) as client:
        with pytest.raises(Failed) as failed:
            await call(client, f"https://localhost:{tls_subscriber.port}/deliver", body=b"x")

    assert failed.value.sent is False
    assert "certificate verify failed" in str(failed.value)
    assert tls_subscriber.received == []


async def test_over_tls_the_certificate_is_checked_against_the_url_host_not_the_address(
    certificates: Certificates, tls_subscriber: TlsSubscriber
) -> None:
    """partner.example resolves to 127.0.0.1, which the certificate names; partner.example it
    does not."""
    trusting = ssl.create_default_context(cafile=certificates.ca)
    async with open_client(resolve=to_loopback, tls=trusting) as client:
        with pytest.raises(Failed) as failed:
            await call(client, f"https://partner.example:{tls_subscriber.port}/deliver", body=b"x")

    assert failed.value.sent is False
    assert "certificate verify failed" in str(failed.value)
    assert tls_subscriber.received == []


# uvloop


def test_on_uvloop_a_post_a_reused_connection_and_a_get_all_work() -> None:
    """The publisher runs on uvloop, whose transports are not asyncio's: the same client, with
    an aiohttp server started on that loop."""

    @dataclass
    class Outcome:
        loop: str = ""
        answers: list[tuple[int, bytes]] = field(default_factory=list)
        peers: list[int] = field(default_factory=list)
        bodies: list[bytes] = field(default_factory=list)
        errors: list[str | None] = field(default_factory=list)

    outcome = Outcome()

    async def record(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        outcome.peers.append(request.transport.get_extra_info("peername")[1])
        outcome.bodies.append(await request.read())
        if request.method == "GET":
            return web.json_response({"state": "received"})
        return web.Response(status=202, text="queued")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        outcome.loop = type(loop).__module__
        loop.set_exception_handler(lambda _, context: outcome.errors.append(context.get("message")))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", record)
        async with on_loopback(app) as base, open_client() as client:
            for method, path, body in [
                ("POST", "/deliver", b"first"),
                ("POST", "/deliver", b"second"),
                ("GET", "/status/evt-1", b""),
            ]:
                response = await call(client, base + path, method=method, body=body)
                outcome.answers.append((response.status, response.body))
        gc.collect()

    uvloop.run(scenario())

    assert outcome.loop.startswith("uvloop")
    assert outcome.answers == [(202, b"queued"), (202, b"queued"), (200, b'{"state": "received"}')]
    assert outcome.bodies == [b"first", b"second", b""]
    assert len(set(outcome.peers)) == 1
    assert outcome.errors == []


# close()


async def test_close_closes_idle_connections_and_later_requests_fail_as_not_sent() -> None:
    async with open_client() as client, raw_server() as server:
        await call(client, server.url("/before"))
        await client.close()
        await server.until(lambda: server.closed_by_client == 1, "the idle connection closed")
        with pytest.raises(Failed) as failed:
            await call(client, server.url("/after"))

    assert failed.value.sent is False
    assert [seen.path for seen in server.seen] == ["/before"]
    assert server.accepted == 1


async def test_close_fails_requests_queued_for_a_connection_as_not_sent() -> None:
    async with open_client(pool_limit=1) as client, raw_server(held) as server:
        first = asyncio.create_task(call(client, server.url("/held")))
        await server.until(lambda: len(server.seen) == 1, "the first request held")
        queued = asyncio.create_task(call(client, server.url("/queued")))
        await queued_in_pool(client, 1)
        await client.close()
        with pytest.raises(Failed) as failed:
            await queued
        server.release.set()
        await first

    assert failed.value.sent is False
    assert [seen.path for seen in server.seen] == ["/held"]


async def test_a_request_in_flight_at_close_gets_its_answer_and_its_connection_then_closes() -> (
    None
):
    async with open_client() as client, raw_server(held) as server:
        in_flight = asyncio.create_task(call(client, server.url("/held")))
        await server.until(lambda: len(server.seen) == 1, "the request held")
        await client.close()
        server.release.set()
        response = await in_flight
        await server.until(lambda: server.closed_by_client == 1, "the connection closed")

    assert response.status == 200


# Found by review: a flood after the head, a server that stops reading, an address that
# never answers, and a close the event loop has not read yet


async def test_trailers_without_end_are_cut_off_at_the_caps_and_the_connection_dropped() -> None:
    """The parser buffers a trailer whole; counted off the wire, the answer stops at the body
    cap plus MAX_HEAD_BYTES instead of growing until the deadline (above DEADLINE here)."""
    hung_up = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        writer.write(b"X-Trailer: ")
        try:
            while True:
                writer.write(b"a" * 65536)
                await writer.drain()
        except ConnectionError:
            hung_up.set()
        finally:
            writer.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_client(max_response_bytes=4096) as client:
            response = await call(client, f"http://127.0.0.1:{port}/", timeout=60.0)
            async with asyncio.timeout(DEADLINE):
                await hung_up.wait()
    finally:
        server.close()

    assert (response.status, response.body) == (200, b"ok")
    assert "x-trailer" not in response.headers


async def test_a_request_the_server_never_reads_is_aborted_not_left_to_drain() -> None:
    """close() would keep the socket and the unsent body until the server reads them, which a
    stuck subscriber never does; after the deadline the connection is reset instead."""
    body = b"x" * (16 << 20)
    stalled = asyncio.Event()
    received: list[int] = []

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()
        total = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
        received.append(total)
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_client() as client:
            with pytest.raises(Failed) as failed:
                await call(client, f"http://127.0.0.1:{port}/", body=body, timeout=0.5)
            stalled.set()
            async with asyncio.timeout(DEADLINE):
                while not received:  # noqa: ASYNC110 (the server's handler ends on its own)
                    await asyncio.sleep(0.01)
    finally:
        server.close()

    assert failed.value.sent
    assert received[0] < len(body)


async def test_an_address_that_never_answers_is_passed_over_for_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    real_create_connection: Callable[..., Any] = loop.create_connection
    tried: list[str] = []

    async def create_connection(factory: Any, host: str, *args: Any, **kwargs: Any) -> Any:
        tried.append(host)
        if host == "192.0.2.1":
            await asyncio.Event().wait()  # A host that drops the SYN.
        return await real_create_connection(factory, host, *args, **kwargs)

    async def two_addresses(host: str, port: int) -> list[str]:
        return ["192.0.2.1", "127.0.0.1"]

    monkeypatch.setattr(loop, "create_connection", create_connection)
    async with raw_server() as server:
        port = yarl.URL(server.url("/")).port
        async with open_client(resolve=two_addresses, connect_timeout=0.2) as client:
            response = await call(client, f"http://partner.example:{port}/")

    assert response.status == 200
    assert tried == ["192.0.2.1", "127.0.0.1"]


async def test_an_idle_connection_the_server_closed_is_not_used_before_the_loop_reads_it(
    client: http_client.Client,
) -> None:
    """The close is on the socket, but the event loop has not run since: taking the idle
    connection then would send into a closed connection and report the request as sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(DEADLINE)
    close_first, first_closed = threading.Event(), threading.Event()
    lines: list[bytes] = []

    def serve() -> None:
        for number in range(2):
            connection, _ = listener.accept()
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += connection.recv(65536)
                lines.append(head.split(b"\r\n", 1)[0])
                connection.sendall(OK)
                if number == 0:
                    close_first.wait(DEADLINE)
            first_closed.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}/"
    first = await call(client, url)
    # Without yielding to the event loop: the server closes, and the close reaches the socket.
    [idle] = client._idle[("http", "127.0.0.1", port)]
    assert idle._transport is not None
    descriptor = idle._transport.get_extra_info("socket").fileno()
    close_first.set()
    assert first_closed.wait(DEADLINE)
    assert select.select([descriptor], [], [], DEADLINE)[0] == [descriptor]
    second = await call(client, url)
    server.join(DEADLINE)
    listener.close()

    assert (first.status, second.status) == (200, 200)
    assert lines == [b"POST / HTTP/1.1", b"POST / HTTP/1.1"]
