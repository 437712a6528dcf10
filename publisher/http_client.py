"""A lean HTTP/1.1 client for deliveries and status questions: keep-alive connections to
addresses the caller has checked, and nothing else.

Why not aiohttp's client: in e2e_http its request machinery (tracing, timers,
payload registry, cookie and redirect handling) was the publisher's largest
cost. Against the same aiohttp server, one 1 KiB POST cost 95-115 µs of CPU
through ``aiohttp.ClientSession`` and 22 µs through a protocol feeding
httptools' response parser (llhttp, the C parser aiohttp and Node.js use).

What it does: one request at a time per connection; idle connections kept per
origin (scheme, host, port) for reuse, at most ``pool_limit`` open in all; TLS
verified against the URL's host name; connections only to the addresses
``resolve`` returns, so the SSRF guard checks exactly what is connected to.
What it leaves out on purpose: redirects, proxies (the environment's proxy
variables would route around the guard), cookies, compression, pipelining,
``Expect: 100-continue`` and HTTP/2.
"""

from __future__ import annotations

import asyncio
import collections
import re
import select
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

import httptools
import yarl

from common.records import record

# Addresses to connect to for (host, port), in order; the guard's resolve.
Resolve = Callable[[str, int], Awaitable[list[str]]]

# A status line and headers longer than this are not an answer worth reading.
MAX_HEAD_BYTES = 65536
# Servers commonly close keep-alive connections idle for 5-75 s. Reusing one the
# server is closing at that moment costs an uncertain outcome (the request may have
# been read), so connections are dropped well before most servers would drop them.
IDLE_SECONDS = 4.0
# A connection kept busy is not reused past this age either: a subscriber's new DNS
# answer (a move, a failover) reaches the next connection, whose addresses the guard
# checks again.
MAX_AGE_SECONDS = 300.0

_Origin = tuple[str, str, int]


