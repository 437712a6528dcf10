"""Who is told what, once: the notifier's digests and disable notices against a real SMTP
server (aiosmtpd on 127.0.0.1) and a real store.

Each test runs on an SQLite file and on PostgreSQL (the parametrised ``store`` fixture),
except those about replicas: two stores on one PostgreSQL database, as two publishers are.
The notifier's rounds are run by hand, one ``run_once`` per round.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa

from common import db, signing
from common.gen.webhooks.v1 import publisher_pb2
from publisher import mailer, model
from publisher import store as store_module
from publisher.notifier import Notifier
from publisher.schema import subscribers
from publisher.store import Store
from tests.integration.test_mailer_smtp import SmtpServer, serving
from tests.support import OpenPublisher, attempt_record, eventually, lock_awaited
from tests.support import store_subscriber_spec as bare_spec

CONTACT = "team@billing.example.com"
OPERATOR = "oncall@example.com"  # SmtpServer.settings()'s operator_email
OWNER = "replica"
HOUR = 3600.0
FAILED = model.DeliveryState.FAILED
PENDING = model.DeliveryState.PENDING


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpServer]:
    async with serving() as server:
        yield server


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two publishers' stores on one PostgreSQL database."""
    first = Store(db.create_engine(postgres_url))
    second = Store(db.create_engine(postgres_url))
    yield first, second
    await first.close()
    await second.close()


def notifier(
    store: Store, smtp: SmtpServer, *, disable_after: float = 0.0, **mail: str
) -> Notifier:
    return Notifier(
        store,
        mailer.Mailer(smtp.settings(**mail)),
        publisher_name="prod-eu",
        window=HOUR,
        disable_after=disable_after,
    )


async def billing(store: Store, contact: str = CONTACT) -> model.Subscriber:
    spec = dataclasses.replace(bare_spec("billing", "invoice.*"), contact_email=contact)
    return await store.create_subscriber(spec, signing.generate_secret())


async def attempted(store: Store) -> model.Claim:
    """The first attempt of a new event's one delivery."""
    await store.emit([model.NewEvent("invoice.paid", b"{}", "application/json", "")])
    (claim,) = await store.claim(OWNER, 10, 60.0)
    return claim


async def dead_letter(store: Store, contact: str = CONTACT) -> tuple[model.Subscriber, str]:
    """A subscriber with one delivery that ran out of retries, and that delivery's id."""
    subscriber = await billing(store, contact)
    claim = await attempted(store)
    await store.record([attempt_record(claim, outcome="failed", state=FAILED, error="HTTP 503")])
    return subscriber, claim.delivery_id


async def failing_for_a_day(store: Store, subscriber_id: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            subscribers.update()
            .where(subscribers.c.id == subscriber_id)
            .values(failing_since=time.time() - 24 * HOUR)
        )


async def untold(store: Store, subscriber_id: str) -> list[str]:
    letters, _ = await store.dead_letters(subscriber_id, 10)
    return [letter.delivery_id for letter in letters]


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    return [(record.getMessage(), record.levelno) for record in caplog.records]


# -- digests ------------------------------------------------------------------------------------


async def test_a_dead_letter_redelivered_while_its_digest_is_sent_is_told_of_when_it_fails_again(
    store: Store, smtp_server: SmtpServer
) -> None:
    """A Redeliver while the digest is on its way makes the delivery pending and untold; the
    digest's end does not mark it told, so when it dead-letters again it is owed a digest."""
    subscriber, delivery_id = await dead_letter(store)

    async def redeliver() -> None:
        await store.redeliver(delivery_id)

    smtp_server.inbox.meanwhile = redeliver
    await notifier(store, smtp_server).run_once()
    assert len(smtp_server.inbox.received) == 1

    again = (await store.claim(OWNER, 10, 60.0))[0]
    await store.record([attempt_record(again, outcome="failed", state=FAILED)])
    assert await untold(store, subscriber.id) == [delivery_id]


async def test_a_stored_contact_that_is_not_ascii_is_left_out_and_the_operators_told(
    store: Store, smtp_server: SmtpServer
) -> None:
    """A contact stored before validation refused non-ASCII would have the whole digest
    refused by a server without SMTPUTF8: it is left out, and the operators get it."""
    subscriber, delivery_id = await dead_letter(store, contact="josé@billing.example.com")
    await notifier(store, smtp_server).run_once()

    [digest] = smtp_server.inbox.received
    assert digest.rcpt_tos == [OPERATOR]
    assert delivery_id in digest.message().get_content()
    assert await untold(store, subscriber.id) == []


