"""Input the database would refuse is refused first, as INVALID_ARGUMENT naming the field.

On PostgreSQL a NUL character or a value longer than its column fails the query, which the
caller saw as UNKNOWN (and a failed group commit took other callers' emits with it). Each test
runs on an SQLite file and on PostgreSQL (the parametrised ``database_url`` fixture).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2, field_mask_pb2

from common import signing
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from tests.support import OpenPublisher, catch_up_metadata

if TYPE_CHECKING:
    Stub = publisher_pb2_grpc.PublisherServiceAsyncStub
# A call to make, the field it should be refused for ("" when it should succeed).
Case = tuple[Callable[[], Awaitable[Any]], str]

GRPC_ENDPOINT = "127.0.0.1:1"
# Valid base64 of 200 bytes: a well-formed secret, too long for its column (200 characters).
LONG_SECRET = "whsec_" + base64.b64encode(b"k" * 200).decode()


async def _outcome(call: Callable[[], Awaitable[Any]]) -> str:
    """The call's outcome: OK, or the status code and the field its refusal names."""
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name} {(error.details() or '').partition(':')[0]}"
    return "OK"


async def _check(cases: dict[str, Case]) -> None:
    """Makes each call in turn and expects its refusal (or success) as the case says."""
    got = {label: await _outcome(call) for label, (call, _) in cases.items()}
    expected = {
        label: f"INVALID_ARGUMENT {field}" if field else "OK" for label, (_, field) in cases.items()
    }
    assert got == expected


def _call(method: Callable[[Any], Awaitable[Any]], request: Any) -> Callable[[], Awaitable[Any]]:
    """The call of ``method`` with ``request``, made only when it is awaited."""
    return lambda: method(request)


async def _register(stub: Stub) -> publisher_pb2.RegisterSubscriberResponse:
    request = publisher_pb2.RegisterSubscriberRequest(name="bad-input", endpoint=GRPC_ENDPOINT)
    response: publisher_pb2.RegisterSubscriberResponse = await stub.RegisterSubscriber(request)
    return response


async def test_subscriber_fields_the_database_would_refuse_are_invalid_arguments(
    open_publisher: OpenPublisher,
) -> None:
    """Control characters in a name, endpoint or status URL, and an email address or secret
    longer than its column, are refused naming the field; urlsplit would quietly drop a tab."""
    stub = (await open_publisher()).stub
    subscriber_id = (await _register(stub)).subscriber.id

    def register(**fields: Any) -> Callable[[], Awaitable[Any]]:
        values: dict[str, Any] = {"name": "n", "endpoint": GRPC_ENDPOINT, **fields}
        return lambda: stub.RegisterSubscriber(publisher_pb2.RegisterSubscriberRequest(**values))

    def rotate(secret: str) -> Callable[[], Awaitable[Any]]:
        request = publisher_pb2.RotateSecretRequest(subscriber_id=subscriber_id, secret=secret)
        return lambda: stub.RotateSecret(request)

    await _check(
        {
            "NUL in name": (register(name="a\x00b"), "name"),
            "tab in name": (register(name="a\tb"), "name"),
            "NUL in gRPC endpoint": (register(endpoint="[::1%\x00]:50051"), "endpoint"),
            "tab in URL": (register(endpoint="http://127.0.0.1:9/h\tok"), "endpoint"),
            "LF in URL": (register(endpoint="http://127.0.0.1:9/\nin"), "endpoint"),
            "CR in status URL": (
                register(status_url="http://127.0.0.1:9/{event_id}\r"),
                "status_url",
            ),
            "321-character email": (
                register(contact_email="a" * 309 + "@example.com"),
                "contact_email",
            ),
            "320-character email": (register(contact_email="a" * 308 + "@example.com"), ""),
            "quote in email": (register(contact_email='a"b@example.com'), "contact_email"),
            "comma in email": (register(contact_email="victim,x@example.com"), "contact_email"),
            "long secret": (register(secret=LONG_SECRET), "secret"),
            "rotate to a long secret": (rotate(LONG_SECRET), "secret"),
        }
    )


