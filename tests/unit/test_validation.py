"""Request validation: protobuf requests become domain values, or InvalidArgument naming a field."""

from __future__ import annotations

import base64
import fractions
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from common import errors, signing
from common.gen.webhooks.v1 import publisher_pb2
from publisher import model, retry, validation

MAX_PAYLOAD = 1024


def _spec(**overrides: Any) -> model.SubscriberSpec:
    """subscriber_spec called as RegisterSubscriber calls it, with valid defaults for the rest."""
    fields: dict[str, Any] = {
        "name": "orders",
        "endpoint": "orders.internal:50051",
        "protocol": publisher_pb2.PROTOCOL_UNSPECIFIED,
        "event_types": [],
        "retry_schedule": [],
        "contact_email": "",
        "body_format": publisher_pb2.BODY_FORMAT_UNSPECIFIED,
        "status_url": "",
    }
    fields.update(overrides)
    return validation.subscriber_spec(**fields)


def _seconds(*values: float) -> list[duration_pb2.Duration]:
    return [duration_pb2.Duration(seconds=int(v), nanos=round((v % 1) * 1e9)) for v in values]


@contextmanager
def _invalid(field: str) -> Iterator[pytest.ExceptionInfo[errors.InvalidArgument]]:
    """Expects InvalidArgument whose field is exactly ``field``."""
    with pytest.raises(errors.InvalidArgument) as info:
        yield info
    assert info.value.field == field, str(info.value)


def _b64(size: int) -> str:
    return base64.b64encode(b"k" * size).decode()


# subscriber_spec


def test_valid_grpc_subscriber_becomes_a_spec() -> None:
    """A complete, valid request turns into a SubscriberSpec carrying its values."""
    spec = _spec(
        name="  orders  ",
        endpoint="orders.internal:50051",
        protocol=publisher_pb2.PROTOCOL_GRPC,
        event_types=["order.*", "user.created"],
        retry_schedule=_seconds(10, 60),
        contact_email="ops@example.com",
        body_format=publisher_pb2.BODY_FORMAT_RAW,
        status_url="https://status.example.com/events/{event_id}",
    )
    assert spec == model.SubscriberSpec(
        name="orders",
        endpoint="orders.internal:50051",
        protocol=model.Protocol.GRPC,
        event_types=("order.*", "user.created"),
        retry_schedule=(10.0, 60.0),
        contact_email="ops@example.com",
        body_format=model.BodyFormat.RAW,
        status_url="https://status.example.com/events/{event_id}",
    )


def test_a_subscribers_own_limit_is_kept_and_bounded() -> None:
    assert _spec().max_in_flight == 0  # The publisher's.
    assert _spec(max_in_flight=5).max_in_flight == 5
    assert _spec(max_in_flight=10_000).max_in_flight == 10_000
    with _invalid("max_in_flight"):
        _spec(max_in_flight=10_001)


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_empty_name_is_rejected(name: str) -> None:
    """A blank name is refused with field `name`."""
    with _invalid("name"):
        _spec(name=name)


def test_overlong_name_is_rejected() -> None:
    """A name over 200 characters is refused with field `name`."""
    _spec(name="n" * validation.MAX_NAME_LENGTH)
    with _invalid("name"):
        _spec(name="n" * (validation.MAX_NAME_LENGTH + 1))


@pytest.mark.parametrize("name", ["a\x00b", "a\tb", "a\r\nb", "a\x7fb", "a\x9bb"])
def test_name_with_control_characters_is_rejected(name: str) -> None:
    """PostgreSQL refuses a NUL in text, and a line break would spill into email subjects."""
    with _invalid("name"):
        _spec(name=name)


@pytest.mark.parametrize(
    "endpoint",
    [
        "nohost",
        "host:",
        "host:99999",
        "host:0",
        ":80",
        "bad host:80",
        "host:http",
        "host:-1",
        "under_score:80",
        "-leading.example.com:80",
        "[not-ipv6]:80",
        "::1:80",
        "",
        "host:" + "0" * 5000 + "80",
        "[fe80::1%" + "x" * validation.MAX_URL_LENGTH + "]:80",
    ],
)
def test_malformed_grpc_endpoint_is_rejected(endpoint: str) -> None:
    """A gRPC endpoint must be host:port with a valid host and a port in 1..65535."""
    with _invalid("endpoint"):
        _spec(endpoint=endpoint, protocol=publisher_pb2.PROTOCOL_GRPC)


