"""Delivery over gRPC: one ``SubscriberService.Receive`` call per attempt, signed with a JWT.

Channels are kept per endpoint and reused, since a fresh channel costs a
connection handshake. Status codes are classified here and nowhere else.
"""

from __future__ import annotations

import grpc
import grpc.aio

from common.gen.webhooks.v1 import subscriber_pb2, subscriber_pb2_grpc
from publisher import transport as tx

# The call may have reached the subscriber: ask before retrying blindly.
_UNCERTAIN = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
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
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, endpoint: str) -> subscriber_pb2_grpc.SubscriberServiceAsyncStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
            self._channels.append(channel)
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
            return classify(error.code(), error.details() or "")
        return tx.Result(tx.Outcome.DELIVERED, status_code=grpc.StatusCode.OK.value[0])

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        # Signed like a delivery, over an empty body, so the subscriber knows who asks.
        authorization = tx.bearer(attempt, b"", self._now())
        try:
            response = await self._stub(attempt.endpoint).GetStatus(
                subscriber_pb2.GetStatusRequest(event_id=attempt.event_id),
                timeout=min(attempt.timeout, tx.STATUS_TIMEOUT_SECONDS),
                metadata=_metadata(authorization),
            )
        except grpc.aio.AioRpcError:
            return tx.Receipt.UNANSWERED
        name = subscriber_pb2.ReceiptState.Name(response.state)
        return tx.receipt_of(name.removeprefix("RECEIPT_STATE_").lower())

    async def close(self) -> None:
        for channel in self._channels:
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


def classify(code: grpc.StatusCode, details: str) -> tx.Result:
    """What a non-OK status means for the delivery."""
    text = f"{code.name}: {details}"
    if code in _REJECTED:
        text = f"{_REJECTED[code]}: {text}"
    outcome = tx.Outcome.UNCERTAIN if code in _UNCERTAIN else tx.Outcome.FAILED
    return tx.Result(outcome, status_code=code.value[0], error=tx.excerpt(text))
