"""Secrets, delivery JWTs and Standard Webhooks signatures, checked against stock libraries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from common import errors, signing

PAYLOAD = b'{"order": 42, "total": "9.99"}'
AUDIENCE = "https://hooks.example.com/in"
ISSUER = "webhooks-publisher"


@pytest.fixture
def secret() -> str:
    return signing.generate_secret()


@pytest.fixture
def key(secret: str) -> bytes:
    return signing.secret_key(secret)


@pytest.fixture
def other_key() -> bytes:
    return signing.secret_key(signing.generate_secret())


def _sign(key: bytes, *, now: float | None = None, payload: bytes = PAYLOAD) -> str:
    return signing.sign_delivery(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        event_id="evt_1",
        event_type="order.paid",
        attempt=3,
        payload=payload,
        now=time.time() if now is None else now,
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS built by hand, so the test controls the header and signature."""
    signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64url(sign(signing_input.encode()))}"


def _claims(key: bytes) -> dict[str, Any]:
    """The claims of a genuine token, to reuse in forged ones."""
    claims: dict[str, Any] = jwt.decode(_sign(key), key, algorithms=["HS256"], audience=AUDIENCE)
    return claims


# secrets


def test_generated_secret_is_whsec_and_32_random_bytes() -> None:
    """generate_secret gives `whsec_` + base64 of 32 bytes, different every time."""
    first, second = signing.generate_secret(), signing.generate_secret()
    assert first.startswith("whsec_")
    assert len(signing.secret_key(first)) == 32
    assert first != second


def test_secret_key_decodes_the_base64_part() -> None:
    """The key is the bytes behind the prefix."""
    raw = bytes(range(32))
    assert signing.secret_key("whsec_" + base64.b64encode(raw).decode()) == raw


@pytest.mark.parametrize(
    "value",
    [
        "sk_" + base64.b64encode(b"k" * 32).decode(),
        base64.b64encode(b"k" * 32).decode(),
        "whsec_***",
        "whsec_" + base64.b64encode(b"k" * 32).decode() + " ",
        "whsec_" + base64.b64encode(b"k" * 23).decode(),
        "whsec_",
    ],
)
def test_secret_key_rejects_malformed_secrets_naming_the_field(value: str) -> None:
    """Wrong prefix, bad base64 or fewer than 24 bytes raise InvalidArgument for the given field."""
    with pytest.raises(errors.InvalidArgument) as info:
        signing.secret_key(value, "subscriber.secret")
    assert info.value.field == "subscriber.secret"


