"""What the dead-letter emails say and to whom: composition only, no SMTP."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import json
import shlex
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any

import pytest

from common import errors
from publisher import mailer, model

# 2024-05-01T12:00:00Z
T0 = 1_714_564_800.0
SETTINGS = mailer.SmtpSettings(
    host="smtp.example.com", sender="hooks@example.com", operator_email="oncall@example.com"
)


def billing_subscriber(
    contact_email: str = "team@billing.example.com",
    state: model.SubscriberState = model.SubscriberState.ACTIVE,
    state_reason: str = "",
) -> model.Subscriber:
    spec = model.SubscriberSpec(
        name="billing",
        endpoint="https://billing.example.com/hooks",
        protocol=model.Protocol.HTTP,
        event_types=("invoice.*",),
        retry_schedule=(300.0, 3600.0),
        contact_email=contact_email,
        body_format=model.BodyFormat.RAW,
        status_url="",
    )
    return model.Subscriber(
        id="sub_7f3a",
        spec=spec,
        secret="whsec_unused",
        state=state,
        state_reason=state_reason,
        created_at=T0,
        updated_at=T0,
    )


def _letters(count: int, error: str = "HTTP 503 Service Unavailable") -> list[model.DeadLetter]:
    return [
        model.DeadLetter(
            delivery_id=f"dlv_{i:03d}",
            event_id=f"evt_{i:03d}",
            event_type="invoice.paid",
            attempts=6,
            last_error=error,
            failed_at=T0 + 60 * i,
        )
        for i in range(count)
    ]


def _digest(
    letters: Sequence[model.DeadLetter],
    subscriber: model.Subscriber | None = None,
    total_failed: int = 340,
) -> EmailMessage:
    return mailer.dead_letter_digest(
        subscriber or billing_subscriber(),
        letters,
        settings=SETTINGS,
        publisher_name="prod-eu",
        total_failed=total_failed,
    )


def _body(message: EmailMessage) -> str:
    """The text as a mail client shows it, after a round trip through bytes."""
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    content = parsed.get_content()
    assert isinstance(content, str)
    return content


def _grpcurl_payload(body: str, method: str) -> object:
    """The JSON that the body's grpcurl command for ``method`` sends, parsed as a shell would."""
    [command] = [line for line in body.splitlines() if line.endswith(f"PublisherService/{method}")]
    words = shlex.split(command)
    assert words[:3] == ["grpcurl", "-plaintext", "-d"]
    assert words[4:] == ["PUBLISHER_HOST:50051", f"webhooks.v1.PublisherService/{method}"]
    return json.loads(words[3])


def test_recipients_are_the_contact_and_the_operators() -> None:
    """Both the subscriber's contact and the operator address are told, contact first."""
    assert mailer.recipients(billing_subscriber(), SETTINGS) == [
        "team@billing.example.com",
        "oncall@example.com",
    ]


def test_recipients_are_deduplicated_ignoring_case() -> None:
    """A contact that is also the operator address receives one copy."""
    subscriber = billing_subscriber(contact_email="OnCall@Example.com")
    assert mailer.recipients(subscriber, SETTINGS) == ["OnCall@Example.com"]


@pytest.mark.parametrize(
    ("contact", "operator", "expected"),
    [
        ("", "oncall@example.com", ["oncall@example.com"]),
        ("team@billing.example.com", "", ["team@billing.example.com"]),
        ("", "  ", []),
    ],
)
def test_recipients_drop_empty_addresses(contact: str, operator: str, expected: list[str]) -> None:
    """An address that is not set (or only blank) is left out rather than sent to."""
    settings = dataclasses.replace(SETTINGS, operator_email=operator)
    assert mailer.recipients(billing_subscriber(contact_email=contact), settings) == expected


def test_recipients_leave_out_a_stored_contact_that_is_not_ascii() -> None:
    """A contact stored before validation refused non-ASCII would have a server without
    SMTPUTF8 refuse the whole message, the operators' copy with it: it is left out."""
    subscriber = billing_subscriber(contact_email="josé@billing.example.com")
    assert mailer.recipients(subscriber, SETTINGS) == ["oncall@example.com"]