class Failed(Exception):
    """The request got no answer. ``sent``: whether any of it may have reached the server."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.sent = sent


@record
class Response:
    status: int
    # Lower-case names; the first value of a repeated header.
    headers: Mapping[str, str]
    # At most the client's max_response_bytes, and shorter if the body broke off or
    # the deadline came first: the status is the answer either way.
    body: bytes


class Client:
    def __init__(
        self,
        *,
        resolve: Resolve | None,
        connect_timeout: float,
        max_response_bytes: int,
        pool_limit: int,
        tls: ssl.SSLContext | None = None,
        idle_seconds: float = IDLE_SECONDS,
        max_age_seconds: float = MAX_AGE_SECONDS,
    ) -> None:
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._max_body = max_response_bytes
        self._limit = pool_limit
        self._tls = tls
        self._idle_seconds = idle_seconds
        self._max_age = max_age_seconds
        # Most recently used last: it is the least likely to have been closed by the server.
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        url: yarl.URL,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109 (one deadline over connect, send and answer)
    ) -> Response:
        """Sends one request and reads its answer within ``timeout`` seconds.

        ValueError before anything is sent for a URL or header this client will not
        send; Failed when no status line came back.
        """
        origin = _origin(url)
        head = _head(method, url, headers, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # An idle connection is the common case, and needs no deadline to take it.
        connection = self._idle_connection(origin, loop.time())
        if connection is None:
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await self._new_connection(origin)
            except TimeoutError:
                raise Failed(f"timed out after {timeout:g}s", sent=False) from None
            except (OSError, _Broken) as error:
                raise Failed(str(error) or type(error).__name__, sent=False) from None
        # From here on the server may get the request.
        try:
            status, answer_headers = await connection.exchange(head, body, deadline)
            answer_body = await connection.rest_of_body()
        except TimeoutError:
            self._discard(connection)
            raise Failed(f"timed out after {timeout:g}s", sent=True) from None
        except (OSError, _Broken) as error:
            self._discard(connection)
            raise Failed(str(error) or type(error).__name__, sent=True) from None
        except BaseException:
            self._discard(connection)
            raise
        if connection.reusable:
            self._keep(connection)
        else:
            self._discard(connection)
        return Response(status, answer_headers, answer_body)

    def _idle_connection(self, origin: _Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if self._reusable(connection, now):
                return connection
            self._discard(connection)
        return None

    async def _new_connection(self, origin: _Origin) -> _Connection:
        """Opens a connection once there is room (or hands over one that came back idle)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise _Broken("the client is closed")
            if self._open < self._limit or self._close_one_idle():
                break
            # Every connection is busy: wait for one to come back or close.
            waiter = loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # Pass the turn this waiter was given on.
                raise
            connection = self._idle_connection(origin, loop.time())
            if connection is not None:
                return connection
        self._open += 1
        try:
            return await self._connect(origin)
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self, origin: _Origin) -> _Connection:
        scheme, host, port = origin
        addresses = [host] if self._resolve is None else await self._resolve(host, port)
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
                self._tls.set_alpn_protocols(["http/1.1"])
            tls = self._tls
        loop = asyncio.get_running_loop()
        failure: Exception = _Broken(f"{host} has no address to connect to")
        # The next address may answer where one refused or never answered: a name's records
        # can include a host that is down. The request's deadline bounds them all.
        for address in addresses:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, connection = await loop.create_connection(
                        lambda: _Connection(origin, self._max_body),
                        address,
                        port,
                        ssl=tls,
                        server_hostname=host if tls is not None else None,
                    )
            except TimeoutError:
                failure = _Broken(f"connecting timed out after {self._connect_timeout:g}s")
                continue
            except OSError as error:
                failure = error
                continue
            return connection
        raise failure

    def _reusable(self, connection: _Connection, now: float) -> bool:
        return (
            connection.usable
            and now - connection.idle_since < self._idle_seconds
            and now - connection.opened_at < self._max_age
        )

    def _keep(self, connection: _Connection) -> None:
        if self._closed:
            self._discard(connection)
            return
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(self._idle_seconds, self._close_stale)
        self._wake()

    def _discard(self, connection: _Connection) -> None:
        if connection.counted:
            connection.counted = False
            self._open -= 1
        connection.close()
        self._wake()

    def _close_one_idle(self) -> bool:
        """Closes the longest-idle connection to any origin, to make room for a new one."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        self._idle[oldest.origin].remove(oldest)
        self._discard(oldest)
        return True

    def _close_stale(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for origin, idle in list(self._idle.items()):
            stale = [c for c in idle if not self._reusable(c, now)]
            for connection in stale:
                idle.remove(connection)
                self._discard(connection)
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(
                self._idle_seconds, self._close_stale
            )

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                self._discard(connection)
        self._idle.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)


class _Broken(Exception):
    """The connection failed in a way that is not an OSError (a malformed answer, say)."""


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time: the request out, then the answer parsed."""

    def __init__(self, origin: _Origin, max_body: int) -> None:
        self.origin = origin
        self.idle_since = 0.0
        self.opened_at = asyncio.get_running_loop().time()
        # Whether the client's count of open connections includes this one.
        self.counted = True
        self._max_body = max_body
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self._busy = False
        self._parser: httptools.HttpResponseParser | None = None
        self._head_bytes = 0
        # Bytes received after the head (see data_received).
        self._rest_bytes = 0
        # The head's size as parsed: a head read in one chunk is counted here.
        self._head_size = 0
        # A second answer began after the first was complete: nothing of it is taken.
        self._unexpected = False
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_done: asyncio.Future[None] | None = None
        self._message_done: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._overflow = False
        # The exchange's deadline: one timer, cheaper than asyncio.timeout's task cancellation.
        self._timer: asyncio.TimerHandle | None = None
        # Asks the socket itself whether anything arrived while idle (see usable).
        self._poll = select.poll()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._parser is None:
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self._fail(_Broken("unexpected data from the server"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_Broken("the server switched protocols unasked"))
            return
        except httptools.HttpParserError as error:
            self._fail(_Broken(f"malformed response: {error}"))
            return
        if self._head_done is not None and not self._head_done.done():
            # Counted only while the head is incomplete: the chunk that completes it may
            # also carry any amount of body.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(_Broken(f"response head over {MAX_HEAD_BYTES} bytes"))
        elif not self._complete:
            # What follows the head is bounded as it comes off the wire, not as parsed:
            # chunk framing and trailers (which the parser buffers whole) count too.
            self._rest_bytes += len(data)
            if self._rest_bytes > self._max_body + MAX_HEAD_BYTES:
                self._overflow = True
                self._settle(self._message_done, None)
                self.close()

    def eof_received(self) -> None:
        # The server closed its side: not usable from this moment, before connection_lost
        # runs (returning None lets the transport close itself).
        self._lost = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._transport = None
        # A body without a length ends when the connection does.
        self._settle(self._head_done, ConnectionResetError("the server closed the connection"))
        self._settle(self._message_done, None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            # Bytes after the answer, in the same read: the server is answering something
            # not asked, and the connection's framing can no longer be trusted.
            self._unexpected = True

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._unexpected or self._status:
            return  # A trailer, after the body: not part of the answer's head.
        self._head_size += len(name) + len(value) + 4
        key = name.decode("latin-1").lower()
        if key not in self._headers:
            self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self._unexpected:
            return
        if self._head_size > MAX_HEAD_BYTES:
            self._fail(_Broken(f"response head over {MAX_HEAD_BYTES} bytes"))
            return
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (102, 103): the real one follows on the same message stream.
            self._headers = {}
            self._head_size = 0
            return
        self._status = status
        self._settle(self._head_done, None)

    def on_body(self, chunk: bytes) -> None:
        if self._unexpected:
            return
        room = self._max_body - len(self._body)
        self._body += chunk[:room]
        if len(chunk) > room:
            # The rest is not read: the connection is closed instead of drained.
            self._overflow = True
            self._settle(self._message_done, None)

    def on_message_complete(self) -> None:
        if self._unexpected or self._status == 0:
            return  # The end of an interim answer.
        assert self._parser is not None
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._settle(self._message_done, None)

    # The exchange

    @property
    def usable(self) -> bool:
        """Idle, open, and with nothing come in since: an idle connection the server closed
        has its end-of-file waiting on the socket, which the event loop may read only after
        the task taking the connection runs (0.4 µs of CPU to ask here)."""
        return (
            not (self._lost or self._busy)
            and self._transport is not None
            and not self._transport.is_closing()
            and not self._poll.poll(0)
        )

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self._keep_alive
            and not (self._overflow or self._unexpected or self._lost)
            # The deadline may have closed it after the answer was complete.
            and self._transport is not None
        )

    async def exchange(
        self, head: bytes, body: bytes, deadline: float
    ) -> tuple[int, Mapping[str, str]]:
        """Writes the request; returns the answer's status and headers by ``deadline``
        (TimeoutError after it)."""
        loop = asyncio.get_running_loop()
        self._busy = True
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = self._head_size = self._rest_bytes = 0
        self._status = 0
        self._headers = {}
        self._body = bytearray()
        self._complete = self._keep_alive = self._overflow = self._unexpected = False
        self._head_done = loop.create_future()
        self._message_done = loop.create_future()
        if self._transport is None:
            raise ConnectionResetError("the server closed the connection")
        self._timer = loop.call_at(deadline, self._time_out)
        self._transport.writelines((head, body) if body else (head,))
        await self._head_done
        return self._status, self._headers

    async def rest_of_body(self) -> bytes:
        """The body, whole or as far as it came by the deadline: the status is the answer."""
        assert self._message_done is not None
        await self._message_done
        self._busy = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return bytes(self._body)

    def _time_out(self) -> None:
        self._timer = None
        self._settle(self._head_done, TimeoutError())
        # The body so far is what there is; the connection cannot be reused mid-answer.
        self._settle(self._message_done, None)
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            if self._busy or self._transport.get_write_buffer_size():
                # Mid-exchange, or with a request the server never read: close() would
                # keep the socket open until the server reads it, perhaps never.
                self._transport.abort()
            else:
                self._transport.close()
            self._transport = None
        self._busy = False

    def _fail(self, error: Exception) -> None:
        # Before the head, the request failed; after it, the body just ends here.
        self._settle(self._head_done, error)
        self._settle(self._message_done, None)
        self.close()

    @staticmethod
    def _settle(future: asyncio.Future[None] | None, outcome: Exception | None) -> None:
        if future is None or future.done():
            return
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)


