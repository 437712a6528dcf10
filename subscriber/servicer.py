"""The gRPC face of the subscriber: proto in, verifier and inbox, proto out."""

from __future__ import annotations

from typing import Any

import grpc.aio
from google.protobuf import timestamp_pb2

from common import errors
from common.gen.webhooks.v1 import subscriber_pb2, subscriber_pb2_grpc
from subscriber import handlers, inbox, verifier

_STATES = {
    inbox.State.RECEIVED: subscriber_pb2.RECEIPT_STATE_RECEIVED,
    inbox.State.PROCESSED: subscriber_pb2.RECEIPT_STATE_PROCESSED,
    inbox.State.FAILED: subscriber_pb2.RECEIPT_STATE_FAILED,
}

Context = grpc.aio.ServicerContext[Any, Any]


class SubscriberServicer(subscriber_pb2_grpc.SubscriberServiceServicer):
    def __init__(
        self, checks: verifier.Verifier, store: inbox.Inbox, handler: handlers.Handler
    ) -> None:
        self._checks = checks
        self._store = store
        self._handler = handler

    async def Receive(
        self, request: subscriber_pb2.ReceiveRequest, context: Context
    ) -> subscriber_pb2.ReceiveResponse:
        self._checks.check_address(verifier.grpc_peer_address(context.peer()))
        event = request.event
        claims = self._checks.delivery(_authorization(context), event.payload)
        if not event.id:
            raise errors.InvalidArgument("event.id", "is required")
        if not event.type:
            raise errors.InvalidArgument("event.type", "is required")
        if claims.event_id != event.id:
            raise errors.Unauthenticated(
                f"token is for event {claims.event_id!r}, not {event.id!r}"
            )
        if claims.event_type and claims.event_type != event.type:
            raise errors.Unauthenticated(
                f"token is for event type {claims.event_type!r}, not {event.type!r}"
            )
        entry = inbox.entry_of(event, delivery_id=request.delivery_id, attempt=request.attempt)
        is_new = await handlers.record_and_run(self._handler, self._store, entry)
        return subscriber_pb2.ReceiveResponse(duplicate=not is_new)

    async def GetStatus(
        self, request: subscriber_pb2.GetStatusRequest, context: Context
    ) -> subscriber_pb2.GetStatusResponse:
        self._checks.check_address(verifier.grpc_peer_address(context.peer()))
        if not request.event_id:
            raise errors.InvalidArgument("event_id", "is required")
        self._checks.status_query(_authorization(context), request.event_id)
        receipt = await self._store.status(request.event_id)
        if receipt is None:
            return subscriber_pb2.GetStatusResponse(state=subscriber_pb2.RECEIPT_STATE_UNKNOWN)
        received_at = timestamp_pb2.Timestamp()
        received_at.FromNanoseconds(round(receipt.received_at * 1e9))
        return subscriber_pb2.GetStatusResponse(
            state=_STATES[receipt.state], received_at=received_at
        )


def _authorization(context: Context) -> str | None:
    values = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    if len(values) > 1:
        # Two tokens leave open which one was checked; refuse rather than pick.
        raise errors.Unauthenticated("more than one authorization metadata entry")
    if not values or not isinstance(values[0], str):
        return None
    return values[0]
