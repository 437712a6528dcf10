"""Email to people when deliveries are dead-lettered: composing the messages and sending them.

Composition is pure (records in, ``EmailMessage`` out) so that every word a
person reads is unit-tested. Sending uses smtplib in a worker thread, because
smtplib blocks and the event loop must keep delivering while a slow or silent
mail server makes us wait. When and to whom a digest is due is the notifier's
business, not this module's.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import shlex
import smtplib
import ssl
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Literal, get_args

from common import errors, log
from publisher import model

logger = logging.getLogger("publisher.mailer")

Security = Literal["none", "starttls", "tls"]
SECURITY_MODES: tuple[str, ...] = get_args(Security)

SUBJECT_PREFIX = "[grpc-webhooks]"
# A digest lists this many deliveries and counts the rest; ids beyond it are a query away.
MAX_LISTED = 50
MAX_ERROR_IN_TABLE = 200
# The full text of the latest error, bounded so that a huge response body cannot bloat the mail.
MAX_LAST_ERROR = 2000

# Commands are printed for a reader to adapt: the publisher does not know its public address.
PUBLISHER_ADDRESS = "PUBLISHER_HOST:50051"
SERVICE = "webhooks.v1.PublisherService"

# The longest address SMTP can carry (64 for the local part, @, 255 for the domain).
MAX_ADDRESS_LENGTH = 320
# Either side of the @: nothing that quotes, comments, groups or separates addresses in a
# header, and no whitespace or control character, so that one address is one recipient.
_ADDRESS_PART = r'[^@\s"(),:;<>\[\]\\\x00-\x1f\x7f-\x9f]+'
_ADDRESS = re.compile(rf"{_ADDRESS_PART}@{_ADDRESS_PART}")


class MailError(errors.WebhooksError):
    """An email could not be sent."""


class MailRefused(MailError):
    """The server refused the email for good: sent again, it would be refused again."""


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to send mail. An empty host disables email."""

    host: str = ""
    port: int = 25
    sender: str = "grpc-webhooks@localhost"
    operator_email: str = ""
    # "tls" is implicit TLS from the first byte (SMTP_SSL, usually port 465).
    security: Security = "none"
    username: str = ""
    password: str = ""
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {SECURITY_MODES}, got {self.security!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.password and not self.username:
            raise ValueError("a password needs a username")
        if not self.sender:
            raise ValueError("sender must not be empty")
        # The sender is both MAIL FROM and the From header: a display name or a second
        # address there is refused by some servers, and a CR/LF would end the header.
        problem = address_problem(self.sender)
        if problem:
            raise ValueError(f"sender: {problem}")
        # Blank means none (recipients() strips it); anything else must be one plain address.
        operator = self.operator_email.strip()
        problem = address_problem(operator) if operator else None
        if problem:
            raise ValueError(f"operator_email: {problem}")


def address_problem(address: str) -> str | None:
    """Why ``address`` is not a plain ``local@domain`` address, or None if it is."""
    if len(address) > MAX_ADDRESS_LENGTH:
        return f"longer than {MAX_ADDRESS_LENGTH} characters"
    # smtplib refuses a whole message with one such recipient unless the server offers
    # SMTPUTF8, so the operators, who share the message, would not be told either.
    if not address.isascii():
        return f"{address!r} has a character that is not ASCII, which not every mail server takes"
    if not _ADDRESS.fullmatch(address):
        return (
            f"{address!r} is not a plain email address local@domain"
            " (no quotes, commas, brackets, spaces or control characters)"
        )
    return None


# One vocabulary with the store, which returns these; re-exported for the mailer's callers.
DeadLetter = model.DeadLetter


class Mailer:
    """Sends composed messages through the configured SMTP server."""

    def __init__(self, settings: SmtpSettings) -> None:
        self._settings = settings

    @property
    def settings(self) -> SmtpSettings:
        return self._settings

    @property
    def enabled(self) -> bool:
        """Whether a host is set. Any subscriber may carry a contact address, so with a host a
        recipient is always possible; ``recipients`` tells whether one subscriber has any."""
        return bool(self._settings.host)

    async def send(self, message: EmailMessage) -> None:
        """Sends ``message`` to the addresses in its To header; raises ``MailError``."""
        if not self.enabled:
            raise MailError("email is disabled: no SMTP host is set")
        if not message.get_all("To"):
            raise MailError("the message has no recipients")
        # If the awaiting task is cancelled the thread still ends, within the timeout.
        await asyncio.to_thread(_send_blocking, self._settings, message)


def _send_blocking(settings: SmtpSettings, message: EmailMessage) -> None:
    try:
        client = _connect(settings)
        try:
            if settings.security == "starttls":
                client.starttls(context=ssl.create_default_context())
            if settings.username:
                client.login(settings.username, settings.password)
            refused = client.send_message(message)
        except BaseException:
            # Nothing was sent; a polite QUIT to a server that failed could cost another timeout.
            client.close()
            raise
    except (smtplib.SMTPException, OSError) as error:
        raise _error(error, settings) from error
    _hang_up(client, settings)
    if refused:
        # The others have the message; raising would make a retry send it to them twice.
        log.event(
            logger,
            "mail_recipients_refused",
            logging.WARNING,
            subject=str(message["Subject"]),
            refused={rcpt: f"{code} {_text(answer)}" for rcpt, (code, answer) in refused.items()},
        )


def _connect(settings: SmtpSettings) -> smtplib.SMTP:
    # An explicit name to greet with: without one smtplib asks the resolver for this host's
    # FQDN after connecting, which no timeout bounds.
    greeting = _domain(settings)
    if settings.security == "tls":
        return smtplib.SMTP_SSL(
            settings.host,
            settings.port,
            local_hostname=greeting,
            timeout=settings.timeout,
            context=ssl.create_default_context(),
        )
    return smtplib.SMTP(
        settings.host, settings.port, local_hostname=greeting, timeout=settings.timeout
    )


def _hang_up(client: smtplib.SMTP, settings: SmtpSettings) -> None:
    """Says QUIT after the server took the message, whatever it answers.

    The message is on its way by then: an error here reported as a failed send would have
    it sent again every round.
    """
    try:
        code, answer = client.quit()
        problem = "" if code == 221 else f"the server answered {code} {_text(answer)}"
    except (smtplib.SMTPException, OSError) as error:
        problem = _reason(error, settings)
    finally:
        client.close()
    if problem:
        log.event(logger, "mail_quit_failed", host=settings.host, error=problem)


def _error(error: smtplib.SMTPException | OSError, settings: SmtpSettings) -> MailError:
    """``MailRefused`` when sending the message again is refused again, else ``MailError``.

    Every recipient refused for good (5xx) or the message itself refused (5xx after DATA)
    depends on the message, not on the server's mood. A refused login or sender is the
    operator's to fix, for every message alike, so those stay retried.
    """
    where = f"{settings.host}:{settings.port}"
    text = f"could not send mail via {where}: {_reason(error, settings)}"
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in error.recipients.values()]
        if codes and all(_permanent(code) for code in codes):
            return MailRefused(text)
    if isinstance(error, smtplib.SMTPDataError) and _permanent(error.smtp_code):
        return MailRefused(text)
    return MailError(text)


