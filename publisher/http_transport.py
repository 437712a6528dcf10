"""Delivery over HTTP: one POST per attempt, signed with Standard Webhooks headers and a JWT.

Both signatures cover the exact body bytes sent. Status codes and client
errors are classified here and nowhere else: the question that matters for
each failure is whether the request may have reached the subscriber.
"""

from __future__ import annotations

import email.utils
import importlib.metadata
import json
import math
import ssl
import time
import urllib.parse
from datetime import UTC

import yarl

from common import signing
from publisher import http_client, ssrf
from publisher import transport as tx

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

try:
    _VERSION = importlib.metadata.version("grpc-webhooks")
except importlib.metadata.PackageNotFoundError:
    _VERSION = "dev"
USER_AGENT = f"grpc-webhooks/{_VERSION}"

# The subscriber asks for a pause with these; other statuses follow the schedule.
_RETRY_AFTER_STATUSES = {429, 503}
# "{event_id}" in a status URL, as a parsed URL spells it.
_ENCODED_PLACEHOLDER = "%7Bevent_id%7D"


class HttpTransport:
    def __init__(
        self,
        *,
        guard: ssrf.Guard | None,
        connect_timeout: float = 5.0,
        max_response_bytes: int = 65536,
        pool_limit: int = 100,
        tls: ssl.SSLContext | None = None,
        now: tx.Clock = time.time,
    ) -> None:
        self._now = now
        self._client = http_client.Client(
            # Every connection goes to addresses the guard checked when it was opened (an
            # IP literal included): what it refuses raises ssrf.Refused from the request.
            resolve=None if guard is None else guard.resolve,
            connect_timeout=connect_timeout,
            max_response_bytes=max_response_bytes,
            pool_limit=pool_limit,
            tls=tls,
        )

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
            response = await self._client.request(
                "POST", url, self._headers(attempt, body, content_type), body, attempt.timeout
            )
        except ssrf.Refused as refused:
            return tx.Result(tx.Outcome.FAILED, error=f"not sent: {refused}")
        except ValueError as error:
            # Raised before a byte is written: an unusable URL, or a header value that
            # would inject headers.
            return tx.Result(tx.Outcome.FAILED, error=tx.excerpt(f"not sent: {error}"))
        except http_client.Failed as failed:
            if failed.sent:
                return tx.Result(
                    tx.Outcome.UNCERTAIN, error=tx.excerpt(f"sent, but no answer: {failed}")
                )
            return tx.Result(tx.Outcome.FAILED, error=tx.excerpt(f"not sent: {failed}"))
        return self._classify(response)

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

    def _classify(self, response: http_client.Response) -> tx.Result:
        status = response.status
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
        text = response.body.decode("utf-8", "replace")
        return tx.Result(
            tx.Outcome.FAILED,
            status_code=status,
            error=f"HTTP {status}: " + tx.excerpt(text),
            retry_after=retry_after,
            gone=status == 410,
        )

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        """GETs the subscriber's status URL, signed with a status token for the event."""
        if not attempt.status_url:
            return tx.Receipt.UNANSWERED
        event_id = urllib.parse.quote(attempt.event_id, safe="")
        headers = {
            "authorization": tx.status_bearer(attempt, self._now()),
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",
        }
        try:
            # Parsed first, so that a space or a non-ASCII character in the registered URL
            # is percent-encoded (and a non-ASCII host made ASCII), escapes already there
            # kept; the placeholder comes out encoded too, and the quoted id goes in its place.
            template = str(yarl.URL(attempt.status_url))
            url = yarl.URL(template.replace(_ENCODED_PLACEHOLDER, event_id), encoded=True)
            response = await self._client.request(
                "GET", url, headers, b"", min(attempt.timeout, tx.STATUS_TIMEOUT_SECONDS)
            )
            if response.status == 404:
                return tx.Receipt.MISSING
            if response.status != 200:
                return tx.Receipt.UNANSWERED
            answer = json.loads(response.body)
        # RecursionError: json.loads on a body nested deeper than the interpreter's stack.
        except (ssrf.Refused, ValueError, RecursionError, http_client.Failed):
            return tx.Receipt.UNANSWERED
        state = answer.get("state") if isinstance(answer, dict) else None
        return tx.receipt_of(state) if isinstance(state, str) else tx.Receipt.UNANSWERED

    async def close(self) -> None:
        await self._client.close()


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
