"""What an emit stores: each event and delivery of a batch with its own values, however the
store splits the batch into statements (on SQLite and PostgreSQL)."""

from __future__ import annotations

import collections

from common import signing
from publisher import model, statements
from publisher.slots import Grant
from publisher.store import Store
from tests.support import store_subscriber_spec


async def test_a_batch_larger_than_one_insert_statement_is_stored_row_for_row(
    store: Store,
) -> None:
    """On SQLite an emit writes ROWS_PER_INSERT rows per statement: 250 events to two
    subscribers span full statements and a short last one, and each event and delivery
    holds its own values."""
    assert 250 % statements.ROWS_PER_INSERT != 0
    for name in ("a", "b"):
        await store.create_subscriber(
            store_subscriber_spec(name, "order.*"), signing.generate_secret()
        )
    batch = [
        model.NewEvent(f"order.n{n}", f'{{"n": {n}}}'.encode(), "application/json", f"key-{n}")
        for n in range(250)
    ]

    results = await store.emit(batch)

    assert [result.delivery_count for result in results] == [2] * 250
    for new, result in zip(batch, results, strict=True):
        stored = await store.get_event(result.event_id)
        assert (stored.type, stored.payload) == (new.type, new.payload)
    claims, _, _ = await store.claim_round("replica", Grant(1000), 60.0)
    by_event = collections.Counter(claim.event.id for claim in claims)
    assert by_event == {result.event_id: 2 for result in results}
    again = await store.emit(batch[:3])
    assert [result.duplicate for result in again] == [True] * 3
