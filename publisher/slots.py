"""Send slots: how many deliveries may be in flight, overall and to any one subscriber,
and how many each may hold leased.

A subscriber that holds its calls open until the delivery timeout keeps each
slot it has for that long. With one shared pool, enough of its deliveries
would hold every slot, and every other subscriber's events would wait behind
them. So each subscriber may hold at most ``per_subscriber`` slots of this
process, and the rest stay free for the others. A subscriber may ask for fewer
(its own ``max_in_flight``, for an endpoint that cannot take many at once).

What is counted here are leases: ``depth`` of them per slot, one sending and the
rest waiting in the dispatcher for that slot (the embedded mode leases that far
ahead; see publisher.dispatcher). With a depth of 1, a lease is a send.

A subscriber that reached its limit, or that a claim turned away for want of
room, counts as full until half of its leases have ended: only then does the
dispatcher claim for it, as a claim for one freed slot would be a transaction
for one row. Meanwhile claims look for the others' deliveries past its backlog,
and top it up to its limit only from the oldest due ones they read anyway.

``Grant`` is what one claim or emit transaction may lease: a copy of the
counts, taken on the event loop and read in the store's thread.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

# A delivery whose payload is larger than this is leased only into a free slot, its
# subscriber's and one of the total, not ahead: what waits beyond the slots holds at most
# (depth - 1) * slots * 16 KiB of payloads, 56 MiB at the embedded mode's defaults (depth
# 8, 512 slots), and larger payloads take at most one lease per slot, as with no depth.
AHEAD_MAX_BYTES = 16 * 1024


def limit_for(per_subscriber: int | None, own_limit: int) -> int | None:
    """A subscriber's limit: the publisher's, or its own if that is lower (None: no limit)."""
    if not own_limit:
        return per_subscriber
    return own_limit if per_subscriber is None else min(own_limit, per_subscriber)


class Grant:
    """Slots held for one transaction: up to ``total`` leases, within each subscriber's room."""

    def __init__(
        self,
        total: int,
        *,
        per_subscriber: int | None = None,
        depth: int = 1,
        send_room: int | None = None,
        busy: Mapping[str, int] | None = None,
        full: frozenset[str] = frozenset(),
    ) -> None:
        self.total = total
        # Slots of the total not leased when the grant was made (None: no such limit).
        self.send_room = send_room
        # Leases per subscriber (its slots times ``depth``); None: no limit (a claim made
        # outside any dispatcher).
        self.per_subscriber = per_subscriber
        # A subscriber's own limit counts slots too: it may hold this many leases per slot.
        self.depth = depth
        self._busy = dict(busy or {})
        # Subscribers a claim does not look for past the oldest due deliveries, where it
        # may still top them up to their limit: asking for their backlog by subscriber
        # would be a probe for a few rows.
        self.full = full
        self.taken = 0
        self._taken_by: Counter[str] = Counter()

    @classmethod
    def unlimited(cls, total: int) -> Grant:
        return cls(total)

    def take(self, subscriber_id: str, own_limit: int = 0, size: int = 0) -> bool:
        """Whether one more delivery to ``subscriber_id`` (whose own limit is ``own_limit``
        slots, 0 for none; whose payload is ``size`` bytes) fits; counts it if it does."""
        if self.taken >= self.total:
            return False
        limit = limit_for(self.per_subscriber, own_limit * self.depth)
        if size > AHEAD_MAX_BYTES:
            if self.send_room is not None and self.taken >= self.send_room:
                return False
            if limit is not None:
                limit //= self.depth
        if limit is not None:
            busy = self._busy.get(subscriber_id, 0) + self._taken_by[subscriber_id]
            if busy >= limit:
                return False
        self._taken_by[subscriber_id] += 1
        self.taken += 1
        return True

    def reset(self) -> None:
        """Forgets what was taken: a transaction that is tried again starts afresh."""
        self.taken = 0
        self._taken_by.clear()


class Slots:
    """The dispatcher's count of leases, per subscriber, and of leases held for grants."""

    def __init__(self, total: int, per_subscriber: int, depth: int = 1) -> None:
        if total < 1 or per_subscriber < 1 or depth < 1:
            raise ValueError("slots: total, per_subscriber and depth must be at least 1")
        # Sends in flight, in all and to one subscriber.
        self.total = total
        self.per_subscriber = min(per_subscriber, total)
        self.depth = depth
        # Leases in all.
        self.capacity = total * depth
        self._busy: Counter[str] = Counter()
        # The lease limit of each busy subscriber, as its first lease found it.
        self._limits: dict[str, int] = {}
        self._leased = 0
        self._reserved = 0
        self._full: set[str] = set()

    @property
    def leased(self) -> int:
        return self._leased

    def free(self) -> int:
        """Leases neither held nor reserved for a grant."""
        return self.capacity - self._leased - self._reserved

    def send_limit(self, own_limit: int = 0) -> int:
        """Sends in flight a subscriber may have, whose own limit is ``own_limit`` (0: none)."""
        return limit_for(self.per_subscriber, own_limit) or self.per_subscriber

    def busy(self, subscriber_id: str) -> int:
        return self._busy[subscriber_id]

    def is_full(self, subscriber_id: str) -> bool:
        return subscriber_id in self._full

    def grant(self, wanted: int) -> Grant:
        """Holds up to ``wanted`` free leases for one transaction; ``settle`` gives them back."""
        granted = max(0, min(wanted, self.free()))
        send_room = max(0, self.total - self._leased - self._reserved)
        self._reserved += granted
        return Grant(
            granted,
            per_subscriber=self.per_subscriber * self.depth,
            depth=self.depth,
            send_room=send_room,
            busy=self._busy,
            full=frozenset(self._full),
        )

    def settle(self, grant: Grant) -> None:
        """Gives back the leases ``grant`` held; those it leased are ``acquire``d."""
        self._reserved -= grant.total

    def acquire(self, subscriber_id: str, own_limit: int = 0) -> None:
        """A delivery to ``subscriber_id`` (whose own limit is ``own_limit`` slots, 0 for
        none) is leased to the dispatcher."""
        limit = self.send_limit(own_limit) * self.depth
        self._limits[subscriber_id] = limit
        self._busy[subscriber_id] += 1
        self._leased += 1
        if self._busy[subscriber_id] >= limit:
            self._full.add(subscriber_id)

    def turned_away(self, subscriber_id: str) -> None:
        """A claim found more of ``subscriber_id``'s deliveries due than it had room for.

        It counts as full, unless half of its slots are free by now. Sends that
        finish while a claim runs leave it short of its limit once the claim's
        leases start, so it would never reach full, and every claim would top it
        up by just the sends that finished during the one before: in
        e2e_grpc_batch, 155 claims of 39 rows each for 6,000 events, against 35-39
        of about 125 once it counts as full.
        """
        limit = self._limits.get(subscriber_id)
        if limit is not None and self._busy[subscriber_id] > limit // 2:
            self._full.add(subscriber_id)

    def release(self, subscriber_id: str) -> bool:
        """A lease of ``subscriber_id``'s ended (its send finished, or it was given back);
        True if that made the subscriber not full."""
        self._leased -= 1
        left = self._busy[subscriber_id] - 1
        limit = self._limits[subscriber_id]
        if left:
            self._busy[subscriber_id] = left
        else:
            # Both hold busy subscribers only.
            del self._busy[subscriber_id]
            del self._limits[subscriber_id]
        if subscriber_id in self._full and left <= limit // 2:
            self._full.discard(subscriber_id)
            return True
        return False
