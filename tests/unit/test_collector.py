"""The collector as the running publisher sets it: sends filling its slots set off no young
collection, while CPython's default threshold collects again and again as they start."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest

from common import signing
from publisher import collector, model
from publisher.dispatcher import Dispatcher
from publisher.store import AttemptRecord, ClaimRound, Store
from tests.support import Held, eventually, store_subscriber_spec

SLOTS = 512
# CPython's own young threshold, which the default case runs with whatever this process set.
CPYTHON_YOUNG_THRESHOLD = 700


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """Whatever a test sets, the collector is as it was afterwards."""
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_the_young_threshold_covers_every_slot_and_has_a_floor() -> None:
    assert collector.young_threshold(SLOTS) == SLOTS * collector.OBJECTS_PER_SEND
    assert collector.young_threshold(1) == collector.MIN_YOUNG_THRESHOLD
    assert collector.young_threshold(5_000) == 100_000


def test_settling_freezes_what_starting_made_and_sets_the_young_threshold_only(
    restored_collector: None,
) -> None:
    _, middle, old = gc.get_threshold()
    collector.settle(SLOTS)
    assert gc.get_threshold() == (collector.young_threshold(SLOTS), middle, old)
    assert gc.get_freeze_count() > 0


class _NoStore:
    """What the dispatcher asks of a store while sends are in flight: nothing is due."""

    def record_soon(self, outcomes: Sequence[AttemptRecord]) -> asyncio.Future[list[None]]:
        written: asyncio.Future[list[None]] = asyncio.get_running_loop().create_future()
        written.set_result([None] * len(outcomes))
        return written

    async def claim_round(self, owner: str, grant: Any, lease_seconds: float) -> ClaimRound:
        return ClaimRound([], None, frozenset())

    async def release(self, owner: str) -> int:
        return 0


@pytest.mark.parametrize("settled", [True, False], ids=["settled", "default"])
async def test_sends_filling_half_the_slots_set_off_no_young_collection_once_settled(
    restored_collector: None, settled: bool
) -> None:
    held = Held()
    dispatcher = Dispatcher(
        cast(Store, _NoStore()),
        {model.Protocol.GRPC: held},
        owner="collector-test",
        issuer="test",
        delivery_timeout=30.0,
        max_in_flight=SLOTS,
        max_in_flight_per_subscriber=SLOTS // 2,
        claim_batch=SLOTS // 2,
    )
    subscriber = model.Subscriber(
        id="sub-1",
        spec=store_subscriber_spec("a", "a.*"),
        secret=signing.generate_secret(),
        state=model.SubscriberState.ACTIVE,
        state_reason="",
        created_at=0.0,
        updated_at=0.0,
    )
    now = time.time()
    claims = [
        model.Claim(
            delivery_id=f"dlv-{i}",
            attempt=1,
            attempts_in_round=1,
            round_started_at=now,
            last_outcome="",
            event=model.Event(f"evt-{i}", "a.x", b"{}", "application/json", now),
            subscriber=subscriber,
        )
        for i in range(SLOTS // 2)
    ]
    young = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal young
        if phase == "stop" and info["generation"] == 0:
            young += 1

    if settled:
        collector.settle(SLOTS)
    else:
        gc.set_threshold(CPYTHON_YOUNG_THRESHOLD)
    dispatcher.start()
    gc.collect()  # The count of new objects starts from nothing.
    gc.callbacks.append(count)
    try:
        # As an emit leases them: the grant counts each, then the dispatcher starts them.
        grant = dispatcher.grant(len(claims))
        assert sum(grant.take(claim.subscriber.id) for claim in claims) == len(claims)
        dispatcher.take(claims, grant)

        async def all_started() -> bool:
            return held.in_flight() == len(claims)

        await eventually(all_started, what="every send started")
    finally:
        gc.callbacks.remove(count)
        await dispatcher.stop(grace=0.0)
    if settled:
        assert young == 0
    else:
        # The objects the sends keep alive are walked again and again.
        assert young >= 3
