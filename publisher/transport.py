"""What the dispatcher hands a transport, and what a transport hands back.

A transport makes one attempt and classifies what happened. It never touches
the database and never raises for a failed delivery: every failure is a
``Result`` so that the dispatcher records it like any other outcome.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from common import signing
from common.records import record

Clock = Callable[[], float]

# How much error text or response body an attempt log keeps.
EXCERPT_BYTES = 1024


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    # Refused, or never sent (connection refused, DNS, SSRF guard): safe to retry.
    FAILED = "failed"
    # Sent, but whether it arrived is unknown (deadline passed, connection broke mid-response).
    UNCERTAIN = "uncertain"
    # The subscriber said it already has the event (status check).
    CONFIRMED = "confirmed"


@record
class Attempt:
    """One attempt to deliver one event to one subscriber."""

    delivery_id: str
    attempt: int
    event_id: str
    event_type: str
    payload: bytes
    content_type: str
    created_at: float
    subscriber_id: str
    endpoint: str
    # "raw" or "form"; HTTP only.
    body_format: str
    # Keys of the subscriber's valid secrets, newest first; all sign (rotation).
    keys: tuple[bytes, ...]
    # The publisher's name, the JWT issuer.
    issuer: str
    timeout: float
    # HTTP only: where to ask whether the subscriber has an event ("" = cannot ask).
    status_url: str = ""


@record
class Result:
    outcome: Outcome
    # gRPC status code value or HTTP status; 0 when nothing answered.
    status_code: int = 0
    error: str = ""
    # Seconds the subscriber asked us to wait (HTTP Retry-After).
    retry_after: float | None = None
    # The subscriber said it is gone for good (HTTP 410): disable it.
    gone: bool = False


class Receipt(enum.Enum):
    """What a subscriber answered when asked whether it has an event."""

    HAS_IT = "has_it"
    MISSING = "missing"
    # No answer, or no way to ask (an HTTP subscriber without a status URL).
    UNANSWERED = "unanswered"


# Asking is cheap for the subscriber; it should not take as long as a delivery may.
STATUS_TIMEOUT_SECONDS = 5.0

# The subscriber's own words (the reference subscriber's GetStatus states, lower-cased).
_HELD_STATES = {"received", "processed", "failed"}


def receipt_of(state: str) -> Receipt:
    if state in _HELD_STATES:
        return Receipt.HAS_IT
    if state == "unknown":
        return Receipt.MISSING
    return Receipt.UNANSWERED


class Transport(Protocol):
    async def send(self, attempt: Attempt) -> Result: ...

    async def status(self, attempt: Attempt) -> Receipt:
        """Asks the subscriber whether it already has ``attempt``'s event; never raises."""
        ...

    async def close(self) -> None: ...


def bearer(attempt: Attempt, payload: bytes, now: float) -> str:
    """The ``authorization`` value of a delivery: a JWT binding the attempt and ``payload``."""
    token = signing.sign_delivery(
        attempt.keys[0],
        issuer=attempt.issuer,
        audience=attempt.subscriber_id,
        event_id=attempt.event_id,
        event_type=attempt.event_type,
        attempt=attempt.attempt,
        payload=payload,
        now=now,
    )
    return f"Bearer {token}"


def status_bearer(attempt: Attempt, now: float) -> str:
    """The ``authorization`` value of a status question about ``attempt``'s event.

    Not a delivery token: whoever sees the question must not be able to deliver
    the event with it.
    """
    token = signing.sign_status(
        attempt.keys[0],
        issuer=attempt.issuer,
        audience=attempt.subscriber_id,
        event_id=attempt.event_id,
        now=now,
    )
    return f"Bearer {token}"


def excerpt(text: str) -> str:
    """Error or body text cut to what an attempt log keeps."""
    data = text.encode("utf-8", "replace")
    if len(data) <= EXCERPT_BYTES:
        return text
    return data[:EXCERPT_BYTES].decode("utf-8", "ignore") + "…"
