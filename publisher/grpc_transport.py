"""Delivery over gRPC: one ``SubscriberService.Receive`` call per attempt, signed with a JWT.

Channels are kept per endpoint and reused, since a fresh channel costs a
connection handshake. Status codes are classified here and nowhere else.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from common.gen.webhooks.v1 import subscriber_pb2, subscriber_pb2_grpc
from publisher import transport as tx

# The call may have reached the subscriber: ask before retrying blindly.
_UNCERTAIN = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# How grpc words an UNAVAILABLE that came before any connection (the name did not
# resolve, or no address took the connection): nothing was sent. Older grpc
# releases say "DNS resolution failed"; wording not listed here errs on asking.
_NEVER_CONNECTED = (
    "failed to connect to all addresses",
    "errors resolving",
    "DNS resolution failed",
    "empty address list",
)
# How long a channel that still looks connected after an UNAVAILABLE gets to show that
# its connection went: grpc may fail the call a moment before the channel leaves READY
# (in 7 of 40 cut connections here, by 0.2-0.3 ms).
_SETTLE_SECONDS = 0.1
# The subscriber refused on purpose. Still retried, since a misconfigured
# partner gets fixed, but the attempt log says what to fix.
_REJECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: "the subscriber rejected the request",
    grpc.StatusCode.UNAUTHENTICATED: "the subscriber rejected the signature (check its secret)",
    grpc.StatusCode.PERMISSION_DENIED: "the subscriber refused this publisher (check allowlist)",
    grpc.StatusCode.NOT_FOUND: "the subscriber does not serve webhooks.v1.SubscriberService",
    grpc.StatusCode.UNIMPLEMENTED: "the subscriber does not implement Receive",
}

# Reconnect quickly once a subscriber comes back; the retry schedule, not the
# channel, decides how long to wait between attempts.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


class GrpcTransport:
    def __init__(self, *, now: tx.Clock) -> None:
        self._now = now
        self._stubs: dict[str, subscriber_pb2_grpc.SubscriberServiceAsyncStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, endpoint: str) -> subscriber_pb2_grpc.SubscriberServiceAsyncStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
            stub = self._stubs[endpoint] = subscriber_pb2_grpc.SubscriberServiceStub(channel)
        return stub

    async def send(self, attempt: tx.Attempt) -> tx.Result:
        authorization = tx.bearer(attempt, attempt.payload, self._now())
        try:
            await self._stub(attempt.endpoint).Receive(
                _receive_request(attempt),
                timeout=attempt.timeout,
                metadata=_metadata(authorization),
            )
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or ""
            lost = code == grpc.StatusCode.UNAVAILABLE and await self._lost_connection(
                attempt.endpoint, details
            )
            return classify(code, details, connection_lost=lost)
        return tx.Result(tx.Outcome.DELIVERED, status_code=grpc.StatusCode.OK.value[0])

    async def _lost_connection(self, endpoint: str, details: str) -> bool:
        """Whether an UNAVAILABLE call went out on a connection that then dropped.

        grpc says UNAVAILABLE both when it could not connect (nothing was sent:
        safe to resend) and when the connection dropped under a sent call
        ("Stream removed", a server's "Cancelling all calls"), after which the
        subscriber may have recorded the event. A connection that stays up means
        that the subscriber, or a proxy in front of it, answered UNAVAILABLE: a
        refusal.
        """
        if details.startswith(_NEVER_CONNECTED):
            return False
        channel = self._channels[endpoint]
        if channel.get_state() != grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(
                channel.wait_for_state_change(grpc.ChannelConnectivity.READY), _SETTLE_SECONDS
            )
        except TimeoutError:
            return False
        return True

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        # A status token, not a delivery one: the question must not be replayable as the event.
        authorization = tx.status_bearer(attempt, self._now())
        try:
            response = await self._stub(attempt.endpoint).GetStatus(
                subscriber_pb2.GetStatusRequest(event_id=attempt.event_id),
                timeout=min(attempt.timeout, tx.STATUS_TIMEOUT_SECONDS),
                metadata=_metadata(authorization),
            )
            name = subscriber_pb2.ReceiptState.Name(response.state)
        except grpc.aio.AioRpcError:
            return tx.Receipt.UNANSWERED
        except ValueError:
            # Proto enums are open: a state this publisher does not know is no answer it can use.
            return tx.Receipt.UNANSWERED
        return tx.receipt_of(name.removeprefix("RECEIPT_STATE_").lower())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        self._stubs.clear()


def _receive_request(attempt: tx.Attempt) -> subscriber_pb2.ReceiveRequest:
    # Filled in place: building the nested messages as arguments and the timestamp with
    # FromNanoseconds cost twice as much (4.3 against 2.1 µs here).
    request = subscriber_pb2.ReceiveRequest(
        delivery_id=attempt.delivery_id, attempt=attempt.attempt
    )
    event = request.event
    event.id = attempt.event_id
    event.type = attempt.event_type
    event.payload = attempt.payload
    event.content_type = attempt.content_type
    nanoseconds = int(attempt.created_at * 1e9)
    event.created_at.seconds, event.created_at.nanos = divmod(nanoseconds, 1_000_000_000)
    return request


def _metadata(authorization: str) -> grpc.aio.Metadata:
    # A Metadata, not a tuple of pairs: grpc.aio converts those on every call, after an
    # isinstance check against typing.Sequence (3.6 against 2.3 µs here).
    return grpc.aio.Metadata(("authorization", authorization))


def classify(code: grpc.StatusCode, details: str, *, connection_lost: bool) -> tx.Result:
    """What a non-OK status means for the delivery.

    ``connection_lost``: the call was sent and its connection dropped before an answer.
    """
    text = f"{code.name}: {details}"
    outcome = tx.Outcome.FAILED
    if code in _REJECTED:
        text = f"{_REJECTED[code]}: {text}"
    elif code in _UNCERTAIN:
        outcome = tx.Outcome.UNCERTAIN
    elif code == grpc.StatusCode.UNAVAILABLE and connection_lost:
        outcome = tx.Outcome.UNCERTAIN
        text = f"sent, but the connection broke: {text}"
    return tx.Result(outcome, status_code=code.value[0], error=tx.excerpt(text))