@pytest.mark.parametrize(
    "endpoint",
    ["localhost:50051", "orders.internal:1", "10.0.0.5:65535", "[::1]:50051", "example.com.:443"],
)
def test_well_formed_grpc_endpoints_are_accepted(endpoint: str) -> None:
    """Host names, IPv4 and bracketed IPv6 addresses with a port are gRPC endpoints."""
    assert _spec(endpoint=endpoint, protocol=publisher_pb2.PROTOCOL_GRPC).endpoint == endpoint


@pytest.mark.parametrize("endpoint", ["host:\u00b2", "host:\u0663"])
def test_grpc_endpoint_port_must_be_ascii_digits(endpoint: str) -> None:
    """A port in non-ASCII digits (superscript two, Arabic-Indic three) is InvalidArgument."""
    with _invalid("endpoint"):
        _spec(endpoint=endpoint, protocol=publisher_pb2.PROTOCOL_GRPC)


def test_grpc_endpoint_host_with_trailing_newline_is_rejected() -> None:
    """A host name ending in a newline is not a host name."""
    with _invalid("endpoint"):
        _spec(endpoint="orders.internal\n:50051", protocol=publisher_pb2.PROTOCOL_GRPC)


@pytest.mark.parametrize(
    ("endpoint", "protocol"),
    [
        ("[fe80::1%\x00]:50051", publisher_pb2.PROTOCOL_GRPC),
        ("https://hooks.example.com/in\t", publisher_pb2.PROTOCOL_HTTP),
        ("https://hooks.exa\r\nmple.com/in", publisher_pb2.PROTOCOL_HTTP),
        ("https://hooks.example.com/i\nn", publisher_pb2.PROTOCOL_UNSPECIFIED),
        ("https://hooks.example.com/\x00", publisher_pb2.PROTOCOL_HTTP),
    ],
)
def test_endpoint_with_control_characters_is_rejected(
    endpoint: str, protocol: publisher_pb2.Protocol.ValueType
) -> None:
    """Checked before parsing: urlsplit drops tabs and line breaks; an IPv6 scope takes a NUL."""
    with _invalid("endpoint"):
        _spec(endpoint=endpoint, protocol=protocol)


@pytest.mark.parametrize("endpoint", ["https://hooks.example.com/in", "http://hooks:8080"])
def test_url_endpoint_with_protocol_grpc_is_rejected(endpoint: str) -> None:
    """A gRPC subscriber's endpoint is host:port, so a URL is refused with field `endpoint`."""
    with _invalid("endpoint"):
        _spec(endpoint=endpoint, protocol=publisher_pb2.PROTOCOL_GRPC)


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://hooks.example.com/in",
        "hooks.example.com:443",
        "http://",
        "https:///path-only",
        "https://user:pw@hooks.example.com/in",
        "https://token@hooks.example.com/in",
        "https://hooks.example.com:99999/in",
        "https://hooks.example.com/" + "x" * validation.MAX_URL_LENGTH,
    ],
)
def test_bad_http_endpoint_is_rejected(endpoint: str) -> None:
    """An HTTP endpoint must be an http(s) URL with a host, a valid port and no credentials."""
    with _invalid("endpoint"):
        _spec(endpoint=endpoint, protocol=publisher_pb2.PROTOCOL_HTTP)


def test_unknown_protocol_is_rejected() -> None:
    """A protocol number outside the enum is refused with field `protocol`."""
    with _invalid("protocol"):
        _spec(protocol=publisher_pb2.Protocol.ValueType(99))


@pytest.mark.parametrize(
    ("endpoint", "protocol"),
    [
        ("https://hooks.example.com/in", model.Protocol.HTTP),
        ("http://hooks.example.com/in", model.Protocol.HTTP),
        ("HTTPS://hooks.example.com/in", model.Protocol.HTTP),
        ("orders.internal:50051", model.Protocol.GRPC),
        ("[::1]:50051", model.Protocol.GRPC),
    ],
)
def test_unspecified_protocol_is_inferred_from_the_endpoint(
    endpoint: str, protocol: model.Protocol
) -> None:
    """Without a protocol, an http(s) URL means HTTP and anything else gRPC."""
    assert _spec(endpoint=endpoint).protocol == protocol


