"""The publisher's domain records: what the store takes and returns.

Records (see common.records: frozen to the type checker), free of protobuf and SQL,
so that the servicer, the store and the dispatcher agree on one vocabulary.
"""

from __future__ import annotations

import enum
from dataclasses import field

from common.records import record


class Protocol(enum.StrEnum):
    GRPC = "grpc"
    HTTP = "http"


class SubscriberState(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    DISABLED = "disabled"


class BodyFormat(enum.StrEnum):
    RAW = "raw"
    FORM = "form"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    # Pending, but its subscriber is paused or disabled: not claimed until resumed.
    HELD = "held"
    DELIVERED = "delivered"
    # Retries exhausted: the dead-letter state.
    FAILED = "failed"


@record
class SubscriberSpec:
    """What a caller may set on a subscriber."""

    name: str
    endpoint: str
    protocol: Protocol
    event_types: tuple[str, ...]
    retry_schedule: tuple[float, ...]
    contact_email: str
    body_format: BodyFormat
    status_url: str
    # Sends in flight to it at most, per publisher process; 0: the publisher's limit.
    max_in_flight: int = 0


@record
class Subscriber:
    id: str
    spec: SubscriberSpec
    secret: str
    state: SubscriberState
    state_reason: str
    created_at: float
    updated_at: float
    # When it started failing without a success since (None while healthy).
    failing_since: float | None = None
    # The secret before the last rotation, valid (and signing) until it expires.
    previous_secret: str = ""
    previous_secret_expires_at: float | None = None

    def signing_secrets(self, now: float) -> tuple[str, ...]:
        """The secrets a delivery is signed with now, newest first."""
        expires = self.previous_secret_expires_at
        if self.previous_secret and expires is not None and expires > now:
            return (self.secret, self.previous_secret)
        return (self.secret,)


@record
class NewEvent:
    type: str
    payload: bytes
    content_type: str
    idempotency_key: str


@record
class EmitResult:
    event_id: str
    delivery_count: int
    duplicate: bool


@record
class Event:
    id: str
    type: str
    payload: bytes
    content_type: str
    created_at: float


@record
class AttemptLog:
    number: int
    started_at: float
    duration: float
    outcome: str
    status_code: int
    error: str


@record
class Delivery:
    id: str
    event_id: str
    subscriber_id: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    last_error: str
    log: tuple[AttemptLog, ...] = field(default=())


@record
class DeliveryFilter:
    event_id: str = ""
    subscriber_id: str = ""
    state: DeliveryState | None = None


@record
class Claim:
    """A delivery this process holds a lease on, with everything needed to send it."""

    delivery_id: str
    attempt: int
    attempts_in_round: int
    round_started_at: float
    # The outcome of the attempt before this one ("" for the first).
    last_outcome: str
    event: Event
    subscriber: Subscriber


@record
class DeadLetter:
    """A delivery whose retries ran out, as a person is told about it."""

    delivery_id: str
    event_id: str
    event_type: str
    attempts: int
    last_error: str
    failed_at: float
