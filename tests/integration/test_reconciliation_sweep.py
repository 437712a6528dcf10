"""What the reconciliation sweep holds, and how it gives it back (SQLite and PostgreSQL).

The sweep leases deliveries whose last attempt was uncertain, only to ask the subscriber
about them: it is no attempt. So it must neither let an attempt that was fenced off pass
its fence again, nor bring a delivery's scheduled retry forward when it stops, fails or
dies. And a redelivered dead letter that fails again is emailed about again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from common import signing
from publisher import model
from publisher import transport as tx
from publisher.dispatcher import Dispatcher
from publisher.periodic import Periodic
from publisher.store import Store, sweeper_of
from tests.support import attempt_record, store_subscriber_spec

PENDING = model.DeliveryState.PENDING
FAILED = model.DeliveryState.FAILED
OWNER = "replica"
HOUR = 3600.0


class Asked:
    """A transport whose status questions run ``meanwhile`` and then go unanswered."""

    def __init__(self, meanwhile: Callable[[], Awaitable[object]] | None = None) -> None:
        self.asked = asyncio.Event()
        self._meanwhile = meanwhile

    async def send(self, attempt: tx.Attempt) -> tx.Result:
        return tx.Result(tx.Outcome.FAILED, error="not under test")

    async def status(self, attempt: tx.Attempt) -> tx.Receipt:
        self.asked.set()
        if self._meanwhile is not None:
            await self._meanwhile()
        return tx.Receipt.UNANSWERED

    async def close(self) -> None:
        return None


def dispatcher(store: Store, transport: Asked) -> Dispatcher:
    return Dispatcher(
        store,
        {model.Protocol.GRPC: transport, model.Protocol.HTTP: transport},
        owner=OWNER,
        issuer="test",
        delivery_timeout=15.0,
        max_in_flight=8,
        max_in_flight_per_subscriber=8,
        claim_batch=8,
    )


async def uncertain_delivery(store: Store, retry_at: float) -> model.Claim:
    """A delivery whose first attempt was uncertain, its retry due at ``retry_at``."""
    await store.create_subscriber(store_subscriber_spec("a", "a.*"), signing.generate_secret())
    await store.emit([model.NewEvent("a.x", b"{}", "application/json", "")])
    (claim,) = await store.claim(OWNER, 10, 60.0)
    record = attempt_record(
        claim, owner=OWNER, outcome="uncertain", state=PENDING, next_attempt_at=retry_at
    )
    await store.record([record])
    return claim


async def test_an_attempt_fenced_off_by_a_redeliver_stays_fenced_off_during_a_sweep(
    store: Store,
) -> None:
    """Attempt 2 is in flight when an operator redelivers; the sweep then asks about the
    delivery. Attempt 2's late outcome (the last of its schedule: dead-letter it) must not
    pass the fence and undo the Redeliver."""
    await uncertain_delivery(store, time.time())
    (second,) = await store.claim(OWNER, 10, 60.0)
    assert second.attempt == 2
    await store.redeliver(second.delivery_id)

    async def attempt_two_ends() -> None:
        stale = attempt_record(second, owner=OWNER, outcome="uncertain", state=FAILED)
        await store.record([stale])

    await dispatcher(store, Asked(attempt_two_ends)).reconcile_once()

    delivery = await store.get_delivery(second.delivery_id)
    assert delivery.state == PENDING
    assert [entry.number for entry in delivery.log] == [1]
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at <= time.time()  # Due at once, as the Redeliver made it.


async def test_a_sweep_stopped_while_asking_gives_deliveries_back_at_their_scheduled_time(
    store: Store,
) -> None:
    """The publisher stops (its periodic jobs first, then the dispatcher) while the sweep
    waits for an answer: the retry an hour away stays an hour away."""
    retry_at = time.time() + HOUR
    claim = await uncertain_delivery(store, retry_at)
    never = asyncio.Event()
    transport = Asked(never.wait)
    sweeping = dispatcher(store, transport)
    job = Periodic("reconciler", 60, sweeping.reconcile_once)
    job.start()
    await asyncio.wait_for(transport.asked.wait(), 10)

    await job.stop()
    await sweeping.stop(grace=1.0)

    delivery = await store.get_delivery(claim.delivery_id)
    assert delivery.next_attempt_at is not None
    assert abs(delivery.next_attempt_at - retry_at) < 1.0


async def test_a_sweeper_that_died_leaves_the_retry_at_its_scheduled_time(store: Store) -> None:
    """Its lease is the scheduled time when that is later, so it runs out no earlier; and
    the embedded mode's start, which makes a dead run's leases due at once, leaves it."""
    retry_at = time.time() + HOUR
    claim = await uncertain_delivery(store, retry_at)
    (held, scheduled), *_ = await store.claim_doubtful(sweeper_of(OWNER), 10, 60.0)
    assert held.delivery_id == claim.delivery_id
    assert scheduled == retry_at

    leased = await store.get_delivery(claim.delivery_id)
    assert leased.next_attempt_at == retry_at
    assert await store.reclaim_all() == 1
    reclaimed = await store.get_delivery(claim.delivery_id)
    assert reclaimed.next_attempt_at == retry_at


async def test_a_redelivered_dead_letter_that_fails_again_is_emailed_about_again(
    store: Store,
) -> None:
    await store.create_subscriber(store_subscriber_spec("a", "a.*"), signing.generate_secret())
    await store.emit([model.NewEvent("a.x", b"{}", "application/json", "")])
    (first,) = await store.claim(OWNER, 10, 60.0)
    await store.record([attempt_record(first, owner=OWNER, outcome="failed", state=FAILED)])
    (subscriber,) = await store.subscribers_with_dead_letters(window=0.0)
    await store.mark_notified([first.delivery_id])
    assert await store.subscribers_with_dead_letters(window=0.0) == []

    await store.redeliver(first.delivery_id)
    (again,) = await store.claim(OWNER, 10, 60.0)
    await store.record([attempt_record(again, owner=OWNER, outcome="failed", state=FAILED)])

    assert [s.id for s in await store.subscribers_with_dead_letters(window=0.0)] == [subscriber.id]
    letters, count = await store.dead_letters(subscriber.id, 10)
    assert count == 1
    assert [letter.delivery_id for letter in letters] == [again.delivery_id]