def test_explicit_http_protocol_is_kept() -> None:
    """PROTOCOL_HTTP with a URL endpoint gives an HTTP spec."""
    spec = _spec(endpoint="https://hooks.example.com/in", protocol=publisher_pb2.PROTOCOL_HTTP)
    assert spec.protocol == model.Protocol.HTTP


@pytest.mark.parametrize(
    ("event_types", "field"),
    [
        (["order.paid", "order.*.paid"], "event_types[1]"),
        (["order.paid", ""], "event_types[1]"),
        (["order.paid", "order paid"], "event_types[1]"),
        (["*.paid"], "event_types[0]"),
        (["a", "b", "c*"], "event_types[2]"),
    ],
)
def test_bad_event_type_filter_is_named_by_index(event_types: list[str], field: str) -> None:
    """The first bad filter is reported as `event_types[i]`."""
    with _invalid(field):
        _spec(event_types=event_types)


def test_repeated_event_types_are_kept_once_in_order() -> None:
    """Duplicate filters collapse, keeping their first position."""
    spec = _spec(event_types=["b.*", "a", "b.*", "a", "c"])
    assert spec.event_types == ("b.*", "a", "c")


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ([duration_pb2.Duration(seconds=0)], "retry_schedule[0]"),
        ([duration_pb2.Duration(seconds=-5)], "retry_schedule[0]"),
        (
            [duration_pb2.Duration(seconds=10), duration_pb2.Duration(seconds=0, nanos=-1)],
            "retry_schedule[1]",
        ),
    ],
)
def test_non_positive_duration_is_named_by_index(
    schedule: list[duration_pb2.Duration], field: str
) -> None:
    """A zero or negative retry offset is refused as `retry_schedule[i]`."""
    with _invalid(field):
        _spec(retry_schedule=schedule)


@pytest.mark.parametrize(
    "seconds",
    [(60, 60), (60, 30), (10, 20, 15), (60, retry.MAX_OFFSET + 1)],
)
def test_non_increasing_or_overlong_schedule_is_rejected(seconds: tuple[float, ...]) -> None:
    """Offsets that do not increase, or exceed 24 h, are refused as `retry_schedule`."""
    with _invalid("retry_schedule"):
        _spec(retry_schedule=_seconds(*seconds))


def test_sub_second_schedule_is_accepted() -> None:
    """Nanoseconds count, so a schedule of fractions of a second is usable."""
    spec = _spec(
        retry_schedule=[
            duration_pb2.Duration(nanos=100_000_000),
            duration_pb2.Duration(nanos=500_000_000),
            duration_pb2.Duration(seconds=1, nanos=500_000_000),
        ]
    )
    assert spec.retry_schedule == pytest.approx((0.1, 0.5, 1.5))


def test_empty_schedule_means_the_default() -> None:
    """A subscriber without a schedule gets DEFAULT_SCHEDULE."""
    assert _spec(retry_schedule=[]).retry_schedule == retry.DEFAULT_SCHEDULE


@pytest.mark.parametrize(
    "email",
    [
        "ops",
        "ops@",
        "@example.com",
        "ops@example",
        "o ps@example.com",
        "a@b@c.com",
        'a"b@example.com',
        '"ops"@example.com',
        "victim,ops@example.com",
        "ops(comment)@example.com",
        "<ops@example.com>",
        "Ops <ops@example.com>",
        "ops;x@example.com",
        "ops:x@example.com",
        "ops\\x@example.com",
        "ops@[127.0.0.1]",
        "o\x00ps@example.com",
        "ops@exa\tmple.com",
        # Not ASCII: an SMTP server without SMTPUTF8 refuses the whole message, the
        # operator's copy with it.
        "ü@example.com",
        "a" * 309 + "@example.com",
    ],
)
def test_bad_contact_email_is_rejected(email: str) -> None:
    """A contact email is a plain local@domain.tld of at most 320 characters: nothing that
    quotes, comments, groups or separates addresses in a To header."""
    with _invalid("contact_email"):
        _spec(contact_email=email)


