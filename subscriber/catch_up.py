"""Catch-up: pulls the events this subscriber missed from the publisher's ListEvents feed.

A push can be lost for good (the publisher gave up, or its next retry is hours
away), so the subscriber also reads its own feed every interval. A pulled event
goes through the same inbox and handler as a pushed one, so an event that
arrives both ways still has one effect. The cursor is stored in the
subscriber's database after each page, once that page's events are recorded:
a restart goes on where the last stored page ended.

During a secret rotation the subscriber holds several secrets, and which one the
publisher accepts depends on how far the rotation went: a token it refuses is
signed again with the next secret, and the one that worked is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from common import errors, grpc_server, log, signing
from common.gen.webhooks.v1 import event_pb2, publisher_pb2, publisher_pb2_grpc
from subscriber import handlers, inbox

logger = logging.getLogger(__name__)

PAGE_SIZE = 100
CALL_TIMEOUT_SECONDS = 30.0

# The publisher cannot answer now; the next round tries again.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# The publisher refuses these settings; rounds keep failing until someone changes them.
_MISCONFIGURED = {
    grpc.StatusCode.UNAUTHENTICATED: "the publisher refused the catch-up token signed with each "
    "--secret: one must be the subscriber's current secret (or its previous one, until that "
    "expires) and --catch-up-issuer the publisher's --name",
    grpc.StatusCode.NOT_FOUND: "the publisher knows no subscriber with this id (check --audience)",
    grpc.StatusCode.INVALID_ARGUMENT: "the publisher refused the request",
    grpc.StatusCode.PERMISSION_DENIED: "the publisher refused this subscriber",
    grpc.StatusCode.UNIMPLEMENTED: "--catch-up-publisher does not serve ListEvents",
}

metadata = sa.MetaData()

# One row per feed. A subscriber id is unique to the publisher that assigned it,
# so the pair names a feed even when the publisher's address changes.
table = sa.Table(
    "catch_up_cursor",
    metadata,
    sa.Column("publisher", sa.String(inbox.MAX_TEXT_LENGTH), primary_key=True),
    sa.Column("subscriber_id", sa.String(inbox.MAX_TEXT_LENGTH), primary_key=True),
    sa.Column("cursor", sa.String(inbox.MAX_TEXT_LENGTH), nullable=False),
)


class CatchUp:
    """Reads ``subscriber_id``'s feed from the publisher at ``target`` every ``interval`` s.

    ``keys`` are the configured secrets in flag order; the first signs the first token.
    """

    def __init__(
        self,
        *,
        target: str,
        issuer: str,
        subscriber_id: str,
        keys: Sequence[bytes],
        interval: float,
        engine: AsyncEngine,
        store: inbox.Inbox,
        handler: handlers.Handler,
        page_size: int = PAGE_SIZE,
        clock: Callable[[], float] = log.now,
    ) -> None:
        self._target = target
        self._issuer = issuer
        self._subscriber_id = subscriber_id
        if not keys:
            raise ValueError("catch-up needs at least one key to sign its token with")
        self._keys = tuple(keys)
        # Which of ``keys`` signs the next token: the last one the publisher accepted.
        self._key_index = 0
        self._interval = interval
        self._engine = engine
        self._store = store
        self._handler = handler
        self._page_size = page_size
        self._clock = clock
        self._save = _upsert(engine.dialect.name)
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # True while a page is being recorded, handled and its cursor stored.
        self._busy = False
        # What the last round failed with, so that one outage is logged once.
        self._problem: str | None = None

    async def start(self) -> None:
        """Creates the cursor table if needed and starts the rounds."""
        async with self._engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
        self._stopping.clear()
        self._channel = grpc.aio.insecure_channel(self._target)
        stub = publisher_pb2_grpc.PublisherServiceStub(self._channel)
        self._task = asyncio.create_task(self._run(stub), name="catch-up")

    async def stop(self) -> None:
        """Ends the rounds; a page being recorded stops after its current event (grace period).

        Cancelling between an event's record and its handler would leave the
        event recorded but never handled, and every later arrival a duplicate.
        """
        self._stopping.set()
        if self._task is not None:
            if not self._busy:
                self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=grpc_server.GRACE_SECONDS)
            if not done:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    async def _round(self, stub: publisher_pb2_grpc.PublisherServiceAsyncStub) -> int:
        """Pulls pages until the cursor stays put; returns how many events were new."""
        cursor = await self._load_cursor()
        new = 0
        while not self._stopping.is_set():
            response = await self._list_events(
                stub,
                publisher_pb2.ListEventsRequest(
                    subscriber_id=self._subscriber_id, cursor=cursor, page_size=self._page_size
                ),
            )
            self._busy = True
            try:
                for event in response.events:
                    if self._stopping.is_set():
                        # The cursor stays before this page; pulling it again is absorbed.
                        return new
                    if await self._accept(event):
                        new += 1
                # An unchanged cursor: nothing newer (or a publisher that would answer the
                # same page for ever). An empty page whose cursor moved went past a long
                # run of others' events: go on from there.
                if response.next_cursor == cursor:
                    return new
                cursor = response.next_cursor
                await self._save_cursor(cursor)
            finally:
                self._busy = False
        return new

    async def _list_events(
        self,
        stub: publisher_pb2_grpc.PublisherServiceAsyncStub,
        request: publisher_pb2.ListEventsRequest,
    ) -> publisher_pb2.ListEventsResponse:
        """One page, signed with the key in use, then with each other key while it is refused.

        Raises the refusal of the key in use when every key is refused, since that is the
        secret the operator expects to be valid.
        """
        refusals: list[grpc.aio.AioRpcError] = []
        for step in range(len(self._keys)):
            index = (self._key_index + step) % len(self._keys)
            try:
                response = await stub.ListEvents(
                    request,
                    metadata=(("authorization", f"Bearer {self._token(self._keys[index])}"),),
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                refusals.append(error)
                continue
            if index != self._key_index:
                self._key_index = index
                # Which secret, by its place among the --secret flags; never the secret itself.
                log.event(
                    logger,
                    "catch_up_secret_changed",
                    publisher=self._target,
                    subscriber_id=self._subscriber_id,
                    secret=index + 1,
                    secrets=len(self._keys),
                )
            return response
        raise refusals[0]

    async def _run(self, stub: publisher_pb2_grpc.PublisherServiceAsyncStub) -> None:
        while not self._stopping.is_set():
            try:
                new = await self._round(stub)
            except grpc.aio.AioRpcError as error:
                self._failed(error)
            except Exception as error:
                self._report(
                    type(error).__name__,
                    "catch_up_failed",
                    logging.ERROR,
                    error=repr(error),
                    exc=traceback.format_exc(),
                )
            else:
                self._succeeded(new)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    async def _accept(self, event: event_pb2.Event) -> bool:
        # Pulled, not delivered: no delivery and no attempt to name.
        entry = inbox.entry_of(event)
        try:
            return await handlers.record_and_run(self._handler, self._store, entry)
        except (inbox.Conflict, errors.InvalidArgument) as error:
            # Storing it cannot succeed on a later round either; stalling the
            # feed behind it would hold back every event after it.
            log.event(
                logger, "catch_up_event_refused", logging.ERROR, event_id=event.id, error=str(error)
            )
            return False

    def _token(self, key: bytes) -> str:
        return signing.sign_catch_up(
            key, subscriber_id=self._subscriber_id, audience=self._issuer, now=self._clock()
        )

    def _failed(self, error: grpc.aio.AioRpcError) -> None:
        code = error.code()
        fields: dict[str, Any] = {"code": code.name, "details": error.details()}
        if code in _TRANSIENT:
            self._report(code.name, "catch_up_unavailable", logging.WARNING, **fields)
        elif code in _MISCONFIGURED:
            self._report(
                code.name,
                "catch_up_misconfigured",
                logging.ERROR,
                reason=_MISCONFIGURED[code],
                **fields,
            )
        else:
            self._report(code.name, "catch_up_failed", logging.ERROR, **fields)

    def _report(self, problem: str, name: str, level: int, **fields: Any) -> None:
        """Logs a failed round unless the previous round failed the same way."""
        if problem == self._problem:
            return
        self._problem = problem
        log.event(
            logger,
            name,
            level,
            publisher=self._target,
            subscriber_id=self._subscriber_id,
            retry_in=self._interval,
            **fields,
        )

    def _succeeded(self, new: int) -> None:
        if self._problem is not None:
            log.event(
                logger,
                "catch_up_resumed",
                publisher=self._target,
                subscriber_id=self._subscriber_id,
                after=self._problem,
            )
            self._problem = None
        if new:
            log.event(
                logger,
                "caught_up",
                publisher=self._target,
                subscriber_id=self._subscriber_id,
                events=new,
            )

    async def _load_cursor(self) -> str:
        query = sa.select(table.c.cursor).where(
            table.c.publisher == self._issuer, table.c.subscriber_id == self._subscriber_id
        )
        async with self._engine.connect() as connection:
            cursor = (await connection.execute(query)).scalar_one_or_none()
        return cursor or ""

    async def _save_cursor(self, cursor: str) -> None:
        row = {"publisher": self._issuer, "subscriber_id": self._subscriber_id, "cursor": cursor}
        async with self._engine.begin() as connection:
            await connection.execute(self._save, row)


def _upsert(dialect: str) -> sa.Executable:
    """INSERT ... ON CONFLICT (publisher, subscriber_id) DO UPDATE SET cursor, per dialect."""
    keys = [table.c.publisher, table.c.subscriber_id]
    if dialect == "postgresql":
        pg_insert = postgresql.insert(table)
        return pg_insert.on_conflict_do_update(
            index_elements=keys, set_={"cursor": pg_insert.excluded.cursor}
        )
    if dialect == "sqlite":
        lite_insert = sqlite.insert(table)
        return lite_insert.on_conflict_do_update(
            index_elements=keys, set_={"cursor": lite_insert.excluded.cursor}
        )
    raise errors.InvalidArgument("database_url", f"unsupported database {dialect!r}")
