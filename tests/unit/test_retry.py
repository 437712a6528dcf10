"""The retry policy: how many attempts a schedule gives, where jitter puts them, what it accepts."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from publisher import retry

START = 1_000_000.0
SCHEDULE = retry.DEFAULT_SCHEDULE


def _gap(schedule: tuple[float, ...], slot: int) -> float:
    """The distance from a slot to the one before it (the first slot counts from 0)."""
    return schedule[slot] - (schedule[slot - 1] if slot > 0 else 0.0)


def test_default_schedule_is_5m_30m_1h_3h_24h_after_the_first_attempt() -> None:
    """The default schedule's offsets are the documented ones."""
    assert SCHEDULE == (300.0, 1800.0, 3600.0, 10800.0, 86400.0)


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999999])
def test_default_schedule_gives_one_attempt_per_slot_plus_the_first_then_none(
    jitter: float,
) -> None:
    """Failing every attempt at its scheduled time yields len(schedule) + 1 attempts, then None."""
    now = START
    attempts = 1
    # Bounded: a policy that never gives up must fail this test, not hang the suite.
    for _ in range(len(SCHEDULE) + 2):
        when = retry.next_attempt_at(
            SCHEDULE, attempts_in_round=attempts, round_started_at=START, now=now, jitter=jitter
        )
        if when is None:
            break
        now = when
        attempts += 1
    assert attempts == len(SCHEDULE) + 1


def test_no_retry_after_the_last_slot_has_been_used() -> None:
    """Once every slot has had its attempt, next_attempt_at gives up."""
    assert (
        retry.next_attempt_at(
            SCHEDULE,
            attempts_in_round=len(SCHEDULE) + 1,
            round_started_at=START,
            now=START + SCHEDULE[-1],
            jitter=0.5,
        )
        is None
    )


def test_empty_schedule_allows_only_the_first_attempt() -> None:
    """With no slots there is nothing to retry."""
    assert (
        retry.next_attempt_at(
            (), attempts_in_round=1, round_started_at=START, now=START, jitter=0.5
        )
        is None
    )


@pytest.mark.parametrize("slot", range(len(SCHEDULE)))
@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.75, 0.999999])
def test_each_retry_lands_within_a_tenth_of_its_gap_around_its_slot(
    slot: int, jitter: float
) -> None:
    """Jitter moves a retry by at most JITTER_FRACTION of the gap to the previous slot."""
    when = retry.next_attempt_at(
        SCHEDULE, attempts_in_round=slot + 1, round_started_at=START, now=START, jitter=jitter
    )
    assert when is not None
    allowed = retry.JITTER_FRACTION * _gap(SCHEDULE, slot)
    assert abs(when - (START + SCHEDULE[slot])) <= allowed + 1e-6


def test_jitter_spans_the_whole_band() -> None:
    """Jitter 0 gives the early edge, 0.5 the slot itself, nearly 1 the late edge."""
    slot = 2
    allowed = retry.JITTER_FRACTION * _gap(SCHEDULE, slot)

    def at(jitter: float) -> float:
        when = retry.next_attempt_at(
            SCHEDULE, attempts_in_round=slot + 1, round_started_at=START, now=START, jitter=jitter
        )
        assert when is not None
        return when

    assert at(0.0) == pytest.approx(START + SCHEDULE[slot] - allowed)
    assert at(0.5) == pytest.approx(START + SCHEDULE[slot])
    assert at(0.999999) == pytest.approx(START + SCHEDULE[slot] + allowed, abs=0.01)


@pytest.mark.parametrize("jitter", [0.5, 0.75, 0.999999])
def test_jitter_never_moves_the_last_retry_past_the_last_slot(jitter: float) -> None:
    """A late jitter on the last slot is clamped to round_started_at + schedule[-1]."""
    when = retry.next_attempt_at(
        SCHEDULE,
        attempts_in_round=len(SCHEDULE),
        round_started_at=START,
        now=START,
        jitter=jitter,
    )
    assert when == START + SCHEDULE[-1]


