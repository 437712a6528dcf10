"""The subscriber's checks on who calls and what they signed, without servers or databases."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import uuid

import jwt
import pytest
from standardwebhooks.webhooks import Webhook

from common import errors
from subscriber import verifier

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
NOW = 1_700_000_000
TOLERANCE = 300


def make_verifier(allow: list[str] | None = None) -> verifier.Verifier:
    return verifier.Verifier(
        keys=[KEY],
        audience="sub_1",
        allowlist=verifier.parse_allowlist(allow or []),
        timestamp_tolerance=TOLERANCE,
        clock=lambda: NOW,
    )


def bearer(event_id: str, payload: bytes) -> str:
    return signed(
        event_id,
        event_type="order.created",
        attempt=1,
        body_sha256=hashlib.sha256(payload).hexdigest(),
    )


def signed(event_id: str, **claims: object) -> str:
    """An authorization value: a token for ``event_id`` with ``claims``, made with PyJWT."""
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    common = {
        "iss": "tests",
        "aud": "sub_1",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "event_id": event_id,
    }
    return "Bearer " + jwt.encode({**common, **claims}, KEY, algorithm="HS256")


def standard_signature(message_id: str, timestamp: int, body: str) -> str:
    when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return Webhook(SECRET).sign(message_id, when, body)


def test_allowlist_accepts_networks_and_single_hosts_of_both_families() -> None:
    """CIDRs and bare addresses (one host) of IPv4 and IPv6 parse into networks."""
    allowlist = verifier.parse_allowlist(["10.0.0.0/8", " 192.0.2.7 ", "2001:db8::/32", "::1"])

    assert allowlist.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert allowlist.allows(ipaddress.ip_address("10.20.30.40"))
    assert allowlist.allows(ipaddress.ip_address("192.0.2.7"))
    assert not allowlist.allows(ipaddress.ip_address("192.0.2.8"))
    assert allowlist.allows(ipaddress.ip_address("2001:db8::5"))
    assert not allowlist.allows(ipaddress.ip_address("2001:db9::5"))


def test_empty_allowlist_lets_every_caller_in_even_without_an_ip() -> None:
    """No networks configured means the allowlist is off."""
    allowlist = verifier.parse_allowlist([])

    assert allowlist.allows(ipaddress.ip_address("203.0.113.9"))
    assert allowlist.allows(None)


def test_allowlist_refuses_a_caller_without_an_ip_when_networks_are_set() -> None:
    """A peer that is not an IP (say a Unix socket) cannot prove it is in the list."""
    assert not verifier.parse_allowlist(["127.0.0.0/8"]).allows(None)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("10.0.0.1/8", "has host bits set"),
        ("not-an-ip", "does not appear to be an IPv4 or IPv6 network"),
        ("10.0.0.0/33", "does not appear to be an IPv4 or IPv6 network"),
        ("", "does not appear to be an IPv4 or IPv6 network"),
    ],
)
def test_allowlist_entry_that_is_not_a_network_is_refused_naming_the_field(
    entry: str, problem: str
) -> None:
    """A bad entry is an InvalidArgument that names the flag and the entry."""
    with pytest.raises(errors.InvalidArgument) as raised:
        verifier.parse_allowlist(["127.0.0.1", entry], field="--allow-ip")

    assert raised.value.field == "--allow-ip"
    assert repr(entry) in str(raised.value)
    assert problem in str(raised.value)


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B::1%5D:5555", "::1"),
        ("ipv6:[::ffff:10.1.2.3]:5555", "10.1.2.3"),
        ("unix:/tmp/socket", None),
        ("garbage", None),
    ],
)
def test_grpc_peer_strings_give_their_ip(peer: str, address: str | None) -> None:
    """gRPC peers name their IP inside a transport prefix; IPv4-mapped IPv6 is unwrapped."""
    expected = None if address is None else ipaddress.ip_address(address)

    assert verifier.grpc_peer_address(peer) == expected


def test_http_remote_in_ipv4_mapped_form_matches_ipv4_networks() -> None:
    """A dual-stack socket reports ::ffff:a.b.c.d; the allowlist sees a.b.c.d."""
    make_verifier(["10.0.0.0/8"]).check_address(verifier.parse_address("::ffff:10.9.8.7"))


def test_address_outside_the_allowlist_is_permission_denied_naming_it() -> None:
    """The refusal says which address was refused."""
    with pytest.raises(errors.PermissionDenied, match=r"192\.0\.2\.1 is not in the IP allowlist"):
        make_verifier(["10.0.0.0/8"]).check_address(ipaddress.ip_address("192.0.2.1"))


def test_standard_webhook_within_tolerance_is_accepted() -> None:
    """A signature made by the standardwebhooks package verifies at the edge of the window."""
    timestamp = NOW - TOLERANCE
    signature = standard_signature("msg_1", timestamp, '{"a":1}')

    make_verifier().standard("msg_1", str(timestamp), signature, b'{"a":1}')


@pytest.mark.parametrize(
    ("offset", "reason"), [(-TOLERANCE - 1, "s old"), (TOLERANCE + 1, "s far in the future")]
)
def test_standard_webhook_outside_tolerance_is_unauthenticated(offset: int, reason: str) -> None:
    """A correctly signed but stale or future timestamp is refused, saying why."""
    timestamp = NOW + offset
    signature = standard_signature("msg_1", timestamp, "{}")

    with pytest.raises(errors.Unauthenticated, match=f"{reason}; tolerance is 300 s"):
        make_verifier().standard("msg_1", str(timestamp), signature, b"{}")


def test_standard_webhook_signed_over_other_bytes_is_unauthenticated() -> None:
    """The signature binds the exact body."""
    signature = standard_signature("msg_1", NOW, '{"amount":1}')

    with pytest.raises(errors.Unauthenticated, match="no valid webhook-signature"):
        make_verifier().standard("msg_1", str(NOW), signature, b'{"amount":100}')


@pytest.mark.parametrize(
    ("message_id", "timestamp", "field"),
    [
        (None, str(NOW), "webhook-id"),
        ("msg_1", None, "webhook-timestamp"),
        ("msg_1", "soon", "webhook-timestamp"),
    ],
)
def test_standard_webhook_with_missing_or_malformed_header_is_invalid_argument(
    message_id: str | None, timestamp: str | None, field: str
) -> None:
    """A malformed request names the header at fault instead of failing the signature."""
    with pytest.raises(errors.InvalidArgument) as raised:
        make_verifier().standard(message_id, timestamp, "v1,AAAA", b"{}")

    assert raised.value.field == field


def test_standard_webhook_id_with_undecodable_bytes_is_invalid_argument() -> None:
    """Header bytes that are not UTF-8 (lone surrogates after decoding) cannot be signed over."""
    with pytest.raises(errors.InvalidArgument, match="webhook-id: is not valid UTF-8"):
        make_verifier().standard("msg_\udcff", str(NOW), "v1,AAAA", b"{}")


def test_status_query_needs_a_token_for_that_event_over_an_empty_payload() -> None:
    """Status tokens are signed over b"" and only open the event they name."""
    checks = make_verifier()

    checks.status_query(bearer("evt_1", b""), "evt_1")
    with pytest.raises(errors.Unauthenticated, match="token is for event 'evt_1', not 'evt_2'"):
        checks.status_query(bearer("evt_1", b""), "evt_2")
    with pytest.raises(errors.Unauthenticated, match="body_sha256"):
        checks.status_query(bearer("evt_1", b"{}"), "evt_1")


def status_bearer(event_id: str) -> str:
    """A status question's token as the publisher makes it, made here with PyJWT."""
    return signed(event_id, purpose="status")


