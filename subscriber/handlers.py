"""What happens to an event once it is durably recorded.

A handler's failure is the subscriber's problem, not the publisher's: the
delivery stays acknowledged and the event is marked failed for someone to look
at, because a retry would only be absorbed as a duplicate.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable

from common import log
from subscriber import inbox

logger = logging.getLogger(__name__)

Handler = Callable[[inbox.Entry], Awaitable[None]]


async def log_event(entry: inbox.Entry) -> None:
    """The reference handler: one JSON line per event."""
    log.event(
        logger,
        "event_handled",
        event_id=entry.event_id,
        event_type=entry.event_type,
        content_type=entry.content_type,
        payload_bytes=len(entry.payload),
        delivery_id=entry.delivery_id,
        attempt=entry.attempt,
    )


async def run(handler: Handler, store: inbox.Inbox, entry: inbox.Entry) -> None:
    """Runs ``handler`` on a newly recorded event and marks the outcome; raises no Exception."""
    try:
        await handler(entry)
    except Exception as error:
        log.event(
            logger,
            "handler_failed",
            logging.ERROR,
            event_id=entry.event_id,
            error=repr(error),
            exc=traceback.format_exc(),
        )
        state = inbox.State.FAILED
    else:
        state = inbox.State.PROCESSED
    try:
        await store.mark(entry.event_id, state)
    except Exception as error:
        # The event is recorded; leaving it "received" is visible through GetStatus.
        log.event(
            logger,
            "mark_failed",
            logging.ERROR,
            event_id=entry.event_id,
            state=state.value,
            error=repr(error),
        )
