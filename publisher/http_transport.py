"""Delivery over HTTP: one POST per attempt, signed with Standard Webhooks headers and a JWT.

Both signatures cover the exact body bytes sent. Status codes and client
errors are classified here and nowhere else: the question that matters for
each failure is whether the request may have reached the subscriber.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.utils
import importlib.metadata
import json
import math
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC

import aiohttp
import yarl
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from common import signing
from publisher import ssrf
from publisher import transport as tx

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

try:
    _VERSION = importlib.metadata.version("grpc-webhooks")
except importlib.metadata.PackageNotFoundError:
    _VERSION = "dev"
USER_AGENT = f"grpc-webhooks/{_VERSION}"

# The subscriber asks for a pause with these; other statuses follow the schedule.
_RETRY_AFTER_STATUSES = {429, 503}


@dataclass
class _Progress:
    """Whether aiohttp holds a connection for the request, after which the subscriber may
    have it: aiohttp writes the request as soon as it has one."""

    sent: bool = False


# The progress of the delivery this task is sending; status questions leave it unset.
_progress: contextvars.ContextVar[_Progress | None] = contextvars.ContextVar(
    "_progress", default=None
)


class _Connector(aiohttp.TCPConnector):
    """Marks the task's delivery as possibly sent once a connection is handed to it.

    aiohttp's request tracing could tell the same, but it builds several trace
    objects per request even for unwatched signals: 7% of the publisher's CPU
    in e2e_http. ``connect`` runs inside the task that called ``post``, so the
    context variable is that delivery's.
    """

    # aiohttp's signature, timeout parameter included.
    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        progress = _progress.get()
        if progress is not None:
            progress.sent = True
        return connection


class HttpTransport:
    def __init__(
        self,
        *,
        guard: ssrf.Guard | None,
        connect_timeout: float = 5.0,
        max_response_bytes: int = 65536,
        pool_limit: int = 100,
        now: tx.Clock = time.time,
    ) -> None:
        self._guard = guard
        self._connect_timeout = connect_timeout
        self._max_response_bytes = max_response_bytes
        self._pool_limit = pool_limit
        self._now = now
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, since a session belongs to the loop it was made in.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=_Connector(
                    limit=self._pool_limit,
                    resolver=None if self._guard is None else ssrf.GuardedResolver(self._guard),
                ),
                # One subscriber's cookies must not ride on later deliveries.
                cookie_jar=aiohttp.DummyCookieJar(),
                # A compressed body would inflate past the read cap in one chunk.
                auto_decompress=False,
            )
        return self._session

    async def send(self, attempt: tx.Attempt) -> tx.Result:
        if attempt.body_format == "raw":
            body, content_type = attempt.payload, attempt.content_type
        elif attempt.body_format == "form":
            body = urllib.parse.urlencode({"payload": attempt.payload}).encode("ascii")
            content_type = FORM_CONTENT_TYPE
        else:
            return tx.Result(
                tx.Outcome.FAILED, error=f"not sent: unknown body_format {attempt.body_format!r}"
            )
        try:
            url = yarl.URL(attempt.endpoint)
        except ValueError as error:
            return tx.Result(
                tx.Outcome.FAILED, error=tx.excerpt(f"not sent: bad endpoint: {error}")
            )
        progress = _Progress()
        tracking = _progress.set(progress)
        try:
            # The guarded resolver never sees IP literals, so they are checked here.
            if self._guard is not None and url.raw_host:
                self._guard.check_literal(url.raw_host)
            async with self._client().post(
                url,
                data=body,
                headers=self._headers(attempt, body, content_type),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=attempt.timeout, sock_connect=self._connect_timeout
                ),
            ) as response:
                return await self._classify(response)
        except ssrf.Refused as refused:
            return tx.Result(tx.Outcome.FAILED, error=f"not sent: {refused}")
        except ValueError as error:
            # Raised before a byte is written (before a connection is taken): an
            # unusable URL, or a header value that would inject headers.
            return tx.Result(tx.Outcome.FAILED, error=tx.excerpt(f"not sent: {error}"))
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            reason = self._describe(error, attempt)
            if progress.sent:
                return tx.Result(
                    tx.Outcome.UNCERTAIN, error=tx.excerpt(f"sent, but no answer: {reason}")
                )
            return tx.Result(tx.Outcome.FAILED, error=tx.excerpt(f"not sent: {reason}"))
        finally:
            # A status question later in the same task must not mark this delivery.
            _progress.reset(tracking)

    def _headers(self, attempt: tx.Attempt, body: bytes, content_type: str) -> dict[str, str]:
        now = self._now()
        timestamp = int(now)
        # The JWT binds the event's payload, as on gRPC, whatever body format carries it.
        authorization = tx.bearer(attempt, attempt.payload, now)
        return {
            "content-type": content_type,
            "webhook-id": attempt.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.standard_signatures(
                attempt.keys, attempt.event_id, timestamp, body
            ),
            "webhook-event-type": attempt.event_type,
            "webhook-delivery-id": attempt.delivery_id,
            "webhook-attempt": str(attempt.attempt),
            "authorization": authorization,
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",
        }

    async def _classify(self, response: aiohttp.ClientResponse) -> tx.Result:
        status = response.status
        # Read even on success, so that a short body leaves the connection reusable.
        text = (await self._read_capped(response)).decode("utf-8", "replace")
        if 200 <= status < 300:
            return tx.Result(tx.Outcome.DELIVERED, status_code=status)
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            return tx.Result(
                tx.Outcome.FAILED,
                status_code=status,
                error=tx.excerpt(f"HTTP {status}: redirect not followed (Location: {location})"),
            )
        retry_after = None
        if status in _RETRY_AFTER_STATUSES:
            retry_after = _retry_after(response.headers.get("retry-after"), self._now())
        return tx.Result(
            tx.Outcome.FAILED,
            status_code=status,
            error=f"HTTP {status}: " + tx.excerpt(text),
            retry_after=retry_after,
            gone=status == 410,
        )

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        """At most ``max_response_bytes`` of the body; what is left unread closes the connection.

        The status is the subscriber's answer, so a body that stalls past the
        timeout or breaks off only shortens the excerpt.
        """
        body = bytearray()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            while len(body) < self._max_response_bytes:
                chunk = await response.content.read(self._max_response_bytes - len(body))
                if not chunk:
                    break
                body += chunk
        return bytes(body)

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        """GETs the subscriber's status URL, signed with a status token for the event."""
        if not attempt.status_url:
            return tx.Receipt.UNANSWERED
        event_id = urllib.parse.quote(attempt.event_id, safe="")
        authorization = tx.status_bearer(attempt, self._now())
        try:
            url = yarl.URL(attempt.status_url.replace("{event_id}", event_id), encoded=True)
            if self._guard is not None and url.raw_host:
                self._guard.check_literal(url.raw_host)
            async with self._client().get(
                url,
                headers={"authorization": authorization, "user-agent": USER_AGENT},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=min(attempt.timeout, tx.STATUS_TIMEOUT_SECONDS),
                    sock_connect=self._connect_timeout,
                ),
            ) as response:
                if response.status == 404:
                    return tx.Receipt.MISSING
                if response.status != 200:
                    return tx.Receipt.UNANSWERED
                answer = json.loads(await self._read_capped(response))
        # RecursionError: json.loads on a body nested deeper than the interpreter's stack.
        except (
            ssrf.Refused,
            ValueError,
            RecursionError,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ):
            return tx.Receipt.UNANSWERED
        state = answer.get("state") if isinstance(answer, dict) else None
        return tx.receipt_of(state) if isinstance(state, str) else tx.Receipt.UNANSWERED

    def _describe(self, error: BaseException, attempt: tx.Attempt) -> str:
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return f"connecting timed out after {self._connect_timeout:g}s"
        if isinstance(error, TimeoutError):
            return f"timed out after {attempt.timeout:g}s"
        return str(error) or type(error).__name__

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from Retry-After (delta seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        # parsedate_to_datetime leaves "-0000" naive; HTTP dates are always GMT.
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - now
    return delay if delay >= 0 else None
