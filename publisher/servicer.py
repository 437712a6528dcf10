"""PublisherService: a thin adapter from protobuf requests to the store and back.

It validates (publisher.validation), calls the store, and converts the records
it gets back into protobuf. It never sends anything: the store wakes the
dispatcher after each commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2

from common import log, signing
from common.gen.webhooks.v1 import event_pb2, publisher_pb2, publisher_pb2_grpc
from publisher import model, paging, validation
from publisher.store import Store

logger = logging.getLogger("publisher.servicer")

Context = grpc.aio.ServicerContext[Any, Any]
# Checks that an HTTP endpoint may be reached (the SSRF guard); raises InvalidArgument if not.
UrlCheck = Callable[[str, str], Awaitable[None]]


async def _no_check(url: str, field: str) -> None:
    return None


class PublisherServicer(publisher_pb2_grpc.PublisherServiceServicer):
    def __init__(
        self,
        store: Store,
        *,
        issuer: str,
        max_payload_bytes: int,
        check_url: UrlCheck = _no_check,
    ) -> None:
        self._store = store
        self._issuer = issuer
        self._max_payload = max_payload_bytes
        self._check_url = check_url

    async def RegisterSubscriber(
        self, request: publisher_pb2.RegisterSubscriberRequest, context: Context
    ) -> publisher_pb2.RegisterSubscriberResponse:
        spec = validation.subscriber_spec(
            name=request.name,
            endpoint=request.endpoint,
            protocol=request.protocol,
            event_types=request.event_types,
            retry_schedule=request.retry_schedule,
            contact_email=request.contact_email,
            body_format=request.body_format,
            status_url=request.status_url,
            max_in_flight=request.max_in_flight,
        )
        secret = validation.secret(request.secret)
        await self._check_reachable(spec)
        subscriber = await self._store.create_subscriber(spec, secret)
        log.event(
            logger,
            "subscriber_registered",
            subscriber_id=subscriber.id,
            endpoint=spec.endpoint,
            protocol=spec.protocol.value,
        )
        return publisher_pb2.RegisterSubscriberResponse(
            subscriber=_subscriber(subscriber), secret=secret
        )

    async def GetSubscriber(
        self, request: publisher_pb2.GetSubscriberRequest, context: Context
    ) -> publisher_pb2.GetSubscriberResponse:
        subscriber_id = validation.required_id(request.subscriber_id, "subscriber_id")
        subscriber = await self._store.get_subscriber(subscriber_id)
        return publisher_pb2.GetSubscriberResponse(subscriber=_subscriber(subscriber))

    async def ListSubscribers(
        self, request: publisher_pb2.ListSubscribersRequest, context: Context
    ) -> publisher_pb2.ListSubscribersResponse:
        limit = validation.page_size(request.page_size)
        after = paging.after(request.page_token, "subscribers", ())
        found = await self._store.list_subscribers(limit, after)
        return publisher_pb2.ListSubscribersResponse(
            subscribers=[_subscriber(s) for s in found],
            next_page_token=paging.next_token("subscribers", (), found, limit),
        )

    async def UpdateSubscriber(
        self, request: publisher_pb2.UpdateSubscriberRequest, context: Context
    ) -> publisher_pb2.UpdateSubscriberResponse:
        subscriber_id = validation.required_id(request.subscriber.id, "subscriber.id")
        paths = validation.update_paths(request.update_mask.paths)
        given = request.subscriber

        def change(
            current: model.Subscriber,
        ) -> tuple[model.SubscriberSpec, model.SubscriberState, str]:
            """The fields the mask names from the request, the rest as they are now."""
            now = _subscriber(current)

            def field(name: str) -> Any:
                return getattr(given if name in paths else now, name)

            spec = validation.subscriber_spec(
                name=field("name"),
                endpoint=field("endpoint"),
                protocol=field("protocol"),
                event_types=field("event_types"),
                retry_schedule=field("retry_schedule"),
                contact_email=field("contact_email"),
                body_format=field("body_format"),
                status_url=field("status_url"),
                max_in_flight=field("max_in_flight"),
            )
            if "state" not in paths:
                return spec, current.state, current.state_reason
            state = validation.subscriber_state(given.state)
            reason = (
                "" if state == model.SubscriberState.ACTIVE else f"set to {state} by an operator"
            )
            return spec, state, reason

        # The reachability check looks names up, which cannot wait inside the store's
        # transaction: it checks the change as it applies to the subscriber read here. The
        # store then applies the change to the subscriber as it is in its transaction.
        current = await self._store.get_subscriber(subscriber_id)
        spec, _, _ = change(current)
        if spec.endpoint != current.spec.endpoint or spec.status_url != current.spec.status_url:
            await self._check_reachable(spec)
        updated = await self._store.edit_subscriber(subscriber_id, change)
        log.event(
            logger,
            "subscriber_updated",
            subscriber_id=subscriber_id,
            fields=sorted(paths),
            state=updated.state.value,
        )
        return publisher_pb2.UpdateSubscriberResponse(subscriber=_subscriber(updated))

    async def RotateSecret(
        self, request: publisher_pb2.RotateSecretRequest, context: Context
    ) -> publisher_pb2.RotateSecretResponse:
        subscriber_id = validation.required_id(request.subscriber_id, "subscriber_id")
        secret = validation.secret(request.secret)
        valid_for = validation.previous_valid_for(
            request.previous_valid_for, request.HasField("previous_valid_for")
        )
        subscriber = await self._store.rotate_secret(subscriber_id, secret, valid_for)
        log.event(
            logger, "secret_rotated", subscriber_id=subscriber_id, previous_valid_for=valid_for
        )
        response = publisher_pb2.RotateSecretResponse(
            subscriber=_subscriber(subscriber), secret=secret
        )
        if subscriber.previous_secret_expires_at is not None:
            response.previous_expires_at.CopyFrom(_timestamp(subscriber.previous_secret_expires_at))
        return response

    async def DeleteSubscriber(
        self, request: publisher_pb2.DeleteSubscriberRequest, context: Context
    ) -> publisher_pb2.DeleteSubscriberResponse:
        subscriber_id = validation.required_id(request.subscriber_id, "subscriber_id")
        await self._store.delete_subscriber(subscriber_id)
        log.event(logger, "subscriber_deleted", subscriber_id=subscriber_id)
        return publisher_pb2.DeleteSubscriberResponse()

    async def Emit(
        self, request: publisher_pb2.EmitRequest, context: Context
    ) -> publisher_pb2.EmitResponse:
        event = validation.new_event(request, self._max_payload)
        (result,) = await self._store.emit([event])
        return _emit_result(result)

    async def EmitBatch(
        self, request: publisher_pb2.EmitBatchRequest, context: Context
    ) -> publisher_pb2.EmitBatchResponse:
        batch = validation.new_events(request.events, self._max_payload)
        results = await self._store.emit(batch)
        return publisher_pb2.EmitBatchResponse(results=[_emit_result(r) for r in results])

    async def GetEvent(
        self, request: publisher_pb2.GetEventRequest, context: Context
    ) -> publisher_pb2.GetEventResponse:
        event_id = validation.required_id(request.event_id, "event_id")
        return publisher_pb2.GetEventResponse(event=_event(await self._store.get_event(event_id)))

    async def ListDeliveries(
        self, request: publisher_pb2.ListDeliveriesRequest, context: Context
    ) -> publisher_pb2.ListDeliveriesResponse:
        limit = validation.page_size(request.page_size)
        where = model.DeliveryFilter(
            event_id=validation.optional_id(request.event_id, "event_id"),
            subscriber_id=validation.optional_id(request.subscriber_id, "subscriber_id"),
            state=validation.delivery_state(request.state),
        )
        # A token goes on only with the filters it was given with.
        filters = (where.event_id, where.subscriber_id, where.state or "")
        after = paging.after(request.page_token, "deliveries", filters)
        found = await self._store.list_deliveries(where, limit, after)
        return publisher_pb2.ListDeliveriesResponse(
            deliveries=[_delivery(d) for d in found],
            next_page_token=paging.next_token("deliveries", filters, found, limit),
        )

    async def GetDelivery(
        self, request: publisher_pb2.GetDeliveryRequest, context: Context
    ) -> publisher_pb2.GetDeliveryResponse:
        delivery_id = validation.required_id(request.delivery_id, "delivery_id")
        delivery = await self._store.get_delivery(delivery_id)
        return publisher_pb2.GetDeliveryResponse(delivery=_delivery(delivery))

    async def Redeliver(
        self, request: publisher_pb2.RedeliverRequest, context: Context
    ) -> publisher_pb2.RedeliverResponse:
        delivery_id = validation.required_id(request.delivery_id, "delivery_id")
        delivery = await self._store.redeliver(delivery_id)
        log.event(logger, "redelivery_queued", delivery_id=delivery_id)
        return publisher_pb2.RedeliverResponse(delivery=_delivery(delivery))

    async def ReplayDeliveries(
        self, request: publisher_pb2.ReplayDeliveriesRequest, context: Context
    ) -> publisher_pb2.ReplayDeliveriesResponse:
        patterns = validation.replay_filter(request.subscriber_id, request.event_types)
        since = validation.since(request.since)
        count = await self._store.replay(request.subscriber_id, since, patterns)
        log.event(
            logger,
            "replay_queued",
            subscriber_id=request.subscriber_id,
            event_types=list(patterns),
            since=since,
            count=count,
        )
        return publisher_pb2.ReplayDeliveriesResponse(requeued_count=count)

    async def ListEvents(
        self, request: publisher_pb2.ListEventsRequest, context: Context
    ) -> publisher_pb2.ListEventsResponse:
        subscriber_id = validation.required_id(request.subscriber_id, "subscriber_id")
        after = validation.cursor(request.cursor)
        limit = validation.page_size(request.page_size)
        subscriber = await self._store.get_subscriber(subscriber_id)
        metadata = dict(context.invocation_metadata() or ())
        # Any secret the subscriber's deliveries are signed with: after a rotation the previous
        # one stays valid until it expires, for the feed too.
        keys = [signing.secret_key(s) for s in subscriber.signing_secrets(time.time())]
        signing.verify_catch_up(
            signing.bearer_token(str(metadata.get("authorization", ""))),
            keys,
            subscriber_id=subscriber_id,
            audience=self._issuer,
        )
        found, last = await self._store.events_for(subscriber_id, after, limit)
        return publisher_pb2.ListEventsResponse(
            events=[_event(e) for e in found], next_cursor=str(last)
        )

    async def _check_reachable(self, spec: model.SubscriberSpec) -> None:
        if spec.protocol == model.Protocol.HTTP:
            await self._check_url(spec.endpoint, "endpoint")
        if spec.status_url:
            await self._check_url(spec.status_url.replace("{event_id}", "x"), "status_url")


# -- records -> protobuf ---------------------------------------------------------------------

_PROTOCOLS = {
    model.Protocol.GRPC: publisher_pb2.PROTOCOL_GRPC,
    model.Protocol.HTTP: publisher_pb2.PROTOCOL_HTTP,
}
_STATES = {
    model.SubscriberState.ACTIVE: publisher_pb2.SUBSCRIBER_STATE_ACTIVE,
    model.SubscriberState.PAUSED: publisher_pb2.SUBSCRIBER_STATE_PAUSED,
    model.SubscriberState.DISABLED: publisher_pb2.SUBSCRIBER_STATE_DISABLED,
}
_BODY_FORMATS = {
    model.BodyFormat.RAW: publisher_pb2.BODY_FORMAT_RAW,
    model.BodyFormat.FORM: publisher_pb2.BODY_FORMAT_FORM,
}
_DELIVERY_STATES = {
    model.DeliveryState.PENDING: publisher_pb2.DELIVERY_STATE_PENDING,
    model.DeliveryState.HELD: publisher_pb2.DELIVERY_STATE_PENDING,
    model.DeliveryState.DELIVERED: publisher_pb2.DELIVERY_STATE_DELIVERED,
    model.DeliveryState.FAILED: publisher_pb2.DELIVERY_STATE_FAILED,
}
_OUTCOMES = {
    "delivered": publisher_pb2.ATTEMPT_OUTCOME_DELIVERED,
    "failed": publisher_pb2.ATTEMPT_OUTCOME_FAILED,
    "uncertain": publisher_pb2.ATTEMPT_OUTCOME_UNCERTAIN,
    "confirmed": publisher_pb2.ATTEMPT_OUTCOME_CONFIRMED,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """The stored time in whole nanoseconds, rounded down exactly (see validation.since).

    Not int(seconds * 1e9): that product is rounded to 256 ns, up as often as down.
    """
    numerator, denominator = seconds.as_integer_ratio()
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(numerator * 1_000_000_000 // denominator)
    return stamp


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _subscriber(subscriber: model.Subscriber) -> publisher_pb2.Subscriber:
    spec = subscriber.spec
    return publisher_pb2.Subscriber(
        id=subscriber.id,
        name=spec.name,
        endpoint=spec.endpoint,
        protocol=_PROTOCOLS[spec.protocol],
        event_types=spec.event_types,
        retry_schedule=[_duration(s) for s in spec.retry_schedule],
        contact_email=spec.contact_email,
        state=_STATES[subscriber.state],
        state_reason=subscriber.state_reason,
        body_format=_BODY_FORMATS[spec.body_format],
        status_url=spec.status_url,
        max_in_flight=spec.max_in_flight,
        created_at=_timestamp(subscriber.created_at),
        updated_at=_timestamp(subscriber.updated_at),
    )


def _event(event: model.Event) -> event_pb2.Event:
    return event_pb2.Event(
        id=event.id,
        type=event.type,
        payload=event.payload,
        content_type=event.content_type,
        created_at=_timestamp(event.created_at),
    )


def _emit_result(result: model.EmitResult) -> publisher_pb2.EmitResponse:
    return publisher_pb2.EmitResponse(
        event_id=result.event_id, delivery_count=result.delivery_count, duplicate=result.duplicate
    )


def _delivery(delivery: model.Delivery) -> publisher_pb2.Delivery:
    message = publisher_pb2.Delivery(
        id=delivery.id,
        event_id=delivery.event_id,
        subscriber_id=delivery.subscriber_id,
        state=_DELIVERY_STATES[delivery.state],
        attempt_count=delivery.attempts,
        created_at=_timestamp(delivery.created_at),
        updated_at=_timestamp(delivery.updated_at),
        last_error=delivery.last_error,
        attempts=[
            publisher_pb2.Attempt(
                number=log.number,
                started_at=_timestamp(log.started_at),
                duration=_duration(log.duration),
                outcome=_OUTCOMES.get(log.outcome, publisher_pb2.ATTEMPT_OUTCOME_UNSPECIFIED),
                status_code=log.status_code,
                error=log.error,
            )
            for log in delivery.log
        ],
    )
    if delivery.next_attempt_at is not None:
        message.next_attempt_at.CopyFrom(_timestamp(delivery.next_attempt_at))
    return message