async def test_ids_and_page_tokens_with_control_characters_are_invalid_arguments(
    open_publisher: OpenPublisher,
) -> None:
    """Every id and page token a request carries, optional filters included, is checked."""
    stub = (await open_publisher()).stub
    bad = "sub_\x00"
    pb = publisher_pb2
    await _check(
        {
            "GetSubscriber": (
                _call(stub.GetSubscriber, pb.GetSubscriberRequest(subscriber_id=bad)),
                "subscriber_id",
            ),
            "ListSubscribers": (
                _call(stub.ListSubscribers, pb.ListSubscribersRequest(page_token=bad)),
                "page_token",
            ),
            "DeleteSubscriber": (
                _call(stub.DeleteSubscriber, pb.DeleteSubscriberRequest(subscriber_id=bad)),
                "subscriber_id",
            ),
            "RotateSecret": (
                _call(stub.RotateSecret, pb.RotateSecretRequest(subscriber_id=bad)),
                "subscriber_id",
            ),
            "GetEvent": (_call(stub.GetEvent, pb.GetEventRequest(event_id=bad)), "event_id"),
            "ListEvents": (
                _call(stub.ListEvents, pb.ListEventsRequest(subscriber_id=bad)),
                "subscriber_id",
            ),
            "GetDelivery": (
                _call(stub.GetDelivery, pb.GetDeliveryRequest(delivery_id=bad)),
                "delivery_id",
            ),
            "Redeliver": (
                _call(stub.Redeliver, pb.RedeliverRequest(delivery_id=bad)),
                "delivery_id",
            ),
            "ListDeliveries by event": (
                _call(stub.ListDeliveries, pb.ListDeliveriesRequest(event_id=bad)),
                "event_id",
            ),
            "ListDeliveries by subscriber": (
                _call(stub.ListDeliveries, pb.ListDeliveriesRequest(subscriber_id=bad)),
                "subscriber_id",
            ),
            "ListDeliveries page": (
                _call(stub.ListDeliveries, pb.ListDeliveriesRequest(page_token=bad)),
                "page_token",
            ),
            "ReplayDeliveries": (
                _call(stub.ReplayDeliveries, pb.ReplayDeliveriesRequest(subscriber_id=bad)),
                "subscriber_id",
            ),
        }
    )


async def test_event_fields_the_database_or_a_delivery_would_refuse_are_invalid_arguments(
    open_publisher: OpenPublisher,
) -> None:
    """A content type too long, or with a NUL or a line break (no HTTP delivery could carry it
    as a header), a NUL in an idempotency key, and JSON nested too deeply to check are refused;
    JSON with an integer of thousands of digits is valid and accepted."""
    stub = (await open_publisher()).stub

    def emit(**fields: Any) -> Callable[[], Awaitable[Any]]:
        values: dict[str, Any] = {"type": "order.paid", "payload": b"{}", **fields}
        return lambda: stub.Emit(publisher_pb2.EmitRequest(**values))

    text = {"payload": b"x"}
    batch = publisher_pb2.EmitBatchRequest(
        events=[
            publisher_pb2.EmitRequest(type="order.paid", payload=b"{}"),
            publisher_pb2.EmitRequest(type="order.paid", payload=b"x", content_type="text/\x00"),
        ]
    )
    await _check(
        {
            "201-character content type": (
                emit(content_type="text/" + "a" * 196, **text),
                "content_type",
            ),
            "200-character content type": (emit(content_type="text/" + "a" * 195, **text), ""),
            "NUL in content type": (
                emit(content_type="text/plain; a=\x00", **text),
                "content_type",
            ),
            "CR in content type": (emit(content_type="text/plain; a=\rb", **text), "content_type"),
            "LF in content type": (emit(content_type="text/plain\n; a=b", **text), "content_type"),
            "NUL in idempotency key": (emit(idempotency_key="a\x00b"), "idempotency_key"),
            "deeply nested JSON": (emit(payload=b"[" * 100_000), "payload"),
            "JSON with a huge integer": (emit(payload=b"[" + b"7" * 5000 + b"]"), ""),
            "bad event in a batch": (lambda: stub.EmitBatch(batch), "events[1].content_type"),
        }
    )