def _permanent(code: int) -> bool:
    return 500 <= code < 600


def _reason(error: smtplib.SMTPException | OSError, settings: SmtpSettings) -> str:
    """A sentence an operator can act on; smtplib's own messages assume one knows the protocol."""
    if isinstance(error, smtplib.SMTPAuthenticationError):
        return f"the server refused the login as {settings.username!r}: {_answer(error)}"
    if isinstance(error, smtplib.SMTPSenderRefused):
        return f"the server refused the sender {settings.sender!r}: {_answer(error)}"
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(
            f"{rcpt} ({code} {_text(answer)})" for rcpt, (code, answer) in error.recipients.items()
        )
        return f"the server refused every recipient: {refused}"
    if isinstance(error, smtplib.SMTPResponseException):
        return f"the server answered {_answer(error)}"
    if isinstance(error, smtplib.SMTPServerDisconnected):
        # smtplib reports a read timeout as a disconnection; the timeout is the real cause.
        if isinstance(error.__context__, TimeoutError):
            return f"the server did not answer within {settings.timeout:g} s"
        return f"the server closed the connection ({error})"
    if isinstance(error, smtplib.SMTPNotSupportedError):
        return f"the server does not support what was asked ({error})"
    if isinstance(error, TimeoutError):
        return f"no connection within {settings.timeout:g} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the SMTP server running on that port?)"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed ({error.reason or error})"
    return str(error) or type(error).__name__