def test_jitter_may_move_the_last_retry_earlier() -> None:
    """The clamp only cuts late jitter; early jitter on the last slot still applies."""
    when = retry.next_attempt_at(
        SCHEDULE, attempts_in_round=len(SCHEDULE), round_started_at=START, now=START, jitter=0.0
    )
    assert when is not None
    assert when < START + SCHEDULE[-1]


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999999])
def test_retry_is_never_earlier_than_now(jitter: float) -> None:
    """A slot that lies before now comes due at now, not in the past."""
    now = START + 1000.0  # past slot 0 (300 s) but before slot 1
    when = retry.next_attempt_at(
        SCHEDULE, attempts_in_round=1, round_started_at=START, now=now, jitter=jitter
    )
    assert when == now


def test_overdue_slots_come_due_at_once_in_order_without_skipping() -> None:
    """After downtime past several slots, each overdue one runs now, then the schedule resumes."""
    back_at = START + 7300.0  # the publisher was down past 300, 1800 and 3600 s
    due = [
        retry.next_attempt_at(
            SCHEDULE, attempts_in_round=attempts, round_started_at=START, now=back_at, jitter=0.5
        )
        for attempts in (1, 2, 3)
    ]
    assert due == [back_at, back_at, back_at]
    fourth = retry.next_attempt_at(
        SCHEDULE, attempts_in_round=4, round_started_at=START, now=back_at, jitter=0.5
    )
    assert fourth == START + SCHEDULE[3]


def test_slots_all_overdue_still_give_every_attempt() -> None:
    """Even when now is past the whole schedule, every slot is tried (at now) before giving up."""
    now = START + 10 * 86400.0
    results = [
        retry.next_attempt_at(
            SCHEDULE, attempts_in_round=attempts, round_started_at=START, now=now, jitter=0.5
        )
        for attempts in range(1, len(SCHEDULE) + 2)
    ]
    assert results == [now] * len(SCHEDULE) + [None]


def test_retry_after_pushes_a_retry_later() -> None:
    """A Retry-After longer than the slot's wait moves the retry to now + retry_after."""
    now = START + 1.0
    when = retry.next_attempt_at(
        SCHEDULE,
        attempts_in_round=1,
        round_started_at=START,
        now=now,
        jitter=0.5,
        retry_after=1000.0,
    )
    assert when == now + 1000.0


def test_retry_after_shorter_than_the_slot_changes_nothing() -> None:
    """A Retry-After that ends before the slot does not bring the retry forward."""
    when = retry.next_attempt_at(
        SCHEDULE,
        attempts_in_round=1,
        round_started_at=START,
        now=START,
        jitter=0.5,
        retry_after=5.0,
    )
    assert when == START + SCHEDULE[0]


@pytest.mark.parametrize("retry_after", [0.0, -30.0])
def test_non_positive_retry_after_is_ignored(retry_after: float) -> None:
    """A zero or negative Retry-After leaves the scheduled time as it is."""
    when = retry.next_attempt_at(
        SCHEDULE,
        attempts_in_round=1,
        round_started_at=START,
        now=START,
        jitter=0.5,
        retry_after=retry_after,
    )
    assert when == START + SCHEDULE[0]


@pytest.mark.parametrize("attempts", range(1, len(SCHEDULE) + 1))
def test_retry_after_never_pushes_past_the_last_slot(attempts: int) -> None:
    """A Retry-After beyond the schedule is honoured only up to its last slot."""
    when = retry.next_attempt_at(
        SCHEDULE,
        attempts_in_round=attempts,
        round_started_at=START,
        now=START + 10.0,
        jitter=0.5,
        retry_after=30 * 86400.0,
    )
    assert when == START + SCHEDULE[-1]


def test_retry_after_does_not_give_extra_attempts() -> None:
    """Even with a Retry-After, an exhausted schedule gives up."""
    when = retry.next_attempt_at(
        SCHEDULE,
        attempts_in_round=len(SCHEDULE) + 1,
        round_started_at=START,
        now=START,
        jitter=0.5,
        retry_after=60.0,
    )
    assert when is None


@st.composite
def _schedules(draw: st.DrawFn) -> tuple[float, ...]:
    offsets = draw(
        st.lists(
            st.floats(min_value=0.001, max_value=retry.MAX_OFFSET),
            min_size=1,
            max_size=8,
            unique=True,
        )
    )
    return tuple(sorted(offsets))


