"""A closed-loop driver: ``concurrency`` workers call as fast as answers come back.

Calls finished during the warm-up are not counted; the rate is the calls
finished in the measured window divided by its length. The CPU this process
spent in that window is reported beside it, and the calls of the whole run, by
which the server's CPU over the run can be divided.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def drive(
    call: Callable[[], Awaitable[Any]], *, concurrency: int, warmup: float, seconds: float
) -> dict[str, Any]:
    begin = time.monotonic()
    measure_from = begin + warmup
    end = measure_from + seconds
    counted = 0
    total = 0
    errors = 0
    last_error = ""
    cpu: list[float] = []

    async def read_cpu_at(when: float) -> None:
        await asyncio.sleep(when - time.monotonic())
        cpu.append(time.process_time())

    async def worker() -> None:
        nonlocal counted, total, errors, last_error
        while time.monotonic() < end:
            try:
                await call()
            except Exception as error:
                errors += 1
                last_error = repr(error)
                continue
            total += 1
            finished = time.monotonic()
            if measure_from <= finished <= end:
                counted += 1

    await asyncio.gather(
        read_cpu_at(measure_from), read_cpu_at(end), *(worker() for _ in range(concurrency))
    )
    return {
        "calls": counted,
        "calls_total": total,
        "seconds": seconds,
        "rate": counted / seconds,
        "cpu_seconds": cpu[1] - cpu[0],
        "errors": errors,
        "last_error": last_error,
    }
