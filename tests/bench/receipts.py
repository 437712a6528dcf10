"""What an ack server remembers: when each delivery first arrived, in arrival order.

Both ack servers (gRPC and HTTP) keep one of these and expose it through the
control commands ``reset``, ``wait`` and ``dump``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any


class Receipts:
    def __init__(self) -> None:
        self._target = 0
        self._reached = asyncio.Event()
        self._clear()

    def _clear(self) -> None:
        self._seen: set[str] = set()
        self._events: set[str] = set()
        self.event_ids: list[str] = []
        self.times: list[float] = []
        # Deliveries that came again (a retry after a lost answer); a clean run has none.
        self.repeats = 0

    def has_event(self, event_id: str) -> bool:
        return event_id in self._events

    def add(self, key: str, event_id: str) -> None:
        """Notes a delivery (``key`` identifies it) of ``event_id``, stamped with the wall clock."""
        now = time.time()
        if key in self._seen:
            self.repeats += 1
            return
        self._seen.add(key)
        self._events.add(event_id)
        self.event_ids.append(event_id)
        self.times.append(now)
        if self._target and len(self.times) >= self._target:
            self._reached.set()

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "reset":
            self._clear()
            return {"ok": True}
        if name == "wait":
            return await self._wait(int(command["count"]), float(command["timeout"]))
        if name == "dump":
            self._dump(command["path"])
            return {"ok": True, "count": len(self.times)}
        raise ValueError(f"unknown command {name!r}")

    def _dump(self, path: str) -> None:
        with open(path, "w") as out:
            json.dump({"event_ids": self.event_ids, "times": self.times}, out)

    async def _wait(self, count: int, within: float) -> dict[str, Any]:
        """Waits until ``count`` deliveries arrived (or ``within`` s passed) and says when."""
        self._target = count
        if len(self.times) >= count:
            self._reached.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reached.wait(), within)
        self._target = 0
        self._reached.clear()
        reached = len(self.times) >= count
        return {
            "count": len(self.times),
            "repeats": self.repeats,
            "reached": reached,
            "first_at": self.times[0] if self.times else None,
            "at": self.times[count - 1] if reached and count else None,
        }