def test_minimum_length_secret_signs_without_an_insecure_key_warning() -> None:
    """Every secret secret_key accepts is long enough for HS256 (PyJWT warns below 32 bytes)."""
    smallest = signing.secret_key(
        "whsec_" + base64.b64encode(b"k" * signing.MIN_SECRET_BYTES).decode()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sign(smallest)
    assert [str(w.message) for w in caught] == []


# delivery tokens


def test_delivery_token_verifies_with_plain_pyjwt(key: bytes) -> None:
    """A stock PyJWT decode with the raw key, HS256 and the audience accepts the token."""
    now = time.time()
    claims = jwt.decode(_sign(key, now=now), key, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["event_id"] == "evt_1"
    assert claims["event_type"] == "order.paid"
    assert claims["attempt"] == 3
    assert claims["iat"] == int(now)
    assert claims["exp"] == int(now) + signing.JWT_LIFETIME_SECONDS
    assert claims["jti"]


@given(
    issuer=st.text(),
    audience=st.text(),
    event_id=st.text(),
    event_type=st.text(),
    attempt=st.integers(min_value=0, max_value=2**62),
)
def test_delivery_token_claims_are_the_json_of_any_values(
    issuer: str, audience: str, event_id: str, event_type: str, attempt: int
) -> None:
    """The claims, written out by hand, are exactly json.dumps's text for any strings
    (quotes, backslashes, control and non-ASCII characters), and PyJWT reads them back."""
    key = b"k" * 32
    token = signing.sign_delivery(
        key,
        issuer=issuer,
        audience=audience,
        event_id=event_id,
        event_type=event_type,
        attempt=attempt,
        payload=PAYLOAD,
        now=time.time(),
    )
    segment = token.split(".")[1]
    text = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode("ascii")
    claims = json.loads(text)
    assert text == json.dumps(claims, separators=(",", ":"))
    assert {k: claims[k] for k in ("iss", "aud", "event_id", "event_type", "attempt")} == {
        "iss": issuer,
        "aud": audience,
        "event_id": event_id,
        "event_type": event_type,
        "attempt": attempt,
    }
    decoded = jwt.decode(token, key, algorithms=["HS256"], options={"verify_aud": False})
    assert decoded == claims


def test_delivery_token_binds_the_payload_hash(key: bytes) -> None:
    """The body_sha256 claim is the hex SHA-256 of the exact payload."""
    claims = jwt.decode(_sign(key), key, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["body_sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_delivery_tokens_have_unique_ids(key: bytes) -> None:
    """Two tokens for the same attempt carry different jti values."""
    now = time.time()
    first = jwt.decode(_sign(key, now=now), key, algorithms=["HS256"], audience=AUDIENCE)
    second = jwt.decode(_sign(key, now=now), key, algorithms=["HS256"], audience=AUDIENCE)
    assert first["jti"] != second["jti"]


def test_verify_delivery_returns_the_claims(key: bytes) -> None:
    """A genuine token over the received payload verifies and yields its claims."""
    claims = signing.verify_delivery(_sign(key), [key], audience=AUDIENCE, payload=PAYLOAD)
    assert claims.issuer == ISSUER
    assert claims.audience == AUDIENCE
    assert claims.event_id == "evt_1"
    assert claims.event_type == "order.paid"
    assert claims.attempt == 3
    assert claims.body_sha256 == hashlib.sha256(PAYLOAD).hexdigest()


@pytest.mark.parametrize("tampered", [PAYLOAD + b" ", PAYLOAD.replace(b"9.99", b"0.01"), b""])
def test_verify_delivery_rejects_a_tampered_payload(key: bytes, tampered: bytes) -> None:
    """A payload that differs from the signed one fails on the body hash."""
    with pytest.raises(errors.Unauthenticated, match="body_sha256"):
        signing.verify_delivery(_sign(key), [key], audience=AUDIENCE, payload=tampered)


def test_verify_delivery_rejects_a_wrong_audience(key: bytes) -> None:
    """A token meant for another endpoint is refused."""
    with pytest.raises(errors.Unauthenticated):
        signing.verify_delivery(
            _sign(key), [key], audience="https://elsewhere.example.com/", payload=PAYLOAD
        )


def test_verify_delivery_without_configured_audience_skips_the_check(key: bytes) -> None:
    """With audience None any audience is accepted (the subscriber did not configure one)."""
    claims = signing.verify_delivery(_sign(key), [key], audience=None, payload=PAYLOAD)
    assert claims.audience == AUDIENCE


def test_verify_delivery_rejects_an_expired_token(key: bytes) -> None:
    """A token signed an hour ago has expired, leeway included."""
    token = _sign(key, now=time.time() - 3600)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)


def test_verify_delivery_rejects_a_token_signed_with_another_key(
    key: bytes, other_key: bytes
) -> None:
    """Only the subscriber's keys are trusted."""
    with pytest.raises(errors.Unauthenticated):
        signing.verify_delivery(_sign(other_key), [key], audience=AUDIENCE, payload=PAYLOAD)


def test_verify_delivery_rejects_without_keys(key: bytes) -> None:
    """With no secret configured nothing verifies."""
    with pytest.raises(errors.Unauthenticated):
        signing.verify_delivery(_sign(key), [], audience=AUDIENCE, payload=PAYLOAD)


@pytest.mark.parametrize("order", ["new-first", "new-last"])
def test_verify_delivery_accepts_when_any_key_matches(
    key: bytes, other_key: bytes, order: str
) -> None:
    """During rotation a token signed with either key verifies, whatever the key order."""
    keys = [key, other_key] if order == "new-first" else [other_key, key]
    assert signing.verify_delivery(_sign(key), keys, audience=AUDIENCE, payload=PAYLOAD)
    assert signing.verify_delivery(_sign(other_key), keys, audience=AUDIENCE, payload=PAYLOAD)


def test_verify_delivery_rejects_an_unsigned_alg_none_token(key: bytes) -> None:
    """A token with `alg: none` and no signature is refused."""
    token = _forge({"alg": "none", "typ": "JWT"}, _claims(key), lambda _: b"")
    with pytest.raises(errors.Unauthenticated):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)


def test_verify_delivery_rejects_hs512_signed_with_the_right_key(key: bytes) -> None:
    """Only HS256 is allowed: a valid HS512 signature with the subscriber's key is still refused."""
    token = _forge(
        {"alg": "HS512", "typ": "JWT"},
        _claims(key),
        lambda data: hmac.new(key, data, hashlib.sha512).digest(),
    )
    with pytest.raises(errors.Unauthenticated, match="alg"):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)


def test_verify_delivery_rejects_an_rs256_header(key: bytes) -> None:
    """A token claiming RS256 (algorithm confusion) is refused, even with an HMAC by the key."""
    token = _forge(
        {"alg": "RS256", "typ": "JWT"},
        _claims(key),
        lambda data: hmac.new(key, data, hashlib.sha256).digest(),
    )
    with pytest.raises(errors.Unauthenticated, match="alg"):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)


