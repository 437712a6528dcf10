"""Python's cyclic garbage collector, set for a process that keeps many sends in flight.

The collector runs a young collection whenever the container objects allocated
since the last one outnumber those freed by its threshold, 700 by default. Each
send in flight keeps about 19 of them alive until it ends (its task, coroutine
frames, attempt, claim, futures: counted for 512 sends held open against a fake
transport), so at the default limits the collector ran over and over while the
slots filled, walking the same live objects each time and moving them to older
generations to be walked again. In e2e_grpc_batch that was about 370
collections, 93-112 ms of the event loop, per 6,000 events. With the threshold
above what the slots hold, 5 ran, and the publisher's CPU per event fell from
282-298 to 263-277 µs (four interleaved pairs).

Objects without cycles are freed when their last reference goes, whatever the
threshold; only cyclic garbage waits longer for a collection, and a young
collection walks more objects when it comes (2-3.5 ms seen, against about 1).
"""

from __future__ import annotations

import gc

# Container objects one send in flight keeps alive, rounded up (see above).
OBJECTS_PER_SEND = 20
# The young threshold never goes below this, the value measured above: an emit batch of
# 1,000 events alone holds several thousand objects (rows, claims, results) while its
# transaction runs.
MIN_YOUNG_THRESHOLD = 10_000


def young_threshold(sends_in_flight: int) -> int:
    """Net new container objects between young collections, for ``sends_in_flight`` slots."""
    return max(MIN_YOUNG_THRESHOLD, OBJECTS_PER_SEND * sends_in_flight)


def settle(sends_in_flight: int) -> None:
    """Sets the collector for the running service; called once starting is done.

    What starting made (modules, the engine, servers, channels) lives as long as
    the process, so it is frozen: a full collection need not walk it again, and
    each such walk is a pause of the event loop. The older generations keep
    their thresholds.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold(sends_in_flight), middle, old)
