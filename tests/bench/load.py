"""The load generator: emits 1 KiB JSON events to one or more publishers and notes when.

``python -m tests.bench.load --target ADDR [--target ADDR2] --mode MODE --count N ...``

- ``unary``: one Emit per event, ``--concurrency`` calls in flight;
- ``batch``: EmitBatch of ``--batch-size`` events, ``--concurrency`` calls in flight;
- ``paced``: one Emit per event started on a fixed schedule of ``--rate`` per second
  (open loop: a slow answer does not delay the next start), at most ``--concurrency``
  in flight.

Calls go round-robin over the targets. The start time (time.time()) of the call
that carried each event is written to ``--out`` as ``{"event_ids": [...], "times": [...]}``;
stdout gets one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc.aio

from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc

from . import runtime

CALL_TIMEOUT = 60.0


class Load:
    def __init__(
        self, stubs: list[publisher_pb2_grpc.PublisherServiceAsyncStub], event_type: str
    ) -> None:
        self._stubs: Iterator[publisher_pb2_grpc.PublisherServiceAsyncStub] = itertools.cycle(stubs)
        self._request = publisher_pb2.EmitRequest(type=event_type, payload=runtime.payload())
        self.event_ids: list[str] = []
        self.times: list[float] = []
        self.first_start = 0.0
        self.last_end = 0.0
        self.late = 0

    def _started(self) -> float:
        now = time.time()
        if not self.first_start:
            self.first_start = now
        return now

    def _ended(self, ids: list[str], started: float) -> None:
        self.event_ids.extend(ids)
        self.times.extend([started] * len(ids))
        self.last_end = max(self.last_end, time.time())

    async def unary(self) -> None:
        started = self._started()
        response = await next(self._stubs).Emit(self._request, timeout=CALL_TIMEOUT)
        self._ended([response.event_id], started)

    async def batch(self, size: int) -> None:
        request = publisher_pb2.EmitBatchRequest(events=[self._request] * size)
        started = self._started()
        response = await next(self._stubs).EmitBatch(request, timeout=CALL_TIMEOUT)
        self._ended([result.event_id for result in response.results], started)


async def closed_loop(load: Load, args: argparse.Namespace) -> None:
    size = 1 if args.mode == "unary" else args.batch_size
    sizes = [size] * (args.count // size)
    if args.count % size:
        sizes.append(args.count % size)
    calls = iter(sizes)

    async def worker() -> None:
        for size in calls:
            await (load.unary() if args.mode == "unary" else load.batch(size))

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))


async def paced(load: Load, args: argparse.Namespace) -> None:
    room = asyncio.Semaphore(args.concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            await load.unary()
        finally:
            room.release()

    begin = time.monotonic()
    for index in range(args.count):
        delay = begin + index / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            load.late += 1
        await room.acquire()
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def main(args: argparse.Namespace) -> None:
    channels = [grpc.aio.insecure_channel(t, options=runtime.GRPC_OPTIONS) for t in args.target]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10.0)
        load = Load([publisher_pb2_grpc.PublisherServiceStub(c) for c in channels], args.event_type)
        cpu_before = time.process_time()
        if args.mode == "paced":
            await paced(load, args)
        else:
            await closed_loop(load, args)
        cpu_seconds = time.process_time() - cpu_before
    finally:
        for channel in channels:
            await channel.close(None)
    _write(args.out, {"event_ids": load.event_ids, "times": load.times})
    summary: dict[str, Any] = {
        "count": len(load.event_ids),
        "first_start": load.first_start,
        "last_end": load.last_end,
        "late": load.late,
        "cpu_seconds": cpu_seconds,
    }
    runtime.say(summary)


def _write(path: str, document: dict[str, Any]) -> None:
    with open(path, "w") as out:
        json.dump(document, out)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.load")
    parser.add_argument("--target", action="append", required=True, help="publisher host:port")
    parser.add_argument("--mode", choices=["unary", "batch", "paced"], required=True)
    parser.add_argument("--count", type=int, required=True, help="events to emit")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight at most")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s (paced)")
    parser.add_argument("--event-type", default=runtime.EVENT_TYPE)
    parser.add_argument("--out", required=True, help="file for the per-event start times")
    args = parser.parse_args()
    if args.count <= 0 or args.concurrency <= 0 or args.batch_size <= 0 or args.rate <= 0:
        parser.error("--count, --concurrency, --batch-size and --rate must be positive")
    return args


if __name__ == "__main__":
    runtime.run(main(parse()))