def test_verify_delivery_rejects_a_token_missing_a_required_claim(key: bytes) -> None:
    """A correctly signed token without body_sha256 does not verify."""
    claims = _claims(key)
    del claims["body_sha256"]
    token = jwt.encode(claims, key, algorithm="HS256")
    with pytest.raises(errors.Unauthenticated):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c"])
def test_verify_delivery_rejects_garbage(key: bytes, token: str) -> None:
    """Something that is not a JWT at all is refused as Unauthenticated."""
    with pytest.raises(errors.Unauthenticated):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc.def.ghi", "abc.def.ghi"), ("bearer   abc.def.ghi  ", "abc.def.ghi")],
)
def test_bearer_token_extracts_the_token(header: str, token: str) -> None:
    """The scheme is case-insensitive and surrounding spaces are dropped."""
    assert signing.bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwdw=="])
def test_bearer_token_rejects_missing_or_other_schemes(header: str | None) -> None:
    """No header, no token or another scheme is Unauthenticated."""
    with pytest.raises(errors.Unauthenticated):
        signing.bearer_token(header)


# Standard Webhooks


def _headers(message_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def test_standard_signature_verifies_with_the_standardwebhooks_package(secret: str) -> None:
    """The reference implementation accepts our webhook-signature header."""
    timestamp = int(time.time())
    header = signing.standard_signatures([signing.secret_key(secret)], "msg_1", timestamp, PAYLOAD)
    assert header.startswith("v1,")
    parsed = Webhook(secret).verify(PAYLOAD, _headers("msg_1", timestamp, header))
    assert parsed == json.loads(PAYLOAD)


def test_two_keys_give_two_signatures_each_valid() -> None:
    """With two keys the header holds two space-separated signatures, one per key."""
    secrets = [signing.generate_secret(), signing.generate_secret()]
    keys = [signing.secret_key(s) for s in secrets]
    timestamp = int(time.time())
    header = signing.standard_signatures(keys, "msg_2", timestamp, PAYLOAD)
    parts = header.split(" ")
    assert len(parts) == 2
    for secret, part in zip(secrets, parts, strict=True):
        Webhook(secret).verify(PAYLOAD, _headers("msg_2", timestamp, part), json_parse=False)
    for secret in secrets:
        Webhook(secret).verify(PAYLOAD, _headers("msg_2", timestamp, header), json_parse=False)


def test_standardwebhooks_rejects_our_signature_over_another_body(secret: str) -> None:
    """The reference implementation agrees that the signature covers the body."""
    timestamp = int(time.time())
    header = signing.standard_signatures([signing.secret_key(secret)], "msg_3", timestamp, PAYLOAD)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(PAYLOAD + b" ", _headers("msg_3", timestamp, header))


def test_verify_standard_accepts_its_own_signatures(key: bytes, other_key: bytes) -> None:
    """A header made by standard_signatures verifies against any one of the keys."""
    header = signing.standard_signatures([key, other_key], "msg_4", 1_700_000_000, PAYLOAD)
    signing.verify_standard([other_key], "msg_4", 1_700_000_000, PAYLOAD, header)
    signing.verify_standard([key], "msg_4", 1_700_000_000, PAYLOAD, header)


def test_verify_standard_accepts_a_header_from_standardwebhooks(secret: str, key: bytes) -> None:
    """A signature made by the reference implementation verifies with verify_standard."""
    timestamp = int(time.time())
    header = Webhook(secret).sign(
        "msg_5", datetime.fromtimestamp(timestamp, tz=UTC), PAYLOAD.decode()
    )
    signing.verify_standard([key], "msg_5", timestamp, PAYLOAD, header)


@pytest.mark.parametrize(
    ("message_id", "timestamp", "body"),
    [
        ("msg_6", 1_700_000_000, PAYLOAD + b"\n"),
        ("msg_6", 1_700_000_000, PAYLOAD.replace(b"42", b"43")),
        ("msg_7", 1_700_000_000, PAYLOAD),
        ("msg_6", 1_700_000_001, PAYLOAD),
    ],
)
def test_verify_standard_rejects_a_modified_body_id_or_timestamp(
    key: bytes, message_id: str, timestamp: int, body: bytes
) -> None:
    """The signature covers id, timestamp and body; changing any of them fails."""
    header = signing.standard_signatures([key], "msg_6", 1_700_000_000, PAYLOAD)
    with pytest.raises(errors.Unauthenticated):
        signing.verify_standard([key], message_id, timestamp, body, header)


def test_verify_standard_rejects_another_key(key: bytes, other_key: bytes) -> None:
    """A signature by a key the subscriber does not hold is refused."""
    header = signing.standard_signatures([other_key], "msg_8", 1_700_000_000, PAYLOAD)
    with pytest.raises(errors.Unauthenticated):
        signing.verify_standard([key], "msg_8", 1_700_000_000, PAYLOAD, header)


def test_verify_standard_ignores_other_signature_versions(key: bytes) -> None:
    """Only `v1,` entries count; the same digest under another version label does not verify."""
    v1 = signing.standard_signature(key, "msg_9", 1_700_000_000, PAYLOAD)
    v2 = "v2," + v1.removeprefix("v1,")
    with pytest.raises(errors.Unauthenticated):
        signing.verify_standard([key], "msg_9", 1_700_000_000, PAYLOAD, v2)
    signing.verify_standard([key], "msg_9", 1_700_000_000, PAYLOAD, f"{v2} {v1}")


# status tokens


def _sign_status(key: bytes, *, event_id: str = "evt_1") -> str:
    return signing.sign_status(
        key, issuer=ISSUER, audience=AUDIENCE, event_id=event_id, now=time.time()
    )


def test_status_token_verifies_with_plain_pyjwt_and_says_it_is_a_status_question(
    key: bytes,
) -> None:
    """A stock PyJWT decode accepts it; it names the event and its purpose and binds no body."""
    claims = jwt.decode(_sign_status(key), key, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["iss"] == ISSUER
    assert claims["event_id"] == "evt_1"
    assert claims["purpose"] == "status"
    assert claims["jti"]
    assert "body_sha256" not in claims


@pytest.mark.parametrize("payload", [b"", PAYLOAD])
def test_verify_delivery_refuses_a_status_token_whatever_the_payload(
    key: bytes, payload: bytes
) -> None:
    """A status question's token is not a delivery: it cannot record its event, empty or not."""
    with pytest.raises(errors.Unauthenticated, match="purpose is 'status'"):
        signing.verify_delivery(_sign_status(key), [key], audience=AUDIENCE, payload=payload)


def test_a_status_token_without_its_purpose_claim_still_fails_as_a_delivery(key: bytes) -> None:
    """Even a question stripped of "purpose" (by a key holder) binds no body, so it never verifies
    as a delivery: the body hash is required."""
    claims = jwt.decode(_sign_status(key), key, algorithms=["HS256"], audience=AUDIENCE)
    del claims["purpose"]
    token = jwt.encode(claims, key, algorithm="HS256")
    with pytest.raises(errors.Unauthenticated, match="body_sha256"):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=b"")


def test_verify_status_accepts_a_status_token_for_its_event_only(key: bytes) -> None:
    """A status token opens the question about the event it names, and no other."""
    signing.verify_status(_sign_status(key), [key], audience=AUDIENCE, event_id="evt_1")
    with pytest.raises(errors.Unauthenticated, match="token is for event 'evt_1', not 'evt_2'"):
        signing.verify_status(_sign_status(key), [key], audience=AUDIENCE, event_id="evt_2")


def test_verify_status_accepts_an_older_publishers_delivery_token_over_an_empty_body(
    key: bytes,
) -> None:
    """Publishers from before status tokens asked with a delivery token over b""; still answered."""
    signing.verify_status(_sign(key, payload=b""), [key], audience=AUDIENCE, event_id="evt_1")


def test_verify_status_refuses_a_delivery_token_over_a_payload(key: bytes) -> None:
    """A captured delivery opens no status question: its body hash is not the empty body's."""
    with pytest.raises(errors.Unauthenticated, match="body_sha256"):
        signing.verify_status(_sign(key), [key], audience=AUDIENCE, event_id="evt_1")


def test_verify_status_refuses_another_purpose_another_key_and_an_expired_token(
    key: bytes, other_key: bytes
) -> None:
    """Only the status purpose, the subscriber's keys and a live token open a status question."""
    claims = jwt.decode(_sign_status(key), key, algorithms=["HS256"], audience=AUDIENCE)
    other_purpose = jwt.encode({**claims, "purpose": "catch-up"}, key, algorithm="HS256")
    expired = jwt.encode(
        {**claims, "iat": claims["iat"] - 3600, "exp": claims["exp"] - 3600}, key, algorithm="HS256"
    )
    for token, keys, reason in [
        (other_purpose, [key], "purpose is 'catch-up', not 'status'"),
        (_sign_status(other_key), [key], "Signature verification failed"),
        (expired, [key], "expired"),
    ]:
        with pytest.raises(errors.Unauthenticated, match=reason):
            signing.verify_status(token, keys, audience=AUDIENCE, event_id="evt_1")


@pytest.mark.parametrize("token", ["a\udcff.b.c", "\u00e9.b.c"])
def test_a_token_that_is_not_ascii_is_unauthenticated_not_a_crash(key: bytes, token: str) -> None:
    """Undecodable header bytes (lone surrogates) or non-ASCII text fail verification with a
    reason; PyJWT alone raises UnicodeEncodeError on the first."""
    with pytest.raises(errors.Unauthenticated, match="not ASCII"):
        signing.verify_delivery(token, [key], audience=AUDIENCE, payload=PAYLOAD)
    with pytest.raises(errors.Unauthenticated, match="not ASCII"):
        signing.verify_status(token, [key], audience=AUDIENCE, event_id="evt_1")
    with pytest.raises(errors.Unauthenticated, match="not ASCII"):
        signing.verify_catch_up(token, [key], subscriber_id="sub_1", audience=AUDIENCE)


def test_verify_standard_refuses_a_non_ascii_signature_with_a_reason(key: bytes) -> None:
    """A webhook-signature with non-ASCII text is Unauthenticated; hmac.compare_digest alone
    raises TypeError on it."""
    genuine = signing.standard_signature(key, "msg_10", 1_700_000_000, PAYLOAD)
    with pytest.raises(errors.Unauthenticated, match="no valid webhook-signature"):
        signing.verify_standard([key], "msg_10", 1_700_000_000, PAYLOAD, "v1,\u00e9")
    signing.verify_standard([key], "msg_10", 1_700_000_000, PAYLOAD, f"v1,\u00e9 {genuine}")