def test_contact_email_with_trailing_newline_is_rejected() -> None:
    """A newline after the address is not part of an email address."""
    with _invalid("contact_email"):
        _spec(contact_email="ops@example.com\n")


@pytest.mark.parametrize(
    "email",
    [
        "ops@example.com",
        "o.p+s-1_x@mail.example.co.uk",
        "a" * 308 + "@example.com",
    ],
)
def test_plain_contact_email_is_accepted(email: str) -> None:
    """Dots, plus signs and 320 characters in all are fine."""
    assert _spec(contact_email=email).contact_email == email


def test_empty_contact_email_is_allowed() -> None:
    """The contact email is optional."""
    assert _spec(contact_email="").contact_email == ""


def test_form_body_for_grpc_is_rejected() -> None:
    """Form bodies are an HTTP thing, so a gRPC subscriber asking for one is refused."""
    with _invalid("body_format"):
        _spec(endpoint="orders.internal:50051", body_format=publisher_pb2.BODY_FORMAT_FORM)


def test_form_body_for_http_is_accepted() -> None:
    """An HTTP subscriber may receive form bodies."""
    spec = _spec(
        endpoint="https://hooks.example.com/in", body_format=publisher_pb2.BODY_FORMAT_FORM
    )
    assert spec.body_format == model.BodyFormat.FORM


def test_unspecified_body_format_means_raw() -> None:
    """Without a body format, the payload goes as it is."""
    assert _spec().body_format == model.BodyFormat.RAW


def test_unknown_body_format_is_rejected() -> None:
    """A body format number outside the enum is refused with field `body_format`."""
    with _invalid("body_format"):
        _spec(body_format=publisher_pb2.BodyFormat.ValueType(99))


@pytest.mark.parametrize(
    "status_url",
    [
        "https://status.example.com/events",
        "https://status.example.com/events/event_id",
        "ftp://status.example.com/{event_id}",
        "https://user:pw@status.example.com/{event_id}",
        "https://status.example.com/{event_id}\n",
        "https://status.exa\tmple.com/{event_id}",
    ],
)
def test_bad_status_url_is_rejected(status_url: str) -> None:
    """A status URL must be an http(s) URL holding the {event_id} placeholder."""
    with _invalid("status_url"):
        _spec(status_url=status_url)


# secret


def test_empty_secret_generates_a_32_byte_whsec_secret() -> None:
    """Without a secret, a fresh `whsec_` secret of 32 random bytes is made."""
    first = validation.secret("")
    second = validation.secret("")
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert first != second


def test_valid_secret_is_kept() -> None:
    """A well-formed secret is returned as it was given."""
    value = "whsec_" + _b64(signing.MIN_SECRET_BYTES)
    assert validation.secret(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "whsec_" + _b64(signing.MIN_SECRET_BYTES - 1),
        "whsec_",
        "whsec_not base64 at all!",
        "whsec_" + _b64(32) + "$",
        "sk_" + _b64(32),
        _b64(32),
        "WHSEC_" + _b64(32),
        "whsec_" + _b64(150),
    ],
)
def test_malformed_secret_is_rejected(value: str) -> None:
    """A short, long (over its column's 200 characters), non-base64 or unprefixed secret is
    refused with field `secret`."""
    with _invalid("secret"):
        validation.secret(value)


# new_event / new_events


def _event(**fields: Any) -> publisher_pb2.EmitRequest:
    values: dict[str, Any] = {"type": "order.paid", "payload": b'{"id": 1}'}
    values.update(fields)
    return publisher_pb2.EmitRequest(**values)


def test_valid_event_gets_the_default_content_type() -> None:
    """An event without a content type is JSON."""
    event = validation.new_event(_event(idempotency_key="k1"), MAX_PAYLOAD)
    assert event == model.NewEvent(
        type="order.paid",
        payload=b'{"id": 1}',
        content_type="application/json",
        idempotency_key="k1",
    )


@pytest.mark.parametrize("event_type", ["", "order.*", "*", "order paid", "order..paid"])
def test_bad_event_type_is_rejected(event_type: str) -> None:
    """Empty, wildcard or malformed types cannot be emitted; the field is `type`."""
    with _invalid("type"):
        validation.new_event(_event(type=event_type), MAX_PAYLOAD)