@pytest.mark.parametrize("address", ["josé@billing.example.com", "team@bücher.example"])
def test_an_address_that_is_not_ascii_is_a_problem(address: str) -> None:
    """Only ASCII addresses are taken: not every server speaks SMTPUTF8."""
    assert "not ASCII" in (mailer.address_problem(address) or "")


def test_a_plain_ascii_address_is_no_problem() -> None:
    assert mailer.address_problem("o.p+s-1_x@mail.example.co.uk") is None


def test_mailer_is_enabled_only_with_a_host() -> None:
    """An empty host switches email off; a host with any possible recipient switches it on."""
    assert mailer.Mailer(SETTINGS).enabled
    assert not mailer.Mailer(dataclasses.replace(SETTINGS, host="")).enabled


async def test_send_without_a_host_raises_mail_error() -> None:
    """A disabled mailer refuses to send instead of failing somewhere in smtplib."""
    disabled = mailer.Mailer(dataclasses.replace(SETTINGS, host=""))
    with pytest.raises(mailer.MailError, match="disabled"):
        await disabled.send(_digest(_letters(1)))


async def test_send_without_recipients_raises_mail_error() -> None:
    """A message with nobody to tell is an error, not a silent success."""
    settings = dataclasses.replace(SETTINGS, operator_email="")
    message = mailer.dead_letter_digest(
        billing_subscriber(contact_email=""),
        _letters(1),
        settings=settings,
        publisher_name="prod-eu",
        total_failed=1,
    )
    assert message["To"] is None
    with pytest.raises(mailer.MailError, match="no recipients"):
        await mailer.Mailer(settings).send(message)


def test_mail_error_is_a_webhooks_error() -> None:
    """Callers that handle the project's errors handle mail failures too, refusals included."""
    assert issubclass(mailer.MailError, errors.WebhooksError)
    assert issubclass(mailer.MailRefused, mailer.MailError)


@pytest.mark.parametrize(
    "changes",
    [
        {"security": "ssl"},
        {"port": 0},
        {"timeout": 0.0},
        {"username": "", "password": "secret"},
        {"sender": ""},
        {"sender": "Webhooks <hooks@example.com>"},
        {"sender": "hooks@example.com\r\nBcc: everyone@example.com"},
        {"sender": "hooks"},
        {"operator_email": "a@example.com, b@example.com"},
        {"operator_email": "Ops <ops@example.com>"},
        {"operator_email": 'ops"@example.com'},
        {"operator_email": "josé@example.com"},
    ],
)
def test_smtp_settings_reject_nonsense(changes: dict[str, Any]) -> None:
    """Settings that could never send mail fail when built, not at the first dead letter."""
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        dataclasses.replace(SETTINGS, **changes)


def test_digest_headers() -> None:
    """From is the sender, To the recipients, and Date and Message-ID are set."""
    message = _digest(_letters(3))
    assert message["From"] == "hooks@example.com"
    assert message["To"] == "team@billing.example.com, oncall@example.com"
    assert email.utils.parsedate_to_datetime(str(message["Date"])) is not None
    assert str(message["Message-ID"]).endswith("@example.com>")
    assert message.get_content_type() == "text/plain"


def _rcpt_to(message: EmailMessage) -> list[str]:
    """The envelope recipients smtplib's send_message takes from the To header."""
    return [address for _, address in email.utils.getaddresses(message.get_all("To", []))]


@pytest.mark.parametrize(
    ("contact", "one_recipient"),
    [
        ('a"b@example.com', '"a\\"b"@example.com'),
        ("victim,x@example.com", '"victim,x"@example.com'),
        ("x@example.com, y@example.com", '"x@example.com, y"@example.com'),
    ],
)
def test_each_recipient_stays_one_address_whatever_its_characters(
    contact: str, one_recipient: str
) -> None:
    """A contact stored before validation refused quotes and commas can neither swallow the
    operators' address nor split into a bare local recipient: it is quoted as one address."""
    message = _digest(_letters(1), billing_subscriber(contact_email=contact))
    assert _rcpt_to(message) == [one_recipient, "oncall@example.com"]
    reparsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert len(reparsed["To"].addresses) == 2