async def test_a_cursor_beyond_what_the_database_can_hold_is_an_invalid_argument(
    open_publisher: OpenPublisher,
) -> None:
    """Cursors are 64-bit: the largest is accepted, anything above it refused naming `cursor`."""
    running = await open_publisher()
    stub = running.stub
    registered = await _register(stub)
    subscriber_id = registered.subscriber.id
    auth = catch_up_metadata(registered.secret, subscriber_id, audience=running.app.settings.issuer)

    def page(cursor: str) -> Callable[[], Awaitable[Any]]:
        request = publisher_pb2.ListEventsRequest(subscriber_id=subscriber_id, cursor=cursor)
        return lambda: stub.ListEvents(request, metadata=auth)

    await _check(
        {
            "largest": (page(str(2**63 - 1)), ""),
            "2**63": (page(str(2**63)), "cursor"),
            "25 digits": (page("9" * 25), "cursor"),
            "5000 digits": (page("9" * 5000), "cursor"),
        }
    )


async def test_a_refused_emit_among_concurrent_ones_fails_alone(
    open_publisher: OpenPublisher,
) -> None:
    """Twenty good emits racing one whose content type is too long all succeed; only it fails."""
    stub = (await open_publisher()).stub
    good = publisher_pb2.EmitRequest(type="order.paid", payload=b"{}")
    bad = publisher_pb2.EmitRequest(type="order.paid", payload=b"x", content_type="t/" + "a" * 300)
    requests = [good] * 10 + [bad] + [good] * 10
    outcomes = await asyncio.gather(*(_outcome(_call(stub.Emit, r)) for r in requests))
    assert outcomes == ["OK"] * 10 + ["INVALID_ARGUMENT content_type"] + ["OK"] * 10