def test_oversize_payload_is_rejected() -> None:
    """A payload above the limit is refused with field `payload`; one at the limit passes."""
    at_limit = b'"' + b"x" * (MAX_PAYLOAD - 2) + b'"'
    assert validation.new_event(_event(payload=at_limit), MAX_PAYLOAD).payload == at_limit
    with _invalid("payload"):
        validation.new_event(_event(payload=at_limit + b" "), MAX_PAYLOAD)


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        (b"not json", ""),
        (b"", ""),
        (b'{"id": 1', "application/json"),
        (b"\xff\xfe", "application/json; charset=utf-8"),
        (b"{'id': 1}", "Application/JSON"),
    ],
)
def test_invalid_json_with_json_content_type_is_rejected(payload: bytes, content_type: str) -> None:
    """A JSON event (the default) must carry valid JSON; otherwise field `payload` is named."""
    with _invalid("payload"):
        validation.new_event(_event(payload=payload, content_type=content_type), MAX_PAYLOAD)


@pytest.mark.parametrize(
    "content_type", ["application/octet-stream", "text/plain; charset=utf-8", "application/xml"]
)
def test_non_json_content_type_accepts_any_bytes(content_type: str) -> None:
    """With another media type the payload is opaque bytes."""
    payload = b"\x00\xff not json <"
    event = validation.new_event(_event(payload=payload, content_type=content_type), MAX_PAYLOAD)
    assert event.payload == payload
    assert event.content_type == content_type


@pytest.mark.parametrize("content_type", ["json", "application/", "/json", "a b/c"])
def test_malformed_content_type_is_rejected(content_type: str) -> None:
    """A content type must be a type/subtype media type."""
    with _invalid("content_type"):
        validation.new_event(_event(content_type=content_type), MAX_PAYLOAD)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain; a=\rb",
        "text/plain\n; a=b",
        "text/plain; charset=\x00",
        "text/plain;\tcharset=utf-8",
        "text/" + "a" * 196,
    ],
)
def test_content_type_with_control_characters_or_too_long_is_rejected(content_type: str) -> None:
    """A content type goes into an HTTP header, which cannot hold control characters, and into
    a column of 200 characters."""
    with _invalid("content_type"):
        validation.new_event(_event(content_type=content_type, payload=b"x"), MAX_PAYLOAD)


def test_content_type_of_200_characters_is_accepted() -> None:
    content_type = "text/" + "a" * 195
    event = validation.new_event(_event(content_type=content_type, payload=b"x"), MAX_PAYLOAD)
    assert event.content_type == content_type


def test_json_nested_too_deeply_to_check_is_rejected() -> None:
    """The JSON check recurses per level: past Python's limit it refuses, rather than crashes."""
    with _invalid("payload") as info:
        validation.new_event(_event(payload=b"[" * 100_000), 1_000_000)
    assert "nested too deeply" in str(info.value)


def test_json_with_an_integer_of_thousands_of_digits_is_accepted() -> None:
    """Valid JSON whatever its numbers: the check does not convert them (Python refuses to turn
    strings of more than 4300 digits into an int)."""
    payload = b'{"n": ' + b"7" * 5000 + b"}"
    assert validation.new_event(_event(payload=payload), MAX_PAYLOAD * 10).payload == payload


@pytest.mark.parametrize("key", ["a\x00b", "a\nb", "k\t"])
def test_idempotency_key_with_control_characters_is_rejected(key: str) -> None:
    with _invalid("idempotency_key"):
        validation.new_event(_event(idempotency_key=key), MAX_PAYLOAD)


def test_long_idempotency_key_is_rejected() -> None:
    """An idempotency key over 200 characters is refused; one of 200 is fine."""
    key = "k" * validation.MAX_KEY_LENGTH
    assert validation.new_event(_event(idempotency_key=key), MAX_PAYLOAD).idempotency_key == key
    with _invalid("idempotency_key"):
        validation.new_event(_event(idempotency_key=key + "k"), MAX_PAYLOAD)


def test_new_events_names_the_index_of_the_bad_event() -> None:
    """In a batch, the third event's bad type is reported as `events[2].type`."""
    batch = [_event(), _event(type="user.created"), _event(type="bad type"), _event(type="")]
    with _invalid("events[2].type"):
        validation.new_events(batch, MAX_PAYLOAD)


