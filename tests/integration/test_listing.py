"""The listing RPCs' pages: tokens bound to their listing and filters, pages a client can take.

Runs on an SQLite file and on PostgreSQL (the parametrised ``database_url`` fixture).
"""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import grpc.aio
from google.protobuf import field_mask_pb2

from common.gen.webhooks.v1 import publisher_pb2
from tests.support import OpenPublisher

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
