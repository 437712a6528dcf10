"""What happens to an event once it is durably recorded.

A handler's failure is the subscriber's problem, not the publisher's: the
delivery stays acknowledged and the event is marked failed for someone to look
at, because a retry would only be absorbed as a duplicate. For the same reason
an event whose handler never finished (a crash, or a stop that outlasted its
grace period) is handled when the subscriber starts again: no redelivery would.
A handler may therefore run twice for an event whose outcome was not recorded.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence

from common import log
from subscriber import inbox

logger = logging.getLogger(__name__)

Handler = Callable[[inbox.Entry], Awaitable[None]]

# Record-and-handle runs that outlive the call that started them (see record_and_run),
# and the handling of events left unhandled by an earlier process (see resume).
_in_flight: set[asyncio.Task[object]] = set()


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


async def record_and_run(handler: Handler, store: inbox.Inbox, entry: inbox.Entry) -> bool:
    """Records ``entry`` and runs ``handler`` if its event is new; True if it was new.

    Every way an event arrives (pushed over gRPC or HTTP, pulled by catch-up)
    goes through here, so that an event arriving several ways has one effect.
    Raises what ``Inbox.record`` raises.

    The work runs in its own task, shielded from the caller: a caller whose
    deadline passes after the record committed must not cancel the handler, or
    the event would stay "received" for good while every redelivery counts as
    a duplicate. ``drain`` waits for such runs on shutdown.
    """
    task = asyncio.create_task(_record_then_run(handler, store, entry))
    _in_flight.add(task)
    task.add_done_callback(_in_flight.discard)
    return await asyncio.shield(task)


async def _record_then_run(handler: Handler, store: inbox.Inbox, entry: inbox.Entry) -> bool:
    is_new = await store.record(entry)
    if is_new:
        await run(handler, store, entry)
    return is_new


def resume(
    handler: Handler, store: inbox.Inbox, event_ids: Sequence[str], stopping: asyncio.Event
) -> None:
    """Handles, one at a time and in order, events recorded earlier but left unhandled.

    ``event_ids`` must be listed before anything can record events, so that none
    of them is being handled by the call that recorded it; a redelivery of one
    only counts as a duplicate. Once ``stopping`` is set no further event is
    started: the rest stay "received" for the next start. ``drain`` waits for
    the one being handled. Processes sharing one database would each take up
    what another is still handling; the reference subscriber is one process.
    """
    if not event_ids:
        return
    task = asyncio.create_task(_resume(handler, store, event_ids, stopping), name="resume")
    _in_flight.add(task)
    task.add_done_callback(_in_flight.discard)


async def _resume(
    handler: Handler, store: inbox.Inbox, event_ids: Sequence[str], stopping: asyncio.Event
) -> None:
    log.event(logger, "resuming_unhandled", events=len(event_ids))
    handled = taken = 0
    try:
        for event_id in event_ids:
            if stopping.is_set():
                break
            taken += 1
            entry = await store.unhandled_entry(event_id)
            if entry is not None:
                await run(handler, store, entry)
                handled += 1
    except Exception as error:
        # The events left stay "received" and are taken up on the next start.
        log.event(logger, "resume_failed", logging.ERROR, error=repr(error))
        return
    log.event(logger, "resumed_unhandled", handled=handled, left=len(event_ids) - taken)


async def drain(grace: float) -> None:
    """Waits up to ``grace`` seconds for records and handlers still running."""
    if _in_flight:
        await asyncio.wait(set(_in_flight), timeout=grace)


async def run(handler: Handler, store: inbox.Inbox, entry: inbox.Entry) -> None:
    """Runs ``handler`` on a recorded event and marks the outcome; raises no Exception."""
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