async def test_a_contact_address_that_is_not_ascii_is_an_invalid_argument(
    open_publisher: OpenPublisher,
) -> None:
    """RegisterSubscriber refuses a contact_email with a non-ASCII character, naming it."""
    stub = (await open_publisher()).stub
    request = publisher_pb2.RegisterSubscriberRequest(
        name="billing", endpoint="127.0.0.1:1", contact_email="josé@billing.example.com"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegisterSubscriber(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("contact_email: ")


@pytest.mark.parametrize("refused", ["recipients", "message"])
async def test_a_digest_refused_for_good_is_an_error_and_not_sent_again(
    store: Store, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    """Every recipient or the message refused with a 5xx would be refused every round: it is
    logged as an error, and its dead letters count as told."""
    if refused == "recipients":
        smtp_server.inbox.refused = {CONTACT, OPERATOR}
    else:
        smtp_server.inbox.message_answer = "554 5.7.1 Message rejected as spam"
    subscriber, _ = await dead_letter(store)
    with caplog.at_level(logging.WARNING, logger="publisher.notifier"):
        await notifier(store, smtp_server).run_once()

    assert logged(caplog) == [("email_refused", logging.ERROR)]
    assert await untold(store, subscriber.id) == []


async def test_a_digest_refused_for_now_is_sent_in_a_later_round(
    store: Store, smtp_server: SmtpServer
) -> None:
    """Recipients refused with a 4xx are tried again the next round, within the window."""
    smtp_server.inbox.refused = {CONTACT, OPERATOR}
    smtp_server.inbox.refusal = "450 4.2.1 Mailbox busy, try later"
    subscriber, delivery_id = await dead_letter(store)
    told = notifier(store, smtp_server)
    await told.run_once()
    assert await untold(store, subscriber.id) == [delivery_id]

    smtp_server.inbox.refused = set()
    await told.run_once()
    [digest] = smtp_server.inbox.received
    assert delivery_id in digest.message().get_content()
    assert await untold(store, subscriber.id) == []


async def test_a_digest_the_server_took_is_sent_once_whatever_it_answers_to_quit(
    store: Store, smtp_server: SmtpServer
) -> None:
    """QUIT answered with 421 after the message was taken is not a failed send: the next
    rounds do not send the digest again."""
    smtp_server.inbox.quit_answer = "421 4.3.2 Shutting down"
    subscriber, _ = await dead_letter(store)
    told = notifier(store, smtp_server)
    for _ in range(3):
        await told.run_once()

    assert len(smtp_server.inbox.received) == 1
    assert await untold(store, subscriber.id) == []


# -- disable notices ----------------------------------------------------------------------------


async def test_a_subscriber_disabled_for_410_gone_is_told(
    store: Store, smtp_server: SmtpServer
) -> None:
    """An endpoint answering 410 Gone disables its subscriber, and its people get the notice
    (its deliveries are held, not failed, so no digest would tell them)."""
    subscriber = await billing(store)
    claim = await attempted(store)
    gone = attempt_record(claim, outcome="failed", state=PENDING, error="HTTP 410 Gone")
    await store.record([dataclasses.replace(gone, disable_reason="the endpoint answered 410")])
    await notifier(store, smtp_server).run_once()

    [notice] = smtp_server.inbox.received
    assert notice.rcpt_tos == [CONTACT, OPERATOR]
    assert notice.message()["Subject"].startswith('[grpc-webhooks] subscriber "billing" disabled')
    assert "the endpoint answered 410" in notice.message().get_content()
    assert await store.disable_notices_due() == []
    assert (await store.get_subscriber(subscriber.id)).state == model.SubscriberState.DISABLED


async def test_a_disable_notice_with_nobody_to_tell_is_given_up(
    store: Store, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No contact and no operator address: the notice is dropped with a warning, as a digest
    is, instead of failing every round."""
    subscriber = await billing(store, contact="")
    await failing_for_a_day(store, subscriber.id)
    told = notifier(store, smtp_server, disable_after=HOUR, operator_email="")
    with caplog.at_level(logging.WARNING, logger="publisher.notifier"):
        await told.run_once()
        await told.run_once()

    assert logged(caplog) == [
        ("subscriber_disabled", logging.WARNING),
        ("disable_notice_untold", logging.WARNING),
    ]
    assert await store.disable_notices_due() == []
    assert smtp_server.inbox.received == []


async def test_a_disable_notice_that_fails_is_sent_in_a_later_round(
    store: Store, smtp_server: SmtpServer
) -> None:
    """A notice the server refuses for now is given back and sent the next round."""
    smtp_server.inbox.message_answer = "451 4.3.0 Try again later"
    subscriber = await billing(store)
    await failing_for_a_day(store, subscriber.id)
    told = notifier(store, smtp_server, disable_after=HOUR)
    await told.run_once()
    assert [s.id for s in await store.disable_notices_due()] == [subscriber.id]

    smtp_server.inbox.message_answer = "250 Message accepted for delivery"
    await told.run_once()
    [notice] = smtp_server.inbox.received
    assert "disabled" in notice.message()["Subject"]
    assert await store.disable_notices_due() == []


async def test_a_disable_notice_whose_sender_died_is_sent_by_another_after_the_lease(
    store: Store, database_url: str, smtp_server: SmtpServer
) -> None:
    """A replica that took the notice and died before sending it does not lose it: until the
    lease ends it is the dead replica's, then another replica's round sends it, once."""
    subscriber = await billing(store)
    await failing_for_a_day(store, subscriber.id)
    await store.disable_failing(HOUR)
    assert await store.take_disable_notice(subscriber.id) is not None  # Then it dies.

    await notifier(store, smtp_server).run_once()
    assert smtp_server.inbox.received == []

    lease = store_module.DISABLE_NOTICE_LEASE_SECONDS
    later = Store(db.create_engine(database_url), now=lambda: time.time() + lease + 1)
    try:
        for _ in range(2):
            await notifier(later, smtp_server).run_once()
        assert await later.disable_notices_due() == []
    finally:
        await later.close()
    [notice] = smtp_server.inbox.received
    assert "disabled" in notice.message()["Subject"]


async def test_a_taken_disable_notice_is_not_due_to_a_publisher_from_before_its_lease(
    store: Store,
) -> None:
    """During a rolling upgrade, publishers from before migration 0007 take a notice whose
    ``disable_notice_due`` is true and know nothing of ``disable_notice_taken_at``: a notice
    this release took reads as not due to them, so that they do not send it a second time."""
    subscriber = await billing(store)
    await failing_for_a_day(store, subscriber.id)
    await store.disable_failing(HOUR)
    assert await store.take_disable_notice(subscriber.id) is not None

    async with store.engine.connect() as conn:
        due = await conn.scalar(
            sa.select(subscribers.c.disable_notice_due).where(subscribers.c.id == subscriber.id)
        )
    assert due is False
    assert await store.disable_notices_due() == []


async def test_a_notice_sent_late_does_not_stand_for_a_later_disabling(store: Store) -> None:
    """Re-enabled and disabled again while the first notice was being sent: that send ending
    leaves the second notice due."""
    subscriber = await billing(store)
    await failing_for_a_day(store, subscriber.id)
    await store.disable_failing(HOUR)
    taken_at = await store.take_disable_notice(subscriber.id)
    assert taken_at is not None
    async with store.engine.begin() as conn:
        await conn.execute(
            subscribers.update()
            .where(subscribers.c.id == subscriber.id)
            .values(state=model.SubscriberState.ACTIVE.value)
        )
    await failing_for_a_day(store, subscriber.id)
    assert [s.id for s in await store.disable_failing(HOUR)] == [subscriber.id]

    await store.done_disable_notice(subscriber.id, taken_at)

    assert [s.id for s in await store.disable_notices_due()] == [subscriber.id]


async def test_replicas_whose_rounds_overlap_send_one_disable_notice(
    replicas: tuple[Store, Store], smtp_server: SmtpServer
) -> None:
    """While one replica is sending the notice, another replica's round finds it taken."""
    first, second = replicas
    subscriber = await billing(first)
    await failing_for_a_day(first, subscriber.id)

    async def second_round() -> None:
        smtp_server.inbox.meanwhile = None  # Its own mail, if it sent one, is not held up.
        await notifier(second, smtp_server, disable_after=HOUR).run_once()

    smtp_server.inbox.meanwhile = second_round
    await notifier(first, smtp_server, disable_after=HOUR).run_once()

    assert len(smtp_server.inbox.received) == 1
    assert await second.disable_notices_due() == []


async def test_a_replica_that_finds_the_subscriber_disabled_meanwhile_owes_no_notice(
    replicas: tuple[Store, Store],
) -> None:
    """A replica that selected a subscriber as failing, and finds it disabled by another
    replica once it gets the lock, neither reports it nor owes (again) the notice the other
    replica already sent."""
    first, second = replicas
    subscriber = await billing(first)
    await failing_for_a_day(first, subscriber.id)

    async with first.engine.begin() as conn:
        # The first replica, as it disables the subscriber; its notice is sent by the time
        # this commits.
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(store_module.AUDIENCE_LOCK_KEY)))
        await conn.execute(
            subscribers.update()
            .where(subscribers.c.id == subscriber.id)
            .values(state=model.SubscriberState.DISABLED.value, disable_notice_due=False)
        )
        disabling = asyncio.create_task(second.disable_failing(HOUR))
        await eventually(
            lambda: lock_awaited(second.engine), what="the second replica waits for the first"
        )

    assert await disabling == []
    assert await second.disable_notices_due() == []
