"""The catch-up feed reads a bounded stretch of seq values per transaction (on an SQLite
file and on PostgreSQL), and goes on to the next stretch while it found nothing: a page is
empty only when nothing newer is there for the subscriber, and its cursor then stands at the
newest event."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from common import signing
from publisher import model
from publisher import store as store_module
from publisher.schema import events
from publisher.store import Store
from tests.support import store_subscriber_spec

STRETCH = 10


@pytest.fixture(autouse=True)
def small_stretch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "FEED_STRETCH", STRETCH)


async def emit(store: Store, event_type: str, count: int = 1) -> list[str]:
    """Emits ``count`` events of ``event_type`` one transaction each; their ids."""
    ids = []
    for _ in range(count):
        (result,) = await store.emit([model.NewEvent(event_type, b"{}", "application/json", "")])
        ids.append(result.event_id)
    return ids


async def walk(store: Store, subscriber_id: str, limit: int) -> tuple[list[list[str]], list[int]]:
    """Every page from the beginning to the first empty one: the ids of each page's events,
    and the cursors returned."""
    pages: list[list[str]] = []
    cursors: list[int] = []
    cursor = 0
    for _ in range(1000):
        found, cursor = await store.events_for(subscriber_id, cursor, limit)
        pages.append([event.id for event in found])
        cursors.append(cursor)
        if not found:
            return pages, cursors
    raise AssertionError("the feed never came to an empty page")


async def newest_seq(store: Store) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.max(events.c.seq)))).scalar_one())


async def test_few_events_among_many_for_others_arrive_once_in_order_with_no_empty_page(
    store: Store,
) -> None:
    """A subscriber whose events are more than a stretch apart, among many for another, gets
    each of its events once and in order, and no page comes back empty before the end (a
    client that stops at an empty page, as the feed's first clients did, gets them all); the
    busy subscriber still gets all of its events, pages full up to the limit."""
    rare = await store.create_subscriber(
        store_subscriber_spec("rare", "r.*"), signing.generate_secret()
    )
    busy = await store.create_subscriber(
        store_subscriber_spec("busy", "a.*"), signing.generate_secret()
    )
    wanted: list[str] = []
    others: list[str] = []
    for gap in (0, 3 * STRETCH, STRETCH + 1, 2):
        others += await emit(store, "a.x", gap)
        wanted += await emit(store, "r.x")
    others += await emit(store, "a.x", 2 * STRETCH)

    pages, cursors = await walk(store, rare.id, limit=2)
    assert [event_id for page in pages for event_id in page] == wanted
    assert cursors == sorted(set(cursors))
    assert all(pages[:-1]), "an empty page before the end"
    assert cursors[-1] == await newest_seq(store)

    pages, _ = await walk(store, busy.id, limit=7)
    assert [event_id for page in pages for event_id in page] == others
    assert max(len(page) for page in pages) == 7


async def test_a_call_that_finds_nothing_in_its_stretches_answers_an_empty_page_further_on(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call goes through FEED_STRETCHES_PER_CALL stretches of others' events at most: then
    it answers an empty page whose cursor moved past them, short of the newest event, and a
    client that goes on while the cursor moves gets the event beyond."""
    monkeypatch.setattr(store_module, "FEED_STRETCHES_PER_CALL", 2)
    rare = await store.create_subscriber(
        store_subscriber_spec("rare", "r.*"), signing.generate_secret()
    )
    await store.create_subscriber(store_subscriber_spec("busy", "a.*"), signing.generate_secret())
    await emit(store, "a.x", 5 * STRETCH)
    wanted = await emit(store, "r.x")

    found, cursor = await store.events_for(rare.id, 0, 10)
    assert (found, cursor) == ([], 2 * STRETCH)

    listed: list[str] = []
    for _ in range(10):
        found, after = await store.events_for(rare.id, cursor, 10)
        listed += [event.id for event in found]
        if after == cursor:
            break
        cursor = after
    assert listed == wanted
    assert cursor == await newest_seq(store)


async def test_a_caught_up_subscriber_keeps_its_cursor_at_the_newest_event(store: Store) -> None:
    """Past its own last event, a subscriber's cursor goes on over the others' newer events
    to the newest one and no further, and stays there while nothing newer comes."""
    mine = await store.create_subscriber(
        store_subscriber_spec("mine", "m.*"), signing.generate_secret()
    )
    await store.create_subscriber(store_subscriber_spec("other", "o.*"), signing.generate_secret())
    (last_of_mine,) = await emit(store, "m.x")
    await emit(store, "o.x", 3)

    newest = await newest_seq(store)

    pages, cursors = await walk(store, mine.id, limit=10)
    assert pages == [[last_of_mine], []]
    assert cursors == [newest, newest]
    found, cursor = await store.events_for(mine.id, newest, 10)
    assert (found, cursor) == ([], newest)

    (later,) = await emit(store, "m.x")
    found, cursor = await store.events_for(mine.id, newest, 10)
    assert [event.id for event in found] == [later]
    assert cursor > newest
