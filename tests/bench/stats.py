"""Small numeric helpers: percentiles and the Emit-to-receipt latencies of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latencies(emits: Path, receipts: Path) -> list[float]:
    """Seconds from the start of the Emit call to the first receipt, per event received."""
    emitted = json.loads(emits.read_text())
    received = json.loads(receipts.read_text())
    started = dict(zip(emitted["event_ids"], emitted["times"], strict=True))
    return [
        at - started[event_id]
        for event_id, at in zip(received["event_ids"], received["times"], strict=True)
        if event_id in started
    ]