def _answer(error: smtplib.SMTPResponseException) -> str:
    return f"{error.smtp_code} {_text(error.smtp_error)}"


def _text(answer: bytes | str) -> str:
    return answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer


def recipients(subscriber: model.Subscriber, settings: SmtpSettings) -> list[str]:
    """The subscriber's contact and the operators, each once, empty and non-ASCII ones dropped."""
    chosen: list[str] = []
    seen: set[str] = set()
    for address in (subscriber.spec.contact_email, settings.operator_email):
        address = address.strip()
        # A contact stored before validation refused non-ASCII is left out: a server without
        # SMTPUTF8 would refuse the whole message, and the operators would not hear of it.
        if address and address.isascii() and address.casefold() not in seen:
            seen.add(address.casefold())
            chosen.append(address)
    return chosen


def dead_letter_digest(
    subscriber: model.Subscriber,
    letters: Sequence[DeadLetter],
    *,
    settings: SmtpSettings,
    publisher_name: str,
    total_failed: int,
) -> EmailMessage:
    """One message about ``letters``, listed in the order given, and how to replay them."""
    if not letters:
        raise ValueError("a digest needs at least one dead letter")
    name = subscriber.spec.name
    count = len(letters)
    latest = max(letters, key=lambda letter: letter.failed_at)
    earliest = min(letter.failed_at for letter in letters)
    noun = _deliveries(count)

    lines = [
        f"The publisher {_quoted(publisher_name)} gave up on {count} {noun}"
        f" to the subscriber {_quoted(name)}.",
        "Each one used up its retry schedule and is now dead-lettered (state failed):",
        "nothing more is attempted for it until someone replays it.",
        "",
        *_subscriber_block(subscriber),
        "",
        f"Failed deliveries in this notice: {count}",
        f"Failed deliveries to this subscriber in total: {total_failed}",
        "",
        *_table(letters[:MAX_LISTED]),
    ]
    if count > MAX_LISTED:
        lines.append(f"... and {count - MAX_LISTED} more")
    lines += [
        "",
        f"Last error (delivery {latest.delivery_id}, event {latest.event_id},"
        f" at {_utc(latest.failed_at)}):",
        _indented(latest.last_error, MAX_LAST_ERROR) or "  (none recorded)",
        "",
        "How to replay",
        "",
        "Replay one delivery (with a fresh retry schedule and the subscriber's current endpoint",
        "and secret):",
        "",
        _grpcurl("Redeliver", {"delivery_id": latest.delivery_id}),
        "",
        *_replay_lines(subscriber, earliest),
        "",
        "If the subscriber is paused or disabled, re-enable it first, or nothing is attempted:",
        "",
        _reenable_command(subscriber),
        "",
        *_footer(),
    ]
    subject = f"{SUBJECT_PREFIX} {count} {noun} to {_quoted(name)} failed"
    return _message(subscriber, settings, subject, lines)


def subscriber_disabled_notice(
    subscriber: model.Subscriber,
    *,
    settings: SmtpSettings,
    publisher_name: str,
    failing_since: float,
    reason: str,
) -> EmailMessage:
    """The message sent when the publisher stops delivering to a subscriber altogether."""
    name = subscriber.spec.name
    since = _utc(failing_since)
    lines = [
        f"The publisher {_quoted(publisher_name)} disabled the subscriber {_quoted(name)}:",
        f"its deliveries have been failing since {since}.",
        "No delivery attempts are made to it until it is re-enabled.",
        "",
        *_subscriber_block(subscriber),
        "",
        "Reason:",
        _indented(reason, MAX_LAST_ERROR) or "  (none given)",
        "",
        "How to re-enable",
        "",
        "Once the endpoint works again, set the subscriber's state back to active:",
        "",
        _reenable_command(subscriber),
        "",
        *_replay_lines(subscriber, failing_since),
        "",
        *_footer(),
    ]
    subject = f"{SUBJECT_PREFIX} subscriber {_quoted(name)} disabled after failing since {since}"
    return _message(subscriber, settings, subject, lines)


