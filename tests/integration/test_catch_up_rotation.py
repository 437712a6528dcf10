"""The catch-up feed during a secret rotation: ListEvents accepts a token signed with any secret
the subscriber's deliveries are signed with, so the previous one works until it expires.
Runs on an SQLite file and on PostgreSQL (the parametrised ``database_url`` fixture)."""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf import duration_pb2

from common import signing
from common.gen.webhooks.v1 import publisher_pb2
from tests.support import OpenPublisher, catch_up_metadata


async def test_a_token_signed_with_the_previous_secret_reads_the_feed_until_it_expires(
    open_publisher: OpenPublisher,
) -> None:
    """After RotateSecret both secrets sign valid tokens; after a rotation with no grace the
    previous one is refused, and a secret that was never the subscriber's is refused always."""
    running = await open_publisher()
    stub = running.stub
    registered = await stub.RegisterSubscriber(
        publisher_pb2.RegisterSubscriberRequest(name="rotating", endpoint="127.0.0.1:1")
    )
    subscriber_id = registered.subscriber.id

    async def feed_with(secret: str) -> str:
        auth = catch_up_metadata(secret, subscriber_id, audience=running.app.settings.issuer)
        request = publisher_pb2.ListEventsRequest(subscriber_id=subscriber_id)
        try:
            await stub.ListEvents(request, metadata=auth)
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "OK"

    first = registered.secret
    rotated = await stub.RotateSecret(
        publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id)
    )
    second = rotated.secret
    assert await feed_with(first) == "OK"
    assert await feed_with(second) == "OK"
    assert await feed_with(signing.generate_secret()) == "UNAUTHENTICATED"

    no_grace = duration_pb2.Duration(seconds=0)
    latest = await stub.RotateSecret(
        publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id, previous_valid_for=no_grace)
    )
    assert await feed_with(latest.secret) == "OK"
    assert await feed_with(second) == "UNAUTHENTICATED"
    assert await feed_with(first) == "UNAUTHENTICATED"
