"""How long one subscriber's deliveries wait behind another's that never answers.

``python -m tests.bench.slow_subscriber``: a publisher with 16 send slots and a 3 s
delivery timeout, in this process on a fresh SQLite file; for 0, 16 and 64 events
emitted first to a subscriber that holds every call open, the time until 20 events
emitted next reach a subscriber that answers at once. Once with the default limit
per subscriber (8 of the 16 slots), once with none (16 of 16), which is how every
publisher sent before there were limits: then the slow subscriber holds every slot.
The README quotes it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import grpc.aio

from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher.app import PublisherApp
from publisher.settings import Settings
from tests.support import FakeSubscriber

from . import runtime

SLOTS = 16
DELIVERY_TIMEOUT = 3.0
FAST_EVENTS = 20
# Past every wait here: the slow subscriber never answers within a delivery's timeout.
HANG_SECONDS = 600.0
# A wait that reaches this is reported as such rather than waited out.
GIVE_UP_SECONDS = 120.0


async def fast_wait(slow_events: int, per_subscriber: int, workdir: Path) -> float:
    """Seconds from the fast subscriber's emit until all its events arrived."""
    app = PublisherApp(
        Settings(
            port=0,
            database_url=f"sqlite:///{workdir / f'slow-{slow_events}-{per_subscriber}.db'}",
            delivery_timeout=DELIVERY_TIMEOUT,
            max_in_flight=SLOTS,
            max_in_flight_per_subscriber=per_subscriber,
            claim_batch=SLOTS,
        )
    )
    slow, fast = FakeSubscriber(hang=HANG_SECONDS), FakeSubscriber()
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = publisher_pb2_grpc.PublisherServiceStub(channel)
            for name, subscriber in (("slow", slow), ("fast", fast)):
                endpoint = await subscriber.start()
                await stub.RegisterSubscriber(
                    publisher_pb2.RegisterSubscriberRequest(
                        name=name, endpoint=endpoint, event_types=[f"{name}.*"]
                    )
                )
            if slow_events:
                await _emit(stub, "slow.event", slow_events)
            began = time.monotonic()
            await _emit(stub, "fast.event", FAST_EVENTS)
            while len(set(fast.event_ids())) < FAST_EVENTS:
                if time.monotonic() - began > GIVE_UP_SECONDS:
                    return float("inf")
                await asyncio.sleep(0.01)
            return time.monotonic() - began
    finally:
        await app.stop()
        await slow.stop()
        await fast.stop()


async def _emit(stub: publisher_pb2_grpc.PublisherServiceAsyncStub, kind: str, count: int) -> None:
    events = [publisher_pb2.EmitRequest(type=kind, payload=b"{}") for _ in range(count)]
    await stub.EmitBatch(publisher_pb2.EmitBatchRequest(events=events))


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="webhooks-slow-") as workdir:
        # 0: the default, half of the slots.
        for per_subscriber, limit in ((0, f"{SLOTS // 2} per subscriber"), (SLOTS, "no limit")):
            for slow_events in (0, SLOTS, 4 * SLOTS):
                waited = await fast_wait(slow_events, per_subscriber, Path(workdir))
                print(
                    f"{FAST_EVENTS} events to a subscriber that answers at once, behind"
                    f" {slow_events} to one that never does: all arrived in {waited:.2f} s"
                    f" ({SLOTS} slots, {limit}, {DELIVERY_TIMEOUT:g} s delivery timeout)"
                )


if __name__ == "__main__":
    runtime.run(main())