def test_status_token_opens_its_status_query_but_is_no_delivery() -> None:
    """A status token answers for its event, and is refused as an (empty) delivery of it."""
    checks = make_verifier()

    checks.status_query(status_bearer("evt_1"), "evt_1")
    with pytest.raises(errors.Unauthenticated, match="purpose is 'status'"):
        checks.delivery(status_bearer("evt_1"), b"")
    with pytest.raises(errors.Unauthenticated, match="token is for event 'evt_1', not 'evt_2'"):
        checks.status_query(status_bearer("evt_1"), "evt_2")


def test_standard_webhook_timestamp_past_floats_range_is_invalid_argument() -> None:
    """A timestamp of hundreds of digits is a malformed header, not an OverflowError."""
    with pytest.raises(errors.InvalidArgument, match="webhook-timestamp: is out of range"):
        make_verifier().standard("msg_1", "9" * 400, "v1,AAAA", b"{}")


def test_standard_webhook_signature_with_non_ascii_text_is_unauthenticated() -> None:
    """A signature that is not ASCII cannot match; it is refused, not a TypeError."""
    with pytest.raises(errors.Unauthenticated, match="no valid webhook-signature"):
        make_verifier().standard("msg_1", str(NOW), "v1,\u00e9", b"{}")


def test_authorization_with_undecodable_bytes_is_unauthenticated_on_both_checks() -> None:
    """Lone surrogates (undecodable header bytes) in the token are refused with a reason."""
    checks = make_verifier()

    with pytest.raises(errors.Unauthenticated, match="not ASCII"):
        checks.delivery("Bearer a\udcff.b.c", b"{}")
    with pytest.raises(errors.Unauthenticated, match="not ASCII"):
        checks.status_query("Bearer a\udcff.b.c", "evt_1")