def test_new_events_names_the_index_of_a_bad_payload() -> None:
    """Field prefixes apply to every field of an event, not only its type."""
    with _invalid("events[1].payload"):
        validation.new_events([_event(), _event(payload=b"nope")], MAX_PAYLOAD)


def test_new_events_keeps_order() -> None:
    """A valid batch becomes the same events in the same order."""
    types = [f"t{i}" for i in range(5)]
    events = validation.new_events([_event(type=t) for t in types], MAX_PAYLOAD)
    assert [e.type for e in events] == types


def test_new_events_rejects_an_empty_batch() -> None:
    """A batch must hold at least one event."""
    with _invalid("events"):
        validation.new_events([], MAX_PAYLOAD)


def test_new_events_rejects_more_than_1000() -> None:
    """A batch holds at most 1000 events."""
    assert len(validation.new_events([_event()] * validation.MAX_BATCH, MAX_PAYLOAD)) == 1000
    with _invalid("events"):
        validation.new_events([_event()] * (validation.MAX_BATCH + 1), MAX_PAYLOAD)


# paging, masks, states, ids


@pytest.mark.parametrize(
    ("given", "expected"), [(0, 50), (1, 1), (50, 50), (1000, 1000), (5000, 1000)]
)
def test_page_size_defaults_and_caps(given: int, expected: int) -> None:
    """Zero means 50; anything above 1000 is cut to 1000."""
    assert validation.page_size(given) == expected


def test_negative_page_size_is_rejected() -> None:
    """A negative page size is refused with field `page_size`."""
    with _invalid("page_size"):
        validation.page_size(-1)


def test_update_paths_returns_the_named_fields() -> None:
    """Known paths come back as a set."""
    assert validation.update_paths(["name", "endpoint", "name"]) == {"name", "endpoint"}


def test_update_paths_rejects_an_empty_mask() -> None:
    """An update must name at least one field."""
    with _invalid("update_mask"):
        validation.update_paths([])


@pytest.mark.parametrize("path", ["secret", "id", "created_at", "Name"])
def test_update_paths_names_the_unknown_path(path: str) -> None:
    """A path that cannot be updated is refused, and the message names it."""
    with _invalid("update_mask") as info:
        validation.update_paths(["name", path])
    assert path in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (publisher_pb2.DELIVERY_STATE_UNSPECIFIED, None),
        (publisher_pb2.DELIVERY_STATE_PENDING, model.DeliveryState.PENDING),
        (publisher_pb2.DELIVERY_STATE_DELIVERED, model.DeliveryState.DELIVERED),
        (publisher_pb2.DELIVERY_STATE_FAILED, model.DeliveryState.FAILED),
    ],
)
def test_delivery_state_maps_the_enum(
    value: publisher_pb2.DeliveryState.ValueType, expected: model.DeliveryState | None
) -> None:
    """UNSPECIFIED means no filter; each other value maps to its domain state."""
    assert validation.delivery_state(value) == expected


def test_unknown_delivery_state_is_rejected() -> None:
    """A delivery state number outside the enum is refused with field `state`."""
    with _invalid("state"):
        validation.delivery_state(publisher_pb2.DeliveryState.ValueType(42))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (publisher_pb2.SUBSCRIBER_STATE_ACTIVE, model.SubscriberState.ACTIVE),
        (publisher_pb2.SUBSCRIBER_STATE_PAUSED, model.SubscriberState.PAUSED),
        (publisher_pb2.SUBSCRIBER_STATE_DISABLED, model.SubscriberState.DISABLED),
    ],
)
def test_subscriber_state_maps_the_enum(
    value: publisher_pb2.SubscriberState.ValueType, expected: model.SubscriberState
) -> None:
    """Each concrete subscriber state maps to its domain state."""
    assert validation.subscriber_state(value) == expected


def test_unspecified_subscriber_state_is_rejected() -> None:
    """An update must say which state it sets."""
    with _invalid("subscriber.state"):
        validation.subscriber_state(publisher_pb2.SUBSCRIBER_STATE_UNSPECIFIED)


