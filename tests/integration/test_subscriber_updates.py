"""UpdateSubscriber changes what its mask names and nothing else, even with other writers
(on SQLite and PostgreSQL).

An update reads the subscriber, may look its new endpoint up, and writes; meanwhile an
automatic disable (a 410, or failing for --disable-after) or another update may commit.
What the update does not name must be theirs afterwards: above all, an update of other
fields must not switch a disabled subscriber back on and release its held deliveries.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from google.protobuf import field_mask_pb2

from common import signing
from common.gen.webhooks.v1 import publisher_pb2
from publisher import model
from publisher.schema import subscribers
from publisher.servicer import PublisherServicer
from publisher.store import Store
from tests.support import eventually, lock_awaited, store_subscriber_spec

DISABLED = model.SubscriberState.DISABLED


def update(subscriber_id: str, paths: list[str], **fields: Any) -> Any:
    return publisher_pb2.UpdateSubscriberRequest(
        subscriber=publisher_pb2.Subscriber(id=subscriber_id, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


async def test_a_disable_that_lands_while_an_update_looks_its_endpoint_up_stays(
    store: Store,
) -> None:
    """The endpoint's lookup is where an update waits longest between its read and its
    write; a disable committed then is kept, and the new endpoint is written too."""
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )

    async def disabled_meanwhile(url: str, field: str) -> None:
        await store.update_subscriber(subscriber.id, subscriber.spec, DISABLED, "answered 410")

    servicer = PublisherServicer(
        store, issuer="test", max_payload_bytes=1024, check_url=disabled_meanwhile
    )
    request = update(
        subscriber.id,
        ["endpoint", "protocol"],
        endpoint="http://127.0.0.1:9/hooks",
        protocol=publisher_pb2.PROTOCOL_HTTP,
    )
    response = await servicer.UpdateSubscriber(request, cast(Any, None))

    after = await store.get_subscriber(subscriber.id)
    assert after.state == DISABLED
    assert after.state_reason == "answered 410"
    assert after.spec.endpoint == "http://127.0.0.1:9/hooks"
    assert response.subscriber.state == publisher_pb2.SUBSCRIBER_STATE_DISABLED


async def test_an_update_waits_for_a_disable_in_progress_and_keeps_it(store: Store) -> None:
    """PostgreSQL: the update reads the subscriber only once a disable holding its row has
    committed, and writes its own field on top of that; SQLite serializes writers anyway."""
    subscriber = await store.create_subscriber(
        store_subscriber_spec("a", "a.*"), signing.generate_secret()
    )
    renamed = store_subscriber_spec("renamed", "a.*")
    if store.engine.dialect.name != "postgresql":
        await store.update_subscriber(subscriber.id, subscriber.spec, DISABLED, "410")
        editing = asyncio.create_task(
            store.edit_subscriber(subscriber.id, lambda now: (renamed, now.state, now.state_reason))
        )
    else:
        async with store.engine.connect() as disable:
            await disable.execute(
                subscribers.update()
                .where(subscribers.c.id == subscriber.id)
                .values(state=DISABLED.value, state_reason="410")
            )  # Not committed yet: the row stays locked.
            editing = asyncio.create_task(
                store.edit_subscriber(
                    subscriber.id, lambda now: (renamed, now.state, now.state_reason)
                )
            )
            await eventually(
                lambda: lock_awaited(store.engine), what="the update waiting on the row"
            )
            await disable.commit()
    await editing

    after = await store.get_subscriber(subscriber.id)
    assert after.state == DISABLED
    assert after.state_reason == "410"
    assert after.spec.name == "renamed"
