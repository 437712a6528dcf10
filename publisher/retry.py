"""Retry policy: pure arithmetic from attempts, outcome and clock to the next attempt time.

A schedule is a list of offsets measured from the first attempt of a round
(the default: 5 min, 30 min, 1 h, 3 h and 24 h after it). Every slot gets its
attempt, so the number of attempts is always ``len(schedule) + 1``; if the
publisher was down past several slots, the overdue ones run at once rather
than being skipped, and the last slot is still the maximum the schedule aims
for. Jitter moves a retry by up to a tenth of the gaps to its neighbouring
slots, so a burst of failures does not come back as one burst, and never past
the last slot.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SCHEDULE: tuple[float, ...] = (300.0, 1800.0, 3600.0, 3 * 3600.0, 24 * 3600.0)
MAX_OFFSET = 24 * 3600.0
JITTER_FRACTION = 0.1


def validate(schedule: Sequence[float]) -> str | None:
    """What is wrong with a custom schedule, or None when it is usable."""
    previous = 0.0
    for index, offset in enumerate(schedule):
        if not offset > 0:  # also catches NaN
            return f"[{index}] must be positive"
        if offset <= previous:
            return f"[{index}] must be later than the one before (offsets count from the first)"
        if offset > MAX_OFFSET:
            return f"[{index}] exceeds the maximum of {MAX_OFFSET:.0f} s"
        previous = offset
    return None


def is_last(schedule: Sequence[float], attempts_in_round: int) -> bool:
    """Whether the attempt numbered ``attempts_in_round`` is the schedule's last."""
    return attempts_in_round > len(schedule)


def next_attempt_at(
    schedule: Sequence[float],
    *,
    attempts_in_round: int,
    round_started_at: float,
    now: float,
    jitter: float,
    retry_after: float | None = None,
) -> float | None:
    """When to try again after a failed attempt, or None when the schedule is exhausted.

    ``attempts_in_round`` counts the attempts made so far, the failed one
    included; ``jitter`` is a uniform random number in [0, 1) supplied by the
    caller so that this function stays deterministic; ``retry_after`` is a wait
    the subscriber asked for, honoured up to the schedule's last slot.
    """
    slot = attempts_in_round - 1
    if slot >= len(schedule):
        return None
    previous = schedule[slot - 1] if slot > 0 else 0.0
    gap = schedule[slot] - previous
    if slot + 1 < len(schedule):
        # Bounded by the next gap too, so that jitter never swaps two slots.
        gap = min(gap, schedule[slot + 1] - schedule[slot])
    spread = (2.0 * jitter - 1.0) * JITTER_FRACTION * gap
    last = round_started_at + schedule[-1]
    when = min(round_started_at + schedule[slot] + spread, last)
    if retry_after is not None and retry_after > 0:
        when = max(when, min(now + retry_after, last))
    return max(when, now)
