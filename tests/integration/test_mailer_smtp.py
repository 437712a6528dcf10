"""Sending the dead-letter emails to a real SMTP server (aiosmtpd) on 127.0.0.1.

The aiosmtpd protocol is served from the test's own event loop on port 0. That
also proves that sending never blocks the loop: if it did, the server could not
answer and every test here would hit its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from publisher import mailer, model
from tests.unit.test_mailer_compose import T0, billing_subscriber

# A deadline for each test, far above the timeouts used: reaching it means sending hung.
DEADLINE = 10.0
USERNAME = "hooks"
PASSWORD = "s3cret"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    authenticated: bool

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Inbox:
    """An aiosmtpd handler that keeps every message and refuses the addresses it is told to."""

    received: list[Received] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refused:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.content,
                authenticated=session.authenticated,
            )
        )
        return "250 Message accepted for delivery"


def _authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USERNAME.encode()
        and auth_data.password == PASSWORD.encode()
    )
    # handled=False: aiosmtpd answers 535 itself instead of leaving the client waiting.
    return AuthResult(success=ok, handled=False)


@dataclass
class SmtpServer:
    inbox: Inbox
    port: int

    def settings(self, **changes: Any) -> mailer.SmtpSettings:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "sender": "hooks@publisher.example",
            "operator_email": "oncall@example.com",
            "timeout": 5.0,
        }
        return mailer.SmtpSettings(**{**values, **changes})


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1, port 0, offering AUTH over plain SMTP (no TLS here)."""
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            inbox,
            hostname="smtp.test",
            authenticator=_authenticate,
            auth_require_tls=False,
            loop=loop,
        ),
        "127.0.0.1",
        0,
    )
    yield SmtpServer(inbox=inbox, port=server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


def _digest(settings: mailer.SmtpSettings) -> EmailMessage:
    letters = [
        model.DeadLetter(
            delivery_id=f"dlv_{i}",
            event_id=f"evt_{i}",
            event_type="invoice.paid",
            attempts=6,
            last_error="HTTP 503 Service Unavailable — café closed",
            failed_at=T0 + i,
        )
        for i in range(3)
    ]
    return mailer.dead_letter_digest(
        billing_subscriber(),
        letters,
        settings=settings,
        publisher_name="prod-eu",
        total_failed=7,
    )


async def test_digest_arrives_with_its_recipients_and_content(smtp_server: SmtpServer) -> None:
    """The server receives the digest from the sender for both recipients, intact."""
    settings = smtp_server.settings()
    sent = _digest(settings)
    async with asyncio.timeout(DEADLINE):
        await mailer.Mailer(settings).send(sent)

    [received] = smtp_server.inbox.received
    assert received.mail_from == "hooks@publisher.example"
    assert received.rcpt_tos == ["team@billing.example.com", "oncall@example.com"]
    assert not received.authenticated
    message = received.message()
    assert message["Subject"] == '[grpc-webhooks] 3 deliveries to "billing" failed'
    assert message["From"] == "hooks@publisher.example"
    assert message["To"] == "team@billing.example.com, oncall@example.com"
    assert message["Message-ID"] == sent["Message-ID"]
    body = message.get_content()
    assert "Failed deliveries to this subscriber in total: 7" in body
    for i in range(3):
        assert f"dlv_{i}" in body
    assert "café closed" in body
    assert "webhooks.v1.PublisherService/Redeliver" in body


async def test_disabled_notice_arrives(smtp_server: SmtpServer) -> None:
    """The disabled notice is delivered like the digest, with its own subject."""
    settings = smtp_server.settings(operator_email="")
    notice = mailer.subscriber_disabled_notice(
        billing_subscriber(),
        settings=settings,
        publisher_name="prod-eu",
        failing_since=T0,
        reason="HTTP 410 Gone",
    )
    async with asyncio.timeout(DEADLINE):
        await mailer.Mailer(settings).send(notice)

    [received] = smtp_server.inbox.received
    assert received.rcpt_tos == ["team@billing.example.com"]
    assert received.message()["Subject"] == (
        '[grpc-webhooks] subscriber "billing" disabled after failing since 2024-05-01T12:00:00Z'
    )


async def test_login_over_plain_smtp(smtp_server: SmtpServer) -> None:
    """With a username and password the mailer logs in before sending."""
    settings = smtp_server.settings(username=USERNAME, password=PASSWORD)
    async with asyncio.timeout(DEADLINE):
        await mailer.Mailer(settings).send(_digest(settings))
    [received] = smtp_server.inbox.received
    assert received.authenticated


async def test_a_refused_login_raises_mail_error(smtp_server: SmtpServer) -> None:
    """Wrong credentials become a MailError that says the login was refused."""
    settings = smtp_server.settings(username=USERNAME, password="wrong")
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailError, match=r"refused the login as 'hooks': 535"):
            await mailer.Mailer(settings).send(_digest(settings))
    assert smtp_server.inbox.received == []


