"""What the read RPCs give back can be given back: page tokens bound to their listing and
filters, catch-up pages a client can take, times that select what they were read from.

Runs on an SQLite file and on PostgreSQL (the parametrised ``database_url`` fixture).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from common import db, signing
from common.gen.webhooks.v1 import publisher_pb2
from publisher import migrate, model
from publisher.servicer import PublisherServicer
from publisher.store import Store
from tests.support import OpenPublisher, attempt_record, store_subscriber_spec

pb = publisher_pb2


async def _code_and_details(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_a_page_token_continues_only_the_listing_and_filters_it_came_from(
    open_publisher: OpenPublisher,
) -> None:
    """Following next_page_token with the same request lists every row once; the token given to
    another listing, with other filters, or made up, is INVALID_ARGUMENT naming page_token
    rather than a silently wrong page."""
    stub = (await open_publisher()).stub
    first, second = [
        (
            await stub.RegisterSubscriber(
                pb.RegisterSubscriberRequest(name=name, endpoint="127.0.0.1:1")
            )
        ).subscriber.id
        for name in ("first", "second")
    ]
    for subscriber_id in (first, second):
        await stub.UpdateSubscriber(
            pb.UpdateSubscriberRequest(
                subscriber=pb.Subscriber(id=subscriber_id, state=pb.SUBSCRIBER_STATE_PAUSED),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
    for _ in range(3):
        await stub.Emit(pb.EmitRequest(type="order.paid", payload=b"{}"))

    listed: list[str] = []
    token = ""
    while True:
        page = await stub.ListDeliveries(
            pb.ListDeliveriesRequest(subscriber_id=first, page_size=2, page_token=token)
        )
        listed += [delivery.id for delivery in page.deliveries]
        assert {delivery.subscriber_id for delivery in page.deliveries} <= {first}
        token = page.next_page_token
        if not token:
            break
    assert len(listed) == len(set(listed)) == 3

    deliveries_token = (
        await stub.ListDeliveries(pb.ListDeliveriesRequest(subscriber_id=first, page_size=1))
    ).next_page_token
    subscribers_token = (
        await stub.ListSubscribers(pb.ListSubscribersRequest(page_size=1))
    ).next_page_token
    assert deliveries_token
    assert subscribers_token
    refused: dict[str, Awaitable[object]] = {
        "other filter": stub.ListDeliveries(
            pb.ListDeliveriesRequest(subscriber_id=second, page_token=deliveries_token)
        ),
        "filter dropped": stub.ListDeliveries(
            pb.ListDeliveriesRequest(page_token=deliveries_token)
        ),
        "state added": stub.ListDeliveries(
            pb.ListDeliveriesRequest(
                subscriber_id=first, state=pb.DELIVERY_STATE_PENDING, page_token=deliveries_token
            )
        ),
        "subscribers' token for deliveries": stub.ListDeliveries(
            pb.ListDeliveriesRequest(page_token=subscribers_token)
        ),
        "deliveries' token for subscribers": stub.ListSubscribers(
            pb.ListSubscribersRequest(page_token=deliveries_token)
        ),
        "made up": stub.ListSubscribers(pb.ListSubscribersRequest(page_token="zzz")),
        "an id as a token": stub.ListSubscribers(pb.ListSubscribersRequest(page_token=first)),
    }
    outcomes = {name: await _code_and_details(call) for name, call in refused.items()}
    assert {name: code for name, (code, _) in outcomes.items()} == dict.fromkeys(
        refused, grpc.StatusCode.INVALID_ARGUMENT
    )
    assert all(details.startswith("page_token:") for _, details in outcomes.values()), outcomes


# The reference subscriber's catch-up page size, and the default payload limit.
CATCH_UP_PAGE = 100
MEBIBYTE = 1024 * 1024


async def test_catch_up_pages_fit_a_default_client_whatever_the_payloads(
    open_publisher: OpenPublisher,
) -> None:
    """Events of the largest default payload, asked for a hundred at a time over a channel
    with gRPC's default 4 MiB receive limit: every page arrives, and they hold every event
    once, in order (a page of them all would be refused by the client for its size)."""
    running = await open_publisher()
    stub = running.stub
    registered = await stub.RegisterSubscriber(
        pb.RegisterSubscriberRequest(name="behind", endpoint="127.0.0.1:1")
    )
    subscriber_id = registered.subscriber.id
    await stub.UpdateSubscriber(
        pb.UpdateSubscriberRequest(
            subscriber=pb.Subscriber(id=subscriber_id, state=pb.SUBSCRIBER_STATE_PAUSED),
            update_mask=field_mask_pb2.FieldMask(paths=["state"]),
        )
    )
    emitted = []
    for index in range(6):
        payload = bytes([index]) * MEBIBYTE
        response = await stub.Emit(
            pb.EmitRequest(type="order.paid", payload=payload, content_type="application/x-bin")
        )
        emitted.append(response.event_id)
    token = signing.sign_catch_up(
        signing.secret_key(registered.secret),
        subscriber_id=subscriber_id,
        audience=running.app.settings.issuer,
        now=time.time(),
    )

    seen: list[str] = []
    cursor = ""
    for _ in range(len(emitted) + 1):
        try:
            page = await stub.ListEvents(
                pb.ListEventsRequest(
                    subscriber_id=subscriber_id, cursor=cursor, page_size=CATCH_UP_PAGE
                ),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        except grpc.aio.AioRpcError as error:
            pytest.fail(f"the page after cursor {cursor!r}: {error.code()} {error.details()}")
        assert all(len(event.payload) == MEBIBYTE for event in page.events)
        seen += [event.id for event in page.events]
        if not page.events:
            break
        cursor = page.next_cursor
    assert seen == emitted


# A time.time() whose float, shown in whole nanoseconds and divided back naively, comes out
# one float above itself (as 1 in 30 do).
AWKWARD_TIME = 1_700_000_000.0000017


@pytest.fixture
async def awkward_store(database_url: str) -> AsyncIterator[Store]:
    """The store on a clock stopped at AWKWARD_TIME."""
    await migrate.ensure_current(database_url, create_if_empty=True)
    store = Store(db.create_engine(database_url), now=lambda: AWKWARD_TIME)
    yield store
    await store.close()


async def test_replaying_since_an_events_created_at_includes_that_event(
    awkward_store: Store,
) -> None:
    """ReplayDeliveries since the created_at that GetEvent shows requeues that event's failed
    delivery; since one nanosecond later, it does not."""
    store = awkward_store
    servicer = PublisherServicer(store, issuer="test", max_payload_bytes=1024)
    no_context = cast(Any, None)
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )
    (emitted,) = await store.emit([model.NewEvent("a.paid", b"{}", "application/json", "")])
    (claim,) = await store.claim("replica", 10, lease_seconds=60.0)
    failed = model.DeliveryState.FAILED
    await store.record([attempt_record(claim, outcome="failed", state=failed)])
    shown = await servicer.GetEvent(pb.GetEventRequest(event_id=emitted.event_id), no_context)

    async def replayed_since(nanos: int) -> int:
        since = timestamp_pb2.Timestamp()
        since.FromNanoseconds(nanos)
        request = pb.ReplayDeliveriesRequest(subscriber_id=subscriber.id, since=since)
        return (await servicer.ReplayDeliveries(request, no_context)).requeued_count

    at = shown.event.created_at.ToNanoseconds()
    assert await replayed_since(at + 1) == 0
    assert await replayed_since(at) == 1