def test_required_id_rejects_empty_and_names_the_field() -> None:
    """An empty id is refused under the caller's field name; a present one passes through."""
    assert validation.required_id("sub_1", "subscriber_id") == "sub_1"
    with _invalid("subscriber_id"):
        validation.required_id("", "subscriber_id")


@pytest.mark.parametrize("value", ["sub_\x00", "sub\n", "\tsub_1", "sub_\x7f"])
def test_ids_with_control_characters_are_rejected(value: str) -> None:
    """PostgreSQL refuses a NUL in a query's text; no id holds a control character."""
    with _invalid("subscriber_id"):
        validation.required_id(value, "subscriber_id")
    with _invalid("event_id"):
        validation.optional_id(value, "event_id")
    with _invalid("subscriber_id"):
        validation.replay_filter(value, ["order.*"])


def test_optional_ids_may_be_empty() -> None:
    assert validation.optional_id("", "event_id") == ""
    assert validation.optional_id("evt_1", "event_id") == "evt_1"


@pytest.mark.parametrize(
    ("value", "expected"), [("", 0), ("0", 0), ("42", 42), (str(2**63 - 1), 2**63 - 1)]
)
def test_cursor_is_a_64_bit_number(value: str, expected: int) -> None:
    assert validation.cursor(value) == expected


@pytest.mark.parametrize("value", [str(2**63), "9" * 25, "9" * 5000, "-1", "1.5", "\u0663"])
def test_cursor_outside_64_bits_or_not_a_number_is_rejected(value: str) -> None:
    """Above 2**63-1 no database column holds it; thousands of digits int() refuses outright."""
    with _invalid("cursor"):
        validation.cursor(value)


@pytest.mark.parametrize(
    "stored", [1_700_000_000.0000017, 1_796_170_421.619424, 1_700_000_000.0, 0.25, 1e-10]
)
def test_since_a_shown_time_takes_in_the_time_it_was_shown_for_and_not_one_later(
    stored: float,
) -> None:
    """A stored time is shown in whole nanoseconds rounded down; ``since`` that is at or before
    it, and ``since`` a nanosecond later is after it."""
    shown = math.floor(fractions.Fraction(stored) * 1_000_000_000)

    def since(nanos: int) -> float:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(nanos)
        return validation.since(stamp)

    assert since(shown) <= stored < since(shown + 1)


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (-(2**62), 0), (0, -5), (0, 10**9)])
def test_since_outside_a_timestamps_range_is_rejected(seconds: int, nanos: int) -> None:
    with _invalid("since"):
        validation.since(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))


def _loads_accepts(payload: bytes) -> bool:
    try:
        json.loads(payload, parse_int=str)
    except (ValueError, RecursionError):
        return False
    return True


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=64))
def test_the_json_check_refuses_exactly_the_bytes_json_loads_refuses(payload: bytes) -> None:
    """The check decodes bytes as json.loads does (its decoder is made once, not per call)."""
    assert (validation._json_problem(payload) is None) == _loads_accepts(payload)


@given(
    _JSON_VALUES,
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
)
def test_json_in_any_encoding_json_loads_reads_is_accepted(value: Any, encoding: str) -> None:
    payload = json.dumps(value, ensure_ascii=False).encode(encoding)
    assert _loads_accepts(payload)
    assert validation._json_problem(payload) is None


def test_a_refused_content_type_is_refused_every_time() -> None:
    """Content types are checked once and remembered, refusals included."""
    for _ in range(3):
        with _invalid("events[0].content_type"):
            validation.new_events([_event(content_type="a b/c")], MAX_PAYLOAD)


def test_a_long_content_type_is_checked_but_not_remembered() -> None:
    """The remembered checks hold short strings only: a caller's megabyte of content type
    is refused and forgotten, and one padded with spaces to a valid type is still checked."""
    validation._remembered_content_type.cache_clear()
    with _invalid("content_type"):
        validation.new_event(_event(content_type="text/" + "a" * 1_000_000), MAX_PAYLOAD)
    padded = " " * 300 + "text/plain" + " " * 300
    event = validation.new_event(_event(content_type=padded, payload=b"x"), MAX_PAYLOAD)
    assert event.content_type == "text/plain"
    assert validation._remembered_content_type.cache_info().currsize == 0