DAY = 24 * 3600


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def test_every_rpc_refuses_missing_ids_and_out_of_range_values_naming_the_field(
    open_publisher: OpenPublisher,
) -> None:
    """What each RPC requires, and each number and enum it bounds, is checked at the servicer:
    an empty id, a negative page size, an enum value the proto does not define, a batch of
    none or too many, and durations past their maximum."""
    stub = (await open_publisher()).stub
    subscriber_id = (await _register(stub)).subscriber.id
    pb = publisher_pb2

    def register(**fields: Any) -> Callable[[], Awaitable[Any]]:
        values: dict[str, Any] = {"name": "n", "endpoint": GRPC_ENDPOINT, **fields}
        return lambda: stub.RegisterSubscriber(pb.RegisterSubscriberRequest(**values))

    def update(paths: list[str], **fields: Any) -> Callable[[], Awaitable[Any]]:
        request = pb.UpdateSubscriberRequest(
            subscriber=pb.Subscriber(**fields), update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return lambda: stub.UpdateSubscriber(request)

    event = pb.EmitRequest(type="order.paid", payload=b"{}")
    await _check(
        {
            "GetSubscriber without an id": (
                _call(stub.GetSubscriber, pb.GetSubscriberRequest()),
                "subscriber_id",
            ),
            "DeleteSubscriber without an id": (
                _call(stub.DeleteSubscriber, pb.DeleteSubscriberRequest()),
                "subscriber_id",
            ),
            "GetEvent without an id": (_call(stub.GetEvent, pb.GetEventRequest()), "event_id"),
            "Redeliver without an id": (
                _call(stub.Redeliver, pb.RedeliverRequest()),
                "delivery_id",
            ),
            "ListEvents without a subscriber": (
                _call(stub.ListEvents, pb.ListEventsRequest()),
                "subscriber_id",
            ),
            "UpdateSubscriber without an id": (update(["name"], name="x"), "subscriber.id"),
            "UpdateSubscriber without a mask": (update([], id=subscriber_id), "update_mask"),
            "UpdateSubscriber to no state": (
                update(["state"], id=subscriber_id),
                "subscriber.state",
            ),
            "ListSubscribers page size -1": (
                _call(stub.ListSubscribers, pb.ListSubscribersRequest(page_size=-1)),
                "page_size",
            ),
            "ListDeliveries page size -1": (
                _call(stub.ListDeliveries, pb.ListDeliveriesRequest(page_size=-1)),
                "page_size",
            ),
            "ListEvents page size -1": (
                _call(
                    stub.ListEvents,
                    pb.ListEventsRequest(subscriber_id=subscriber_id, page_size=-1),
                ),
                "page_size",
            ),
            "ListDeliveries in state 9": (
                _call(stub.ListDeliveries, pb.ListDeliveriesRequest(state=9)),  # type: ignore[arg-type]
                "state",
            ),
            "EmitBatch of none": (_call(stub.EmitBatch, pb.EmitBatchRequest()), "events"),
            "EmitBatch of 1001": (
                _call(stub.EmitBatch, pb.EmitBatchRequest(events=[event] * 1001)),
                "events",
            ),
            "previous secret valid for 31 days": (
                _call(
                    stub.RotateSecret,
                    pb.RotateSecretRequest(
                        subscriber_id=subscriber_id, previous_valid_for=_seconds(31 * DAY)
                    ),
                ),
                "previous_valid_for",
            ),
            "replay of a bad pattern": (
                _call(stub.ReplayDeliveries, pb.ReplayDeliveriesRequest(event_types=["a*b"])),
                "event_types[0]",
            ),
            "201-character name": (register(name="n" * 201), "name"),
            "2049-character endpoint": (
                register(endpoint="http://127.0.0.1/" + "a" * 2032),
                "endpoint",
            ),
            "protocol 7": (register(protocol=7), "protocol"),
            "body format 7": (register(body_format=7), "body_format"),
            "status URL without {event_id}": (
                register(status_url="http://127.0.0.1:9/status"),
                "status_url",
            ),
            "retry after more than a day": (
                register(retry_schedule=[_seconds(DAY + 1)]),
                "retry_schedule",
            ),
        }
    )


async def test_a_refused_update_rotation_or_batch_leaves_everything_as_it_was(
    open_publisher: OpenPublisher,
) -> None:
    """An update naming a good field and a bad one writes neither; a rotation refused for its
    grace period leaves the old secret the only one; a batch refused for its size writes none
    of its events. Without an allowlist, an update to a loopback endpoint is refused too."""
    running = await open_publisher(allow_cidrs=())
    stub = running.stub
    registered = await _register(stub)
    subscriber_id = registered.subscriber.id
    pb = publisher_pb2

    async def refused(call: Awaitable[Any]) -> str:
        return await _outcome(lambda: call)

    def update(paths: list[str], **fields: Any) -> Awaitable[Any]:
        return stub.UpdateSubscriber(
            pb.UpdateSubscriberRequest(
                subscriber=pb.Subscriber(id=subscriber_id, **fields),
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            )
        )

    assert await refused(update(["name", "endpoint"], name="after", endpoint="no-port")) == (
        "INVALID_ARGUMENT endpoint"
    )
    assert await refused(
        update(["name", "endpoint"], name="after", endpoint="http://127.0.0.1:9/in")
    ) == ("INVALID_ARGUMENT endpoint")
    assert await refused(update(["name", "state"], name="after")) == (
        "INVALID_ARGUMENT subscriber.state"
    )
    now = (
        await stub.GetSubscriber(pb.GetSubscriberRequest(subscriber_id=subscriber_id))
    ).subscriber
    assert now == registered.subscriber

    new_secret = signing.generate_secret()
    rotation = pb.RotateSecretRequest(
        subscriber_id=subscriber_id, secret=new_secret, previous_valid_for=_seconds(31 * DAY)
    )
    assert await refused(stub.RotateSecret(rotation)) == "INVALID_ARGUMENT previous_valid_for"

    async def feed_with(secret: str) -> str:
        auth = catch_up_metadata(secret, subscriber_id, audience=running.app.settings.issuer)
        request = pb.ListEventsRequest(subscriber_id=subscriber_id)
        return await refused(stub.ListEvents(request, metadata=auth))

    assert await feed_with(registered.secret) == "OK"
    assert (await feed_with(new_secret)).startswith("UNAUTHENTICATED")

    keyed = [
        pb.EmitRequest(type="order.paid", payload=b"{}", idempotency_key=f"k{n}")
        for n in range(1001)
    ]
    assert await refused(stub.EmitBatch(pb.EmitBatchRequest(events=keyed))) == (
        "INVALID_ARGUMENT events"
    )
    first = await stub.Emit(keyed[0])
    assert not first.duplicate
    listing = await stub.ListDeliveries(pb.ListDeliveriesRequest(page_size=1000))
    assert [d.event_id for d in listing.deliveries] == [first.event_id]


async def test_reads_of_oversized_values_answer_their_code_naming_the_field(
    open_publisher: OpenPublisher,
) -> None:
    """An id of 100,000 four-byte characters is NOT_FOUND, a cursor or event type that long
    INVALID_ARGUMENT, naming the field: their messages quote them, and a client refuses a
    message over gRPC's header limits, which its caller saw as RESOURCE_EXHAUSTED."""
    running = await open_publisher()
    stub = running.stub
    registered = await _register(stub)
    subscriber_id = registered.subscriber.id
    long = "\U0001f600" * 100_000
    pb = publisher_pb2
    authorized = catch_up_metadata(
        registered.secret, subscriber_id, audience=running.app.settings.issuer
    )
    cases = {
        "GetEvent": _call(stub.GetEvent, pb.GetEventRequest(event_id=long)),
        "GetDelivery": _call(stub.GetDelivery, pb.GetDeliveryRequest(delivery_id=long)),
        "Redeliver": _call(stub.Redeliver, pb.RedeliverRequest(delivery_id=long)),
        "GetSubscriber": _call(stub.GetSubscriber, pb.GetSubscriberRequest(subscriber_id=long)),
        "Replay of a subscriber": _call(
            stub.ReplayDeliveries, pb.ReplayDeliveriesRequest(subscriber_id=long)
        ),
        "cursor": lambda: stub.ListEvents(
            pb.ListEventsRequest(subscriber_id=subscriber_id, cursor="1" + long),
            metadata=authorized,
        ),
        "Replay of a type": _call(
            stub.ReplayDeliveries, pb.ReplayDeliveriesRequest(event_types=[long])
        ),
    }
    got = {label: await _outcome(call) for label, call in cases.items()}
    assert got == {
        "GetEvent": "NOT_FOUND event_id",
        "GetDelivery": "NOT_FOUND delivery_id",
        "Redeliver": "NOT_FOUND delivery_id",
        "GetSubscriber": "NOT_FOUND subscriber_id",
        "Replay of a subscriber": "NOT_FOUND subscriber_id",
        "cursor": "INVALID_ARGUMENT cursor",
        "Replay of a type": "INVALID_ARGUMENT event_types[0]",
    }


async def test_a_replay_since_a_time_no_timestamp_holds_is_an_invalid_argument(
    open_publisher: OpenPublisher,
) -> None:
    """ReplayDeliveries since a Timestamp out of its range (after the year 9999, or with
    negative nanos) is INVALID_ARGUMENT naming since, not UNKNOWN."""
    stub = (await open_publisher()).stub
    subscriber_id = (await _register(stub)).subscriber.id
    beyond_year_9999 = publisher_pb2.ReplayDeliveriesRequest(subscriber_id=subscriber_id)
    beyond_year_9999.since.seconds = 2**62
    negative_nanos = publisher_pb2.ReplayDeliveriesRequest(event_types=["a.*"])
    negative_nanos.since.nanos = -5
    await _check(
        {
            "beyond the year 9999": (_call(stub.ReplayDeliveries, beyond_year_9999), "since"),
            "negative nanos": (_call(stub.ReplayDeliveries, negative_nanos), "since"),
        }
    )
