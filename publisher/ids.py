"""Ids of stored rows: a prefix, the time in milliseconds, and 80 random bits.

The random bits come from the operating system, drawn a few KiB at a time. Each
``os.urandom`` call lets go of the interpreter lock, and on the store's thread
winning it back from a busy event loop is what costs: two ids per event drawn
one at a time were a quarter of the emit transactions' samples in a py-spy
profile of e2e_http.
"""

from __future__ import annotations

import os
import threading
import time

RANDOM_BYTES = 10
# Enough for about 400 ids per draw.
_POOL_BYTES = 4096


class _Randomness:
    """Random bytes from a pool the OS refills; safe across threads and forks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        # A forked child must not hand out the bytes its parent hands out too.
        os.register_at_fork(after_in_child=self._forget)

    def take(self, count: int) -> bytes:
        with self._lock:
            if self._at + count > len(self._pool):
                self._pool, self._at = os.urandom(max(_POOL_BYTES, count)), 0
            start = self._at
            self._at += count
            return self._pool[start : start + count]

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pool, self._at = b"", 0


_randomness = _Randomness()


def new_id(prefix: str) -> str:
    """``prefix_`` + milliseconds + randomness: unique, and sorted by creation time."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{_randomness.take(RANDOM_BYTES).hex()}"