def test_digest_subject_counts_deliveries_and_names_the_subscriber() -> None:
    """The subject says how many deliveries to which subscriber failed."""
    assert _digest(_letters(12))["Subject"] == '[grpc-webhooks] 12 deliveries to "billing" failed'
    assert _digest(_letters(1))["Subject"] == '[grpc-webhooks] 1 delivery to "billing" failed'


def test_digest_subject_stays_on_one_line_whatever_the_name() -> None:
    """A name with line breaks cannot break the header (or inject another one)."""
    spec = dataclasses.replace(billing_subscriber().spec, name="bill\r\nBcc: x@evil.example")
    subscriber = dataclasses.replace(billing_subscriber(), spec=spec)
    message = _digest(_letters(2), subscriber=subscriber)
    assert message["Subject"] == '[grpc-webhooks] 2 deliveries to "bill Bcc: x@evil.example" failed'
    assert message["Bcc"] is None


def test_digest_body_identifies_the_subscriber_and_counts() -> None:
    """The body names the subscriber (name, id, endpoint) and gives both counts."""
    body = _body(_digest(_letters(12), total_failed=340))
    assert "name:     billing" in body
    assert "id:       sub_7f3a" in body
    assert "endpoint: https://billing.example.com/hooks" in body
    assert "Failed deliveries in this notice: 12" in body
    assert "Failed deliveries to this subscriber in total: 340" in body
    assert '"prod-eu"' in body


def test_digest_table_lists_each_delivery() -> None:
    """Each row carries delivery id, event id, type, attempts, UTC time and error."""
    body = _body(_digest(_letters(3)))
    rows = [line.split(maxsplit=5) for line in body.splitlines() if line.startswith("dlv_")]
    assert rows == [
        [
            f"dlv_00{i}",
            f"evt_00{i}",
            "invoice.paid",
            "6",
            f"2024-05-01T12:0{i}:00Z",
            "HTTP 503 Service Unavailable",
        ]
        for i in range(3)
    ]
    assert "... and" not in body


def test_digest_lists_fifty_and_counts_the_rest() -> None:
    """Beyond 50 deliveries the table stops and says how many more there are."""
    body = _body(_digest(_letters(53)))
    listed = [line for line in body.splitlines() if line.startswith("dlv_")]
    assert len(listed) == 50
    assert listed[-1].startswith("dlv_049 ")
    assert "... and 3 more" in body
    assert "dlv_050 " not in body


def test_digest_of_exactly_fifty_has_no_remainder_line() -> None:
    """Fifty deliveries fit the table entirely."""
    body = _body(_digest(_letters(50)))
    assert len([line for line in body.splitlines() if line.startswith("dlv_")]) == 50
    assert "... and" not in body


def test_digest_truncates_long_errors_in_the_table() -> None:
    """An error over 200 characters is cut to 200, ends with "...", and stays on one line."""
    long_error = "upstream said:\n" + "x" * 500
    letters = _letters(2)
    letters[0] = dataclasses.replace(letters[0], last_error=long_error)
    body = _body(_digest(letters))
    [row] = [line for line in body.splitlines() if line.startswith("dlv_000")]
    shown = row[row.index("upstream said:") :]
    assert len(shown) == 200
    assert shown == ("upstream said: " + "x" * 500)[:197] + "..."
    assert "x" * 200 not in body


def test_digest_shows_the_latest_error_in_full() -> None:
    """The most recent failure's error appears with its line breaks, beyond the table's cut."""
    letters = _letters(3)
    latest_error = "HTTP 500\n" + "y" * 300
    letters[1] = dataclasses.replace(letters[1], last_error=latest_error, failed_at=T0 + 3600)
    body = _body(_digest(letters))
    assert "Last error (delivery dlv_001, event evt_001, at 2024-05-01T13:00:00Z):" in body
    assert "  HTTP 500\n  " + "y" * 300 + "\n" in body


