"""A person at the end: dead-letter digests and automatic disabling, by email.

Each round (run by publisher.periodic) first disables subscribers that have
done nothing but fail for the configured period, then tells people: a notice
for each newly disabled subscriber, and a digest per subscriber of the
deliveries that ran out of retries, at most one per subscriber per window so
that a busy partner's outage sends a digest, not thousands of mails. What is
owed is kept in the database, so an email that cannot be sent now (the SMTP
server is down) is sent in a later round, and never holds up deliveries.
"""

from __future__ import annotations

import logging
from email.message import EmailMessage

from common import log
from publisher import mailer
from publisher.store import Store

logger = logging.getLogger("publisher.notifier")

# Dead letters marked as told per digest; the email lists the first mailer.MAX_LISTED.
DIGEST_LIMIT = 1000


class Notifier:
    def __init__(
        self,
        store: Store,
        mail: mailer.Mailer,
        *,
        publisher_name: str,
        window: float,
        disable_after: float,
    ) -> None:
        self._store = store
        self._mail = mail
        self._publisher_name = publisher_name
        self._window = window
        self._disable_after = disable_after

    async def run_once(self) -> None:
        if self._disable_after > 0:
            for subscriber in await self._store.disable_failing(self._disable_after):
                log.event(
                    logger,
                    "subscriber_disabled",
                    logging.WARNING,
                    subscriber_id=subscriber.id,
                    reason=subscriber.state_reason,
                )
        if not self._mail.enabled:
            return
        await self._send_disable_notices()
        await self._send_digests()

    async def _send_disable_notices(self) -> None:
        for subscriber in await self._store.disable_notices_due():
            taken_at = await self._store.take_disable_notice(subscriber.id)
            if taken_at is None:
                continue  # Another replica is telling them.
            if not mailer.recipients(subscriber, self._mail.settings):
                # No contact and no operator address: nobody to tell, so do not try forever.
                log.event(
                    logger, "disable_notice_untold", logging.WARNING, subscriber_id=subscriber.id
                )
                await self._store.done_disable_notice(subscriber.id, taken_at)
                continue
            message = mailer.subscriber_disabled_notice(
                subscriber,
                settings=self._mail.settings,
                publisher_name=self._publisher_name,
                failing_since=subscriber.failing_since or subscriber.updated_at,
                reason=subscriber.state_reason,
            )
            if await self._send(message, subscriber.id, "disable_notice"):
                await self._store.done_disable_notice(subscriber.id, taken_at)
            else:
                await self._store.give_back_disable_notice(subscriber.id, taken_at)

    async def _send_digests(self) -> None:
        for subscriber in await self._store.subscribers_with_dead_letters(self._window):
            if not await self._store.take_notice_turn(subscriber.id, self._window):
                continue  # Another replica is telling them.
            letters, total = await self._store.dead_letters(subscriber.id, DIGEST_LIMIT)
            if not letters:
                continue
            if not mailer.recipients(subscriber, self._mail.settings):
                # No contact and no operator address: nobody to tell, so do not try forever.
                log.event(
                    logger, "dead_letters_untold", logging.WARNING, subscriber_id=subscriber.id
                )
                await self._store.mark_notified([letter.delivery_id for letter in letters])
                continue
            message = mailer.dead_letter_digest(
                subscriber,
                letters,
                settings=self._mail.settings,
                publisher_name=self._publisher_name,
                total_failed=total,
            )
            if await self._send(message, subscriber.id, "dead_letter_digest"):
                await self._store.mark_notified([letter.delivery_id for letter in letters])
            else:
                await self._store.give_back_notice_turn(subscriber.id)

    async def _send(self, message: EmailMessage, subscriber_id: str, kind: str) -> bool:
        """Whether ``message`` is done with: sent, or refused for good. False: try again later.

        A message refused for good (every recipient or its content refused with a 5xx) would
        be refused again every round, for ever; it is logged as an error for the operators
        instead, and what it was about counts as told.
        """
        try:
            await self._mail.send(message)
        except mailer.MailRefused as error:
            log.event(
                logger,
                "email_refused",
                logging.ERROR,
                kind=kind,
                subscriber_id=subscriber_id,
                to=message["To"],
                error=str(error),
            )
            return True
        except mailer.MailError as error:
            log.event(
                logger,
                "email_failed",
                logging.WARNING,
                kind=kind,
                subscriber_id=subscriber_id,
                error=str(error),
            )
            return False
        log.event(logger, "email_sent", kind=kind, subscriber_id=subscriber_id, to=message["To"])
        return True
