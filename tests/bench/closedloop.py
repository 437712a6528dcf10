"""A closed-loop driver: ``concurrency`` workers call as fast as answers come back.

Calls finished during the warm-up are not counted; the rate is the calls
finished in the measured window divided by its length.
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
    errors = 0
    last_error = ""

    async def worker() -> None:
        nonlocal counted, errors, last_error
        while time.monotonic() < end:
            try:
                await call()
            except Exception as error:
                errors += 1
                last_error = repr(error)
                continue
            finished = time.monotonic()
            if measure_from <= finished <= end:
                counted += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "calls": counted,
        "seconds": seconds,
        "rate": counted / seconds,
        "errors": errors,
        "last_error": last_error,
    }
