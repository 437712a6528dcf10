"""The publisher end to end in one process: real gRPC servers on port 0, a real database
(SQLite file and PostgreSQL, via the parametrised ``database_url`` fixture)."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from common import db, grpc_server
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher import dispatcher
from publisher.app import PublisherApp
from publisher.schema import subscribers
from publisher.store import Store
from tests.conftest import StartPublisher
from tests.support import (
    FakeSubscriber,
    alive,
    children_of,
    claims_of,
    eventually,
    refusing_port,
)

if TYPE_CHECKING:
    Stub = publisher_pb2_grpc.PublisherServiceAsyncStub
DELIVERED = publisher_pb2.DELIVERY_STATE_DELIVERED
PENDING = publisher_pb2.DELIVERY_STATE_PENDING
FAILED = publisher_pb2.DELIVERY_STATE_FAILED


def schedule(*seconds: float) -> list[duration_pb2.Duration]:
    durations = []
    for value in seconds:
        duration = duration_pb2.Duration()
        duration.FromNanoseconds(int(value * 1e9))
        durations.append(duration)
    return durations


async def register(
    stub: Stub, endpoint: str, **fields: object
) -> publisher_pb2.RegisterSubscriberResponse:
    fields.setdefault("name", "test")
    request = publisher_pb2.RegisterSubscriberRequest(endpoint=endpoint, **fields)  # type: ignore[arg-type]
    response: publisher_pb2.RegisterSubscriberResponse = await stub.RegisterSubscriber(request)
    return response


async def emit(
    stub: Stub, event_type: str = "order.paid", **fields: object
) -> publisher_pb2.EmitResponse:
    request = publisher_pb2.EmitRequest(type=event_type, payload=b'{"amount": 42}', **fields)  # type: ignore[arg-type]
    response: publisher_pb2.EmitResponse = await stub.Emit(request)
    return response


async def only_delivery(stub: Stub, event_id: str) -> publisher_pb2.Delivery:
    listing = await stub.ListDeliveries(publisher_pb2.ListDeliveriesRequest(event_id=event_id))
    (delivery,) = listing.deliveries
    full = await stub.GetDelivery(publisher_pb2.GetDeliveryRequest(delivery_id=delivery.id))
    return full.delivery


async def delivery_in(stub: Stub, event_id: str, state: int) -> publisher_pb2.Delivery:
    async def check() -> publisher_pb2.Delivery | None:
        delivery = await only_delivery(stub, event_id)
        return delivery if delivery.state == state else None

    return await eventually(check, what=f"delivery of {event_id} in state {state}")


async def test_emitted_event_is_delivered_with_a_jwt_anyone_can_verify(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    registered = await register(stub, f"127.0.0.1:{subscriber.port}")
    emitted = await emit(stub)
    assert emitted.delivery_count == 1

    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert delivery.attempt_count == 1
    assert [a.outcome for a in delivery.attempts] == [publisher_pb2.ATTEMPT_OUTCOME_DELIVERED]
    (received,) = subscriber.received
    assert received.request.event.id == emitted.event_id
    assert received.request.event.payload == b'{"amount": 42}'
    assert received.request.delivery_id == delivery.id
    claims = claims_of(received, registered.secret, registered.subscriber.id)
    assert claims["iss"] == "grpc-webhooks"
    assert claims["event_id"] == emitted.event_id
    assert claims["event_type"] == "order.paid"
    assert claims["attempt"] == 1
    assert claims["body_sha256"] == hashlib.sha256(b'{"amount": 42}').hexdigest()
    assert claims["exp"] - claims["iat"] <= 600


async def test_a_send_that_frees_a_slot_with_nothing_due_costs_no_claim(
    stub: Stub,
    subscriber: FakeSubscriber,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One event at a time, as at low load. On SQLite each emit leases its delivery to the
    dispatcher itself; on PostgreSQL the emit and its NOTIFY wake the dispatcher to claim it.
    Either way, a finished send or a recorded outcome with nothing due claims nothing."""
    monkeypatch.setattr(dispatcher, "IDLE_POLL_SECONDS", 60.0)
    claims = 0
    claim_round = Store.claim_round

    async def counted(store: Store, *args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim_round(store, *args, **kwargs)

    monkeypatch.setattr(Store, "claim_round", counted)
    await register(stub, f"127.0.0.1:{subscriber.port}")
    events = 10
    for _ in range(events):
        emitted = await emit(stub)
        await delivery_in(stub, emitted.event_id, DELIVERED)

    # Plus one: a poll of the unpatched interval may have been under way.
    assert claims <= 1 + (0 if database_url.startswith("sqlite") else 2 * events)


async def test_a_subscriber_that_never_answers_does_not_hold_up_another(
    start_publisher: StartPublisher,
) -> None:
    """A subscriber that holds its calls open gets one of the two slots, its limit (half of
    --max-in-flight); the other subscriber's event goes out at once through the other,
    ahead of the slow one's second event, which waits for its turn."""
    slow, fast = FakeSubscriber(hang=60.0), FakeSubscriber()
    app = await start_publisher(max_in_flight=2, claim_batch=2, delivery_timeout=30.0)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            await register(stub, await slow.start(), event_types=["slow.*"])
            await register(stub, await fast.start(), event_types=["fast.*"])
            for _ in range(2):
                await emit(stub, "slow.event")

            async def one_held() -> bool:
                return len(slow.received) == 1

            await eventually(one_held, what="the slow subscriber holding a call")
            emitted = await emit(stub, "fast.event")

            async def arrived() -> bool:
                return fast.event_ids() == [emitted.event_id]

            # Without the limit, the event waits for the slow subscriber's 30 s timeout.
            await eventually(arrived, deadline=10.0, what="the other subscriber's event")
            # The slow subscriber's second event was due all along, and stayed within its limit.
            assert len(slow.received) == 1
    finally:
        # Answers the held calls (CANCELLED), so that the publisher stops without waiting.
        await slow.stop()
        await fast.stop()


async def test_a_subscriber_gets_no_more_at_once_than_its_own_limit(
    start_publisher: StartPublisher,
) -> None:
    """The publisher would send it 4 at once (half of 8); it asked for 2, and holds both.
    Set to 3 by UpdateSubscriber, it gets a third; another subscriber is not held up."""
    slow, fast = FakeSubscriber(hang=60.0), FakeSubscriber()
    app = await start_publisher(max_in_flight=8, claim_batch=8, delivery_timeout=30.0)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            registered = await register(
                stub, await slow.start(), event_types=["slow.*"], max_in_flight=2
            )
            assert registered.subscriber.max_in_flight == 2
            await register(stub, await fast.start(), event_types=["fast.*"])
            for _ in range(5):
                await emit(stub, "slow.event")

            async def holding(count: int) -> bool:
                return len(slow.received) == count

            await eventually(lambda: holding(2), what="the slow subscriber holding two calls")
            emitted = await emit(stub, "fast.event")

            async def arrived() -> bool:
                return fast.event_ids() == [emitted.event_id]

            await eventually(arrived, deadline=10.0, what="the other subscriber's event")
            assert len(slow.received) == 2  # Its three other events were due all along.

            raised = await stub.UpdateSubscriber(
                publisher_pb2.UpdateSubscriberRequest(
                    subscriber=publisher_pb2.Subscriber(
                        id=registered.subscriber.id, max_in_flight=3
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=["max_in_flight"]),
                )
            )
            assert raised.subscriber.max_in_flight == 3
            # The new limit applies from the next claim, the idle poll's (1 s) at the latest.
            await eventually(lambda: holding(3), what="a third call under the new limit")
    finally:
        await slow.stop()
        await fast.stop()


async def test_a_backlog_for_one_subscriber_flows_at_its_limit_without_stalls(
    start_publisher: StartPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots of four for the one subscriber: each claim turns most of the backlog away.
    A claim must follow as soon as the subscriber has room again, not at the next idle
    poll, here an hour away: waiting for it, the backlog would never arrive in time."""
    monkeypatch.setattr(dispatcher, "IDLE_POLL_SECONDS", 3600.0)
    subscriber = FakeSubscriber()
    app = await start_publisher(max_in_flight=4, claim_batch=4)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            await register(stub, await subscriber.start())
            event = publisher_pb2.EmitRequest(type="order.paid", payload=b"{}")
            await stub.EmitBatch(publisher_pb2.EmitBatchRequest(events=[event] * 200))

            async def all_arrived() -> bool:
                return len(subscriber.received) >= 200

            await eventually(all_arrived, what="200 events at two at a time")
            assert len(set(subscriber.event_ids())) == 200
    finally:
        await subscriber.stop()


async def test_emit_is_committed_before_it_answers(stub: Stub) -> None:
    emitted = await emit(stub, idempotency_key="k1")
    event = (await stub.GetEvent(publisher_pb2.GetEventRequest(event_id=emitted.event_id))).event
    assert event.type == "order.paid"
    assert event.content_type == "application/json"


async def test_same_idempotency_key_returns_the_first_event_and_creates_nothing(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    await register(stub, f"127.0.0.1:{subscriber.port}")
    first = await emit(stub, idempotency_key="order-7")
    again = await emit(stub, idempotency_key="order-7")
    assert again.event_id == first.event_id
    assert again.duplicate
    assert not first.duplicate
    assert again.delivery_count == first.delivery_count == 1
    listing = await stub.ListDeliveries(
        publisher_pb2.ListDeliveriesRequest(event_id=first.event_id)
    )
    assert len(listing.deliveries) == 1


async def test_event_types_filter_with_exact_names_and_wildcards(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    endpoint = f"127.0.0.1:{subscriber.port}"
    orders = await register(stub, endpoint, event_types=["order.*"])
    users = await register(stub, endpoint, event_types=["user.created"])
    everything = await register(stub, endpoint)

    async def audience(event_type: str) -> set[str]:
        emitted = await emit(stub, event_type)
        listing = await stub.ListDeliveries(
            publisher_pb2.ListDeliveriesRequest(event_id=emitted.event_id)
        )
        return {d.subscriber_id for d in listing.deliveries}

    ids = orders.subscriber.id, users.subscriber.id, everything.subscriber.id
    assert await audience("order.paid") == {ids[0], ids[2]}
    assert await audience("order.item.added") == {ids[0], ids[2]}
    assert await audience("user.created") == {ids[1], ids[2]}
    assert await audience("user.deleted") == {ids[2]}


async def test_paused_subscriber_waits_and_gets_its_events_on_resume(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    witness = FakeSubscriber()
    await witness.start()
    try:
        paused = await register(stub, f"127.0.0.1:{subscriber.port}")
        await register(stub, f"127.0.0.1:{witness.port}")
        await set_state(stub, paused.subscriber.id, publisher_pb2.SUBSCRIBER_STATE_PAUSED)
        emitted = await emit(stub)
        # The witness got the same event from the same claim round: the paused one was skipped.
        await eventually(lambda: _async(witness.event_ids()), what="witness receives")
        listing = await stub.ListDeliveries(
            publisher_pb2.ListDeliveriesRequest(subscriber_id=paused.subscriber.id)
        )
        assert [d.state for d in listing.deliveries] == [PENDING]
        assert subscriber.received == []

        await set_state(stub, paused.subscriber.id, publisher_pb2.SUBSCRIBER_STATE_ACTIVE)
        await eventually(lambda: _async(subscriber.event_ids() == [emitted.event_id]))
    finally:
        await witness.stop()


async def set_state(stub: Stub, subscriber_id: str, state: int) -> publisher_pb2.Subscriber:
    response = await stub.UpdateSubscriber(
        publisher_pb2.UpdateSubscriberRequest(
            subscriber=publisher_pb2.Subscriber(id=subscriber_id, state=state),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=["state"]),
        )
    )
    return response.subscriber


async def _async(value: object) -> object:
    return value


async def test_failed_attempts_are_retried_until_the_subscriber_comes_up(stub: Stub) -> None:
    """Retries every second after the first two: however late the subscriber comes up within
    the test's deadline, and however long the publisher's channel then takes to reconnect
    (its backoff reaches 2 s), a retry finds it up. With retries at 0.4 and 0.6 s and then a
    minute, coming up 0.4 s late was enough to fail."""
    with refusing_port() as port:
        await register(stub, f"127.0.0.1:{port}", retry_schedule=schedule(0.2, 0.4, *range(1, 40)))
        emitted = await emit(stub)

        async def failed_twice() -> bool:
            delivery = await only_delivery(stub, emitted.event_id)
            return len(delivery.attempts) >= 2

        await eventually(failed_twice, what="two failed attempts")
    up = FakeSubscriber()
    await up.start(port)
    try:
        delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
        outcomes = [a.outcome for a in delivery.attempts]
        assert outcomes[-1] == publisher_pb2.ATTEMPT_OUTCOME_DELIVERED
        assert set(outcomes[:-1]) == {publisher_pb2.ATTEMPT_OUTCOME_FAILED}
        assert "UNAVAILABLE" in delivery.attempts[0].error
        assert up.event_ids() == [emitted.event_id]
    finally:
        await up.stop()


async def test_delivery_fails_after_the_last_retry_when_the_subscriber_never_comes_up(
    stub: Stub, nowhere: str
) -> None:
    await register(stub, nowhere, retry_schedule=schedule(0.1, 0.2, 0.3))
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, FAILED)
    assert delivery.attempt_count == 4
    assert [a.number for a in delivery.attempts] == [1, 2, 3, 4]
    assert {a.outcome for a in delivery.attempts} == {publisher_pb2.ATTEMPT_OUTCOME_FAILED}
    assert "UNAVAILABLE" in delivery.last_error
    assert not delivery.HasField("next_attempt_at")


async def break_secret(database_url: str, subscriber_id: str) -> None:
    """Writes a secret that cannot sign, around the API (which refuses it)."""
    engine = db.create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                subscribers.update()
                .where(subscribers.c.id == subscriber_id)
                .values(secret="not-a-secret")
            )
    finally:
        await engine.dispose()


async def test_an_attempt_that_cannot_be_prepared_fails_on_the_schedule_not_in_a_loop(
    stub: Stub, subscriber: FakeSubscriber, database_url: str
) -> None:
    """A secret the dispatcher cannot use (written around the API, which refuses it) fails
    each attempt and dead-letters the delivery in the end; the send must not die with the
    delivery left leased, to be claimed and die again whenever its lease runs out."""
    registered = await register(
        stub, f"127.0.0.1:{subscriber.port}", retry_schedule=schedule(0.1, 0.2)
    )
    await break_secret(database_url, registered.subscriber.id)
    emitted = await emit(stub)

    delivery = await delivery_in(stub, emitted.event_id, FAILED)
    assert delivery.attempt_count == 3
    assert {a.outcome for a in delivery.attempts} == {publisher_pb2.ATTEMPT_OUTCOME_FAILED}
    assert "internal error" in delivery.last_error
    assert "whsec_" in delivery.last_error
    assert subscriber.received == []


async def test_a_subscriber_that_rejects_the_signature_is_retried_and_the_log_says_why(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    subscriber.fail_with = grpc.StatusCode.UNAUTHENTICATED
    await register(stub, f"127.0.0.1:{subscriber.port}", retry_schedule=schedule(0.1, 0.2))
    emitted = await emit(stub)
    delivery = await delivery_in(stub, emitted.event_id, FAILED)
    assert len(subscriber.received) == 3
    assert all("check its secret" in a.error for a in delivery.attempts)
    assert {a.status_code for a in delivery.attempts} == {grpc.StatusCode.UNAUTHENTICATED.value[0]}


async def test_redeliver_sends_the_same_event_again_with_a_new_attempt_number(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    await register(stub, f"127.0.0.1:{subscriber.port}")
    emitted = await emit(stub)
    delivery = await delivery_in(stub, emitted.event_id, DELIVERED)
    await stub.Redeliver(publisher_pb2.RedeliverRequest(delivery_id=delivery.id))

    await eventually(lambda: _async(len(subscriber.received) == 2), what="second receipt")
    assert subscriber.event_ids() == [emitted.event_id, emitted.event_id]
    assert [r.request.attempt for r in subscriber.received] == [1, 2]
    again = await delivery_in(stub, emitted.event_id, DELIVERED)
    assert again.attempt_count == 2


async def test_emit_batch_commits_every_event_and_answers_in_order(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    await register(stub, f"127.0.0.1:{subscriber.port}")
    requests = [
        publisher_pb2.EmitRequest(type=f"order.n{i}", payload=b"{}", idempotency_key=f"b{i}")
        for i in range(5)
    ]
    response = await stub.EmitBatch(publisher_pb2.EmitBatchRequest(events=requests))
    assert [r.delivery_count for r in response.results] == [1] * 5
    for index, result in enumerate(response.results):
        event = await stub.GetEvent(publisher_pb2.GetEventRequest(event_id=result.event_id))
        assert event.event.type == f"order.n{index}"
    await eventually(lambda: _async(len(subscriber.received) == 5), what="five receipts")


async def test_a_bad_event_in_a_batch_writes_none_of_it(stub: Stub) -> None:
    requests = [
        publisher_pb2.EmitRequest(type="ok.one", payload=b"{}", idempotency_key="x1"),
        publisher_pb2.EmitRequest(type="", payload=b"{}", idempotency_key="x2"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EmitBatch(publisher_pb2.EmitBatchRequest(events=requests))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[1].type" in (caught.value.details() or "")
    first = await emit(stub, "ok.one", idempotency_key="x1")
    assert not first.duplicate


async def test_subscribers_can_be_read_listed_updated_and_deleted(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    endpoint = f"127.0.0.1:{subscriber.port}"
    created = [(await register(stub, endpoint, name=f"s{i}")).subscriber for i in range(3)]
    page = await stub.ListSubscribers(publisher_pb2.ListSubscribersRequest(page_size=2))
    rest = await stub.ListSubscribers(
        publisher_pb2.ListSubscribersRequest(page_size=2, page_token=page.next_page_token)
    )
    listed = [s.id for s in page.subscribers] + [s.id for s in rest.subscribers]
    assert listed == [s.id for s in created]
    assert rest.next_page_token == ""

    updated = await stub.UpdateSubscriber(
        publisher_pb2.UpdateSubscriberRequest(
            subscriber=publisher_pb2.Subscriber(
                id=created[0].id, name="renamed", event_types=["a.*"]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "event_types"]),
        )
    )
    assert updated.subscriber.name == "renamed"
    assert list(updated.subscriber.event_types) == ["a.*"]
    assert updated.subscriber.endpoint == endpoint

    emitted = await emit(stub, "b.thing")
    assert emitted.delivery_count == 2
    await stub.DeleteSubscriber(publisher_pb2.DeleteSubscriberRequest(subscriber_id=created[1].id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSubscriber(publisher_pb2.GetSubscriberRequest(subscriber_id=created[1].id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listing = await stub.ListDeliveries(
        publisher_pb2.ListDeliveriesRequest(event_id=emitted.event_id)
    )
    assert [d.subscriber_id for d in listing.deliveries] == [created[2].id]


async def test_a_generated_secret_is_returned_and_a_given_one_is_kept(
    stub: Stub, subscriber: FakeSubscriber
) -> None:
    generated = await register(stub, f"127.0.0.1:{subscriber.port}")
    assert generated.secret.startswith("whsec_")
    own = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
    given = await register(stub, f"127.0.0.1:{subscriber.port}", secret=own)
    assert given.secret == own
    fetched = await stub.GetSubscriber(
        publisher_pb2.GetSubscriberRequest(subscriber_id=given.subscriber.id)
    )
    assert fetched.subscriber.name == "test"
    assert len(fetched.subscriber.retry_schedule) == 5


async def test_second_publisher_on_the_same_sqlite_file_is_refused(
    database_url: str, publisher: PublisherApp
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the embedded-mode lock is for SQLite")
    from publisher.app import AlreadyRunning
    from publisher.settings import Settings

    second = PublisherApp(Settings(port=0, database_url=database_url))
    with pytest.raises(AlreadyRunning, match="PostgreSQL"):
        await second.start()


BAD_REGISTRATIONS = [
    ({"name": ""}, "name"),
    ({"endpoint": "no-port"}, "endpoint"),
    ({"endpoint": "host:99999"}, "endpoint"),
    ({"endpoint": "http://example.com/x", "protocol": publisher_pb2.PROTOCOL_GRPC}, "endpoint"),
    ({"event_types": ["ok", "bad*type"]}, "event_types[1]"),
    ({"retry_schedule": schedule(0)}, "retry_schedule[0]"),
    ({"retry_schedule": schedule(10, 5)}, "retry_schedule"),
    ({"contact_email": "not an email"}, "contact_email"),
    ({"secret": "whsec_c2hvcnQ="}, "secret"),
    ({"max_in_flight": 10_001}, "max_in_flight"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_REGISTRATIONS)
async def test_a_bad_registration_is_invalid_argument_naming_the_field_and_writes_nothing(
    stub: Stub, fields: dict[str, object], field: str
) -> None:
    request: dict[str, object] = {"name": "bad", "endpoint": "127.0.0.1:9", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegisterSubscriber(publisher_pb2.RegisterSubscriberRequest(**request))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}: ")
    listing = await stub.ListSubscribers(publisher_pb2.ListSubscribersRequest())
    assert list(listing.subscribers) == []


BAD_EMITS = [
    ({"type": ""}, "type"),
    ({"type": "order.*"}, "type"),
    ({"payload": b"x" * (1024 * 1024 + 1)}, "payload"),
    ({"payload": b"{not json"}, "payload"),
    ({"content_type": "not a media type"}, "content_type"),
    ({"idempotency_key": "k" * 201}, "idempotency_key"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_EMITS)
async def test_a_bad_emit_is_invalid_argument_naming_the_field_and_writes_nothing(
    stub: Stub, subscriber: FakeSubscriber, fields: dict[str, object], field: str
) -> None:
    await register(stub, f"127.0.0.1:{subscriber.port}")
    request: dict[str, object] = {"type": "order.paid", "payload": b"{}", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Emit(publisher_pb2.EmitRequest(**request))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}: ")
    listing = await stub.ListDeliveries(publisher_pb2.ListDeliveriesRequest())
    assert list(listing.deliveries) == []


async def test_unknown_ids_are_not_found_and_missing_ids_are_invalid(stub: Stub) -> None:
    not_found: list[Awaitable[object]] = [
        stub.GetSubscriber(publisher_pb2.GetSubscriberRequest(subscriber_id="sub_x")),
        stub.DeleteSubscriber(publisher_pb2.DeleteSubscriberRequest(subscriber_id="sub_x")),
        stub.GetEvent(publisher_pb2.GetEventRequest(event_id="evt_x")),
        stub.GetDelivery(publisher_pb2.GetDeliveryRequest(delivery_id="dlv_x")),
        stub.Redeliver(publisher_pb2.RedeliverRequest(delivery_id="dlv_x")),
    ]
    for call in not_found:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetDelivery(publisher_pb2.GetDeliveryRequest())
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (missing.value.details() or "").startswith("delivery_id: ")
    with pytest.raises(grpc.aio.AioRpcError) as mask:
        await stub.UpdateSubscriber(
            publisher_pb2.UpdateSubscriberRequest(
                subscriber=publisher_pb2.Subscriber(id="sub_x"),
                update_mask=field_mask_pb2.FieldMask(paths=["secret"]),
            )
        )
    assert mask.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in (mask.value.details() or "")


async def test_a_publisher_that_cannot_listen_gives_back_everything_it_took(
    tmp_path: Path,
) -> None:
    """Its port is taken: starting fails with the reason, and leaves neither the SQLite lock
    nor delivery workers behind, so that a publisher on another port can start at once."""
    from publisher.settings import Settings

    database_url = f"sqlite:///{tmp_path / 'publisher.db'}"
    before = set(children_of(os.getpid()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failing = PublisherApp(Settings(port=port, database_url=database_url, delivery_workers=1))
        with pytest.raises(grpc_server.BindError, match=str(port)):
            await failing.start()
    assert [pid for pid in set(children_of(os.getpid())) - before if alive(pid)] == []

    second = PublisherApp(Settings(port=0, database_url=database_url))
    await second.start()
    await second.stop()