def _message(
    subscriber: model.Subscriber, settings: SmtpSettings, subject: str, lines: list[str]
) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = settings.sender
    to = recipients(subscriber, settings)
    if to:
        message["To"] = [_address(address) for address in to]
    message["Date"] = email.utils.formatdate(usegmt=True)
    # An explicit domain: the default asks the resolver for this host's FQDN, which can hang.
    message["Message-ID"] = email.utils.make_msgid(domain=_domain(settings))
    message.set_content("\n".join(lines) + "\n")
    return message


def _domain(settings: SmtpSettings) -> str:
    """The sender's domain, the name this host goes by in mail: never asked of the resolver."""
    return settings.sender.rpartition("@")[2] or "localhost"


def _address(address: str) -> Address:
    """``address`` as one mailbox of a To header.

    Built from its parts, never parsed from joined text: a character that is special in a
    header (a comma, a quote) ends up quoted inside this address, so it can neither split
    into two recipients nor swallow the next one. Validation refuses such addresses, but
    one stored before it did is still sent as one.
    """
    local, at, domain = address.rpartition("@")
    return Address(username=local, domain=domain) if at else Address(username=address)


def _subscriber_block(subscriber: model.Subscriber) -> list[str]:
    lines = [
        "Subscriber",
        f"  name:     {subscriber.spec.name}",
        f"  id:       {subscriber.id}",
        f"  endpoint: {subscriber.spec.endpoint}",
        f"  state:    {subscriber.state.value}",
    ]
    if subscriber.state_reason:
        lines.append(f"  reason:   {_truncate(subscriber.state_reason, MAX_ERROR_IN_TABLE)}")
    return lines


def _table(letters: Sequence[DeadLetter]) -> list[str]:
    header = ("delivery id", "event id", "type", "attempts", "failed at (UTC)", "last error")
    rows = [
        (
            letter.delivery_id,
            letter.event_id,
            _truncate(letter.event_type, MAX_ERROR_IN_TABLE),
            str(letter.attempts),
            _utc(letter.failed_at),
            _truncate(letter.last_error, MAX_ERROR_IN_TABLE),
        )
        for letter in letters
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # rstrip: the last column is left ragged rather than padded with trailing spaces.
        return "  ".join(
            cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
        ).rstrip()

    rule = ["-" * width for width in widths[:-1]] + ["-" * len(header[-1])]
    return [line(header), line(rule), *(line(row) for row in rows)]


def _replay_lines(subscriber: model.Subscriber, first_failure: float) -> list[str]:
    # ReplayDeliveries counts `since` from when events were created, and an event can be up to a
    # retry schedule older than its delivery's failure; reaching back further only replays
    # deliveries that failed too.
    since = _utc(first_failure - max(subscriber.spec.retry_schedule, default=0.0))
    return [
        f"Replay every failed delivery to this subscriber of events created since {since}",
        "(the first failure less the retry schedule; pass an earlier time for older ones):",
        "",
        _grpcurl("ReplayDeliveries", {"subscriber_id": subscriber.id, "since": since}),
    ]


def _reenable_command(subscriber: model.Subscriber) -> str:
    body = {
        "subscriber": {"id": subscriber.id, "state": "SUBSCRIBER_STATE_ACTIVE"},
        "update_mask": "state",
    }
    return _grpcurl("UpdateSubscriber", body)


def _grpcurl(method: str, body: Mapping[str, object]) -> str:
    data = shlex.quote(json.dumps(body))
    return f"  grpcurl -plaintext -d {data} {PUBLISHER_ADDRESS} {SERVICE}/{method}"


def _footer() -> list[str]:
    return [
        f"Replace {PUBLISHER_ADDRESS} with the publisher's gRPC address; if it serves TLS,",
        "drop -plaintext. ListDeliveries with state DELIVERY_STATE_FAILED lists every failed one.",
        "",
        "-- ",
        "grpc-webhooks",
    ]


def _deliveries(count: int) -> str:
    return "delivery" if count == 1 else "deliveries"


def _utc(timestamp: float) -> str:
    """RFC 3339 in UTC to the second, as protobuf's JSON form of a Timestamp accepts it."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _quoted(name: str) -> str:
    # Header values must not contain line breaks; a name is shown on one line.
    return f'"{_one_line(name)}"'


def _indented(text: str, limit: int) -> str:
    """``text`` with its line breaks kept, indented, cut to ``limit`` characters."""
    text = text.strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return textwrap.indent(text, "  ")


def _truncate(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with "..." marking the cut."""
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