def _origin(url: yarl.URL) -> _Origin:
    if url.scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {url.scheme!r}")
    if not url.raw_host or url.port is None:
        raise ValueError("the URL has no host")
    return url.scheme, url.raw_host, url.port


def _head(method: str, url: yarl.URL, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request line and headers; ValueError if a value would break the framing."""
    target = url.raw_path_qs or "/"
    if _UNSAFE_TARGET.search(target):
        raise ValueError(f"the request target {target!r} holds a space or a control character")
    host = url.host_port_subcomponent
    if host is None or _UNSAFE_TARGET.search(host):
        raise ValueError(f"the host {host!r} holds a space or a control character")
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"content-length: {len(body)}")
    for name, value in headers.items():
        if name not in _TOKENS:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if len(_TOKENS) < 256:
                _TOKENS.add(name)
        if _UNSAFE.search(value):
            raise ValueError(f"header {name!r} holds a control character")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


# A header value may not hold CR, LF, NUL or another control but tab: CR and LF would
# inject headers of the sender's choosing.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# A request target is printable ASCII (a URL parsed as already encoded may hold spaces).
_UNSAFE_TARGET = re.compile("[^\x21-\x7e]")
# Header names (RFC 9110 tokens); those seen once are remembered, since they are few.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKENS: set[str] = set()