async def test_every_recipient_refused_raises_mail_error(smtp_server: SmtpServer) -> None:
    """When the server takes none of the recipients, nobody was told, and that is an error."""
    smtp_server.inbox.refused = {"team@billing.example.com", "oncall@example.com"}
    settings = smtp_server.settings()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailError, match="refused every recipient") as caught:
            await mailer.Mailer(settings).send(_digest(settings))
    assert "oncall@example.com (550 5.1.1 No such mailbox here)" in str(caught.value)
    assert smtp_server.inbox.received == []


async def test_one_refused_recipient_does_not_stop_the_others(smtp_server: SmtpServer) -> None:
    """A partly refused message still reaches the accepted recipients, without an error."""
    smtp_server.inbox.refused = {"team@billing.example.com"}
    settings = smtp_server.settings()
    async with asyncio.timeout(DEADLINE):
        await mailer.Mailer(settings).send(_digest(settings))
    [received] = smtp_server.inbox.received
    assert received.rcpt_tos == ["oncall@example.com"]


async def test_starttls_against_a_server_without_it_raises_mail_error(
    smtp_server: SmtpServer,
) -> None:
    """Asked for STARTTLS, the mailer refuses to fall back to plain text."""
    settings = smtp_server.settings(security="starttls")
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailError, match="STARTTLS"):
            await mailer.Mailer(settings).send(_digest(settings))
    assert smtp_server.inbox.received == []


async def test_implicit_tls_against_a_plain_server_raises_mail_error(
    smtp_server: SmtpServer,
) -> None:
    """Asked for implicit TLS, a plain-text server is a TLS failure, not a hang."""
    settings = smtp_server.settings(security="tls")
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailError, match="TLS failed"):
            await mailer.Mailer(settings).send(_digest(settings))
    assert smtp_server.inbox.received == []


async def test_a_closed_port_raises_mail_error_well_within_the_timeout() -> None:
    """Nothing listening is reported at once, not after the connection timeout."""
    with socket.socket() as bound:
        # Bound but never listening: the port stays ours and every connection is refused.
        bound.bind(("127.0.0.1", 0))
        settings = mailer.SmtpSettings(
            host="127.0.0.1", port=bound.getsockname()[1], operator_email="o@example.com"
        )
        async with asyncio.timeout(settings.timeout / 2):
            with pytest.raises(mailer.MailError, match="connection refused"):
                await mailer.Mailer(settings).send(_digest(settings))


async def test_a_silent_server_times_out_while_the_loop_keeps_running() -> None:
    """A server that accepts and never answers costs the timeout, in a thread: the loop runs
    the server's accept and another task before the send gives up."""
    order: list[str] = []
    accepted = asyncio.Event()
    release = asyncio.Event()

    async def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        order.append("server accepted")
        accepted.set()
        await release.wait()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(stay_silent, "127.0.0.1", 0)
    settings = mailer.SmtpSettings(
        host="127.0.0.1",
        port=server.sockets[0].getsockname()[1],
        operator_email="o@example.com",
        timeout=1.0,
    )

    async def send() -> None:
        try:
            await mailer.Mailer(settings).send(_digest(settings))
        finally:
            order.append("send gave up")

    async def witness() -> None:
        await accepted.wait()
        order.append("other task ran")

    try:
        async with asyncio.timeout(DEADLINE):
            sending = asyncio.create_task(send())
            await witness()
            with pytest.raises(mailer.MailError, match="did not answer within 1 s"):
                await sending
    finally:
        release.set()
        server.close()
        await server.wait_closed()
    # A send that blocked the loop would give up before the loop could run anything else.
    assert order == ["server accepted", "other task ran", "send gave up"]
