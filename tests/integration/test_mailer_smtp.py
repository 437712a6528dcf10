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
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
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
    # The name the client greeted with (EHLO).
    greeting: str

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Inbox:
    """An aiosmtpd handler that keeps every message it accepts, refuses the addresses it is
    told to, and answers the message and QUIT as it is told to."""

    received: list[Received] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    refusal: str = "550 5.1.1 No such mailbox here"
    message_answer: str = "250 Message accepted for delivery"
    quit_answer: str = "221 Bye"
    # Run while the client waits for the answer to its message.
    meanwhile: Callable[[], Awaitable[object]] | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refused:
            return self.refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.meanwhile is not None:
            await self.meanwhile()
        if not self.message_answer.startswith("250"):
            return self.message_answer
        self.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.content,
                authenticated=session.authenticated,
                greeting=session.host_name,
            )
        )
        return self.message_answer

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return self.quit_answer


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
    async with serving() as server:
        yield server


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[SmtpServer]:
    """aiosmtpd on 127.0.0.1, port 0, offering AUTH over plain SMTP (no TLS here) and no
    SMTPUTF8, as many servers do."""
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
    """When the server takes none of the recipients, nobody was told, and that is an error;
    refused for good (5xx), sending it again would not help, and the error says so."""
    smtp_server.inbox.refused = {"team@billing.example.com", "oncall@example.com"}
    settings = smtp_server.settings()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailRefused, match="refused every recipient") as caught:
            await mailer.Mailer(settings).send(_digest(settings))
    assert "oncall@example.com (550 5.1.1 No such mailbox here)" in str(caught.value)
    assert smtp_server.inbox.received == []


@pytest.mark.parametrize(
    "refusal", ["450 4.2.1 Mailbox busy, try later", "421 4.7.0 Too many connections"]
)
async def test_recipients_refused_for_now_are_worth_another_try(
    smtp_server: SmtpServer, refusal: str
) -> None:
    """A refusal for now (4xx) is a MailError, but not one that rules out sending again."""
    smtp_server.inbox.refused = {"team@billing.example.com", "oncall@example.com"}
    smtp_server.inbox.refusal = refusal
    settings = smtp_server.settings()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailError) as caught:
            await mailer.Mailer(settings).send(_digest(settings))
    assert not isinstance(caught.value, mailer.MailRefused)


@pytest.mark.parametrize(
    ("answer", "for_good"),
    [("554 5.7.1 Message rejected as spam", True), ("451 4.3.0 Try again later", False)],
)
async def test_a_refused_message_is_a_mail_error_refused_for_good_only_with_a_5xx(
    smtp_server: SmtpServer, answer: str, for_good: bool
) -> None:
    """The server refusing the message itself after DATA: for good with a 5xx, else for now."""
    smtp_server.inbox.message_answer = answer
    settings = smtp_server.settings()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(mailer.MailError, match=answer.split()[0]) as caught:
            await mailer.Mailer(settings).send(_digest(settings))
    assert isinstance(caught.value, mailer.MailRefused) == for_good


async def test_a_bad_answer_to_quit_after_the_message_was_taken_is_no_error(
    smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Once the server took the message, QUIT answered with anything but 221 is logged, not
    raised: raised, the message would be sent again."""
    smtp_server.inbox.quit_answer = "421 4.3.2 Shutting down"
    settings = smtp_server.settings()
    with caplog.at_level(logging.INFO, logger="publisher.mailer"):
        async with asyncio.timeout(DEADLINE):
            await mailer.Mailer(settings).send(_digest(settings))
    assert len(smtp_server.inbox.received) == 1
    assert [r.getMessage() for r in caplog.records] == ["mail_quit_failed"]


async def test_the_greeting_names_the_sender_domain_without_asking_the_resolver(
    smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EHLO names the sender's domain; smtplib's default asks the resolver for this host's
    name, a lookup that no timeout bounds."""
    asked: list[str] = []

    def getfqdn(name: str = "") -> str:
        asked.append(name)
        return "resolved.example"

    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    settings = smtp_server.settings()
    async with asyncio.timeout(DEADLINE):
        await mailer.Mailer(settings).send(_digest(settings))
    [received] = smtp_server.inbox.received
    assert received.greeting == "publisher.example"
    assert asked == []


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
    """Nothing listening is reported at once, not after the connection timeout: a minute
    here, far past the test's deadline."""
    with socket.socket() as bound:
        # Bound but never listening: the port stays ours and every connection is refused.
        bound.bind(("127.0.0.1", 0))
        settings = mailer.SmtpSettings(
            host="127.0.0.1",
            port=bound.getsockname()[1],
            operator_email="o@example.com",
            timeout=60.0,
        )
        async with asyncio.timeout(DEADLINE):
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