def test_digest_tells_how_to_redeliver_one_delivery() -> None:
    """A ready grpcurl Redeliver command names a delivery from the digest."""
    body = _body(_digest(_letters(3)))
    assert _grpcurl_payload(body, "Redeliver") == {"delivery_id": "dlv_002"}
    assert (
        """grpcurl -plaintext -d '{"delivery_id": "dlv_002"}' PUBLISHER_HOST:50051 """
        "webhooks.v1.PublisherService/Redeliver"
    ) in body


def test_digest_tells_how_to_replay_everything_since_the_first_failure() -> None:
    """ReplayDeliveries reaches back from the earliest failure listed by the retry schedule,
    because its `since` is when events were created, which precedes their failure."""
    letters = list(reversed(_letters(3)))
    body = _body(_digest(letters))
    assert _grpcurl_payload(body, "ReplayDeliveries") == {
        "subscriber_id": "sub_7f3a",
        "since": "2024-05-01T11:00:00Z",
    }


def test_digest_tells_how_to_reenable_the_subscriber() -> None:
    """UpdateSubscriber with update_mask state and SUBSCRIBER_STATE_ACTIVE is spelled out."""
    body = _body(_digest(_letters(1)))
    assert _grpcurl_payload(body, "UpdateSubscriber") == {
        "subscriber": {"id": "sub_7f3a", "state": "SUBSCRIBER_STATE_ACTIVE"},
        "update_mask": "state",
    }


def test_digest_shows_why_a_subscriber_is_not_active() -> None:
    """A disabled subscriber's state and reason are part of the digest."""
    subscriber = billing_subscriber(
        state=model.SubscriberState.DISABLED, state_reason="HTTP 410 Gone"
    )
    body = _body(_digest(_letters(1), subscriber=subscriber))
    assert "state:    disabled" in body
    assert "reason:   HTTP 410 Gone" in body


def test_digest_of_nothing_is_refused() -> None:
    """An empty digest is a caller's mistake, not an email."""
    with pytest.raises(ValueError, match="at least one"):
        _digest([])


def _notice(reason: str = "HTTP 410 Gone") -> EmailMessage:
    return mailer.subscriber_disabled_notice(
        billing_subscriber(state=model.SubscriberState.DISABLED, state_reason=reason),
        settings=SETTINGS,
        publisher_name="prod-eu",
        failing_since=T0 + 0.9,
        reason=reason,
    )


def test_disabled_notice_subject_names_the_subscriber_and_the_date() -> None:
    """The subject says which subscriber was disabled and since when it failed."""
    assert _notice()["Subject"] == (
        '[grpc-webhooks] subscriber "billing" disabled after failing since 2024-05-01T12:00:00Z'
    )


def test_disabled_notice_headers() -> None:
    """The notice goes from the sender to the contact and the operators."""
    message = _notice()
    assert message["From"] == "hooks@example.com"
    assert message["To"] == "team@billing.example.com, oncall@example.com"
    assert message["Date"] is not None
    assert message["Message-ID"] is not None


def test_disabled_notice_gives_the_reason_and_how_to_reenable() -> None:
    """The body carries the subscriber, the reason, and the UpdateSubscriber command."""
    body = _body(_notice(reason="endpoint answered 410 Gone\nfor every event"))
    assert "id:       sub_7f3a" in body
    assert "endpoint: https://billing.example.com/hooks" in body
    assert "Reason:\n  endpoint answered 410 Gone\n  for every event\n" in body
    assert _grpcurl_payload(body, "UpdateSubscriber") == {
        "subscriber": {"id": "sub_7f3a", "state": "SUBSCRIBER_STATE_ACTIVE"},
        "update_mask": "state",
    }
    assert _grpcurl_payload(body, "ReplayDeliveries") == {
        "subscriber_id": "sub_7f3a",
        "since": "2024-05-01T11:00:00Z",
    }