_JITTER = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(
    schedule=_schedules(),
    start=st.floats(min_value=0.0, max_value=2e9),
    jitters=st.lists(_JITTER, min_size=9, max_size=9),
    delays=st.lists(st.floats(min_value=0.0, max_value=3600.0), min_size=9, max_size=9),
    retry_afters=st.lists(
        st.none() | st.floats(min_value=-60.0, max_value=3 * 86400.0), min_size=9, max_size=9
    ),
)
def test_successive_retries_are_non_decreasing_and_bounded_by_the_last_slot(
    schedule: tuple[float, ...],
    start: float,
    jitters: list[float],
    delays: list[float],
    retry_afters: list[float | None],
) -> None:
    """For any valid schedule and jitter, retries never go back in time nor past the last slot."""
    assert retry.validate(schedule) is None
    last = start + schedule[-1]
    now = start
    previous = start
    attempts = 1
    while True:
        when = retry.next_attempt_at(
            schedule,
            attempts_in_round=attempts,
            round_started_at=start,
            now=now,
            jitter=jitters[attempts - 1],
            retry_after=retry_afters[attempts - 1],
        )
        if when is None:
            break
        assert when >= now
        assert when >= previous
        if now <= last:
            assert when <= last
        previous = when
        # The attempt runs at its time, fails, and is recorded a little later.
        now = when + delays[attempts - 1]
        attempts += 1
    assert attempts == len(schedule) + 1


@given(schedule=_schedules(), start=st.floats(min_value=0.0, max_value=1e9), jitter=_JITTER)
def test_any_slot_lands_within_its_jitter_band_when_nothing_is_overdue(
    schedule: tuple[float, ...], start: float, jitter: float
) -> None:
    """With now at the round start, each slot lands within a tenth of its gap, by the last slot."""
    for slot in range(len(schedule)):
        when = retry.next_attempt_at(
            schedule, attempts_in_round=slot + 1, round_started_at=start, now=start, jitter=jitter
        )
        assert when is not None
        allowed = retry.JITTER_FRACTION * _gap(schedule, slot)
        tolerance = 1e-9 * (start + schedule[-1])
        assert abs(when - (start + schedule[slot])) <= allowed + tolerance
        assert when <= start + schedule[-1]


@pytest.mark.parametrize(
    "schedule",
    [
        SCHEDULE,
        (0.1, 0.2, 0.5),
        (0.001,),
        (1.0, retry.MAX_OFFSET),
        (),
    ],
)
def test_validate_accepts_increasing_positive_schedules_up_to_a_day(
    schedule: tuple[float, ...],
) -> None:
    """Positive, strictly increasing offsets of at most 24 h (sub-second too) are usable."""
    assert retry.validate(schedule) is None


@pytest.mark.parametrize(
    ("schedule", "index"),
    [
        ((0.0,), "[0]"),
        ((-5.0, 10.0), "[0]"),
        ((10.0, -5.0), "[1]"),
        ((60.0, 0.0), "[1]"),
    ],
)
def test_validate_rejects_non_positive_offsets(schedule: tuple[float, ...], index: str) -> None:
    """An offset of zero or less is refused, naming its index."""
    problem = retry.validate(schedule)
    assert problem is not None
    assert problem.startswith(index)


@pytest.mark.parametrize(
    ("schedule", "index"),
    [
        ((60.0, 60.0), "[1]"),
        ((60.0, 30.0), "[1]"),
        ((10.0, 20.0, 30.0, 25.0), "[3]"),
    ],
)
def test_validate_rejects_offsets_that_do_not_increase(
    schedule: tuple[float, ...], index: str
) -> None:
    """Each offset must be later than the one before: offsets count from the first attempt."""
    problem = retry.validate(schedule)
    assert problem is not None
    assert problem.startswith(index)
    assert "later" in problem


@pytest.mark.parametrize(
    ("schedule", "index"),
    [((retry.MAX_OFFSET + 1,), "[0]"), ((60.0, 2 * retry.MAX_OFFSET), "[1]"), ((math.inf,), "[0]")],
)
def test_validate_rejects_offsets_beyond_24_hours(schedule: tuple[float, ...], index: str) -> None:
    """No slot may lie more than 24 h after the first attempt."""
    problem = retry.validate(schedule)
    assert problem is not None
    assert problem.startswith(index)
    assert "maximum" in problem


def test_validate_rejects_nan_offsets() -> None:
    """A NaN offset is not a usable schedule (every comparison with NaN is false)."""
    assert retry.validate((math.nan,)) is not None
    assert retry.validate((60.0, math.nan)) is not None
