"""GroupCommit: concurrent submissions share write calls, and each caller gets its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from common.group_commit import GroupCommit

# Guards against a hang; no outcome depends on it.
TIMEOUT = 5.0


class Boom(Exception):
    """The write failed."""


class GatedWriter:
    """A write function that holds its first call until released, so submissions pile up behind it.

    Results are ``item * 10``; ``fail_calls`` lists the call numbers (1-based) that raise Boom,
    and a call holding any of ``fail_items`` raises Boom too.
    """

    def __init__(self, fail_calls: Sequence[int] = (), fail_items: Sequence[int] = ()) -> None:
        self.calls: list[list[int]] = []
        self.first_started = asyncio.Event()
        self.release = asyncio.Event()
        self._fail_calls = set(fail_calls)
        self._fail_items = set(fail_items)

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        number = len(self.calls)
        if number == 1:
            self.first_started.set()
            await self.release.wait()
        if number in self._fail_calls:
            raise Boom(f"call {number}")
        if self._fail_items.intersection(items):
            raise Boom(f"call {number} holds a failing item")
        return [item * 10 for item in items]


async def _queue_behind(
    group: GroupCommit[int, int], submissions: Sequence[Sequence[int]]
) -> list[asyncio.Task[list[int]]]:
    """Starts one task per submission and returns once every one of them has queued its items.

    ``submit`` queues synchronously before its first await, so a task that has
    recorded itself and entered ``submit`` in the same step has queued.
    """
    queued: list[int] = []
    all_queued = asyncio.Event()

    async def submitter(index: int, items: Sequence[int]) -> list[int]:
        queued.append(index)
        if len(queued) == len(submissions):
            all_queued.set()
        return await group.submit(items)

    tasks = [asyncio.create_task(submitter(i, items)) for i, items in enumerate(submissions)]
    await all_queued.wait()
    return tasks


async def _blocked_group(
    writer: GatedWriter, max_items: int = 100
) -> tuple[GroupCommit[int, int], asyncio.Task[list[int]]]:
    """A GroupCommit whose writer is busy with a first submission of [0]."""
    group = GroupCommit(writer, max_items)
    first = asyncio.create_task(group.submit([0]))
    await writer.first_started.wait()
    return group, first


async def test_concurrent_submissions_are_merged_into_fewer_writes() -> None:
    """Submissions queued while a write is running go together in the next single write."""
    writer = GatedWriter()
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        tasks = await _queue_behind(group, [[1, 2], [3], [4, 5, 6], [7]])
        writer.release.set()
        await asyncio.gather(first, *tasks)
        await group.close()
    assert writer.calls == [[0], [1, 2, 3, 4, 5, 6, 7]]


async def test_each_caller_gets_exactly_its_own_results_in_order() -> None:
    """Results of a merged write are split back per submission, in item order."""
    writer = GatedWriter()
    submissions = [[1, 2], [3], [4, 5, 6], [7]]
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        tasks = await _queue_behind(group, submissions)
        writer.release.set()
        results = await asyncio.gather(*tasks)
        assert await first == [0]
        await group.close()
    assert results == [[item * 10 for item in items] for items in submissions]


async def test_a_lingering_writer_lets_a_later_submission_share_the_write() -> None:
    """With a linger, a submission made after the writer took the first one still goes in
    the same write; without one, the idle writer wrote the first alone at once."""
    calls: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    # Far longer than the one loop step between the two submissions.
    group = GroupCommit(write, 10, linger=0.5)
    async with asyncio.timeout(TIMEOUT):
        first = group.enqueue([1])
        await asyncio.sleep(0)  # The writer's first step: it takes [1], then lingers.
        second = group.enqueue([2])
        assert list(await asyncio.gather(first, second)) == [[1], [2]]
        await group.close()
    assert calls == [[1, 2]]


async def test_a_writer_lingering_only_when_busy_writes_a_lone_submission_at_once() -> None:
    """Nothing was waiting when its last write ended: the next submission is written without
    the linger (an hour here, which would outlast the test's timeout), and so is one made a
    loop step after it."""
    calls: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    group = GroupCommit(write, 10, linger=3600.0, linger_when_idle=False)
    async with asyncio.timeout(TIMEOUT):
        first = group.enqueue([1])
        await asyncio.sleep(0)  # The writer's first step: it takes [1] and writes it.
        second = group.enqueue([2])
        assert list(await asyncio.gather(first, second)) == [[1], [2]]
        await group.close()
    assert calls == [[1], [2]]


async def test_a_writer_lingering_only_when_busy_lingers_after_a_busy_write() -> None:
    """[2] queued while [1] was being written, so the writer lingers once it takes [2], and
    [3], made after that, shares its write; without the linger [2] went alone."""
    writer = GatedWriter()
    # Far longer than the loop steps between taking [2] and submitting [3].
    group = GroupCommit(writer, 10, linger=0.5, linger_when_idle=False)
    async with asyncio.timeout(TIMEOUT):
        first = group.enqueue([1])
        await writer.first_started.wait()  # Written at once: the writer was idle.
        second = group.enqueue([2])
        writer.release.set()
        # Its writer set this result, then took [2] and began to linger, in one step.
        assert await first == [10]
        third = group.enqueue([3])
        assert list(await asyncio.gather(second, third)) == [[20], [30]]
        await group.close()
    assert writer.calls == [[1], [2, 3]]


async def test_empty_submission_returns_nothing_without_writing() -> None:
    """Submitting no items answers [] and does not call write."""
    writer = GatedWriter()
    group = GroupCommit(writer, 10)
    assert await group.submit([]) == []
    await group.close()
    assert writer.calls == []


async def test_submission_larger_than_max_items_is_written_whole() -> None:
    """A submission is never split, even when it alone exceeds max_items."""
    calls: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        calls.append(list(items))
        return items

    group = GroupCommit(write, 2)
    async with asyncio.timeout(TIMEOUT):
        assert await group.submit([1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]
        await group.close()
    assert calls == [[1, 2, 3, 4, 5]]


async def test_queued_submissions_are_never_split_across_writes() -> None:
    """However max_items cuts the queue, every submission's items land in one write call."""
    writer = GatedWriter()
    submissions = [[1], [2, 3, 4], [5, 6], [7], [8, 9, 10]]
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer, max_items=2)
        tasks = await _queue_behind(group, submissions)
        writer.release.set()
        await asyncio.gather(first, *tasks)
        await group.close()
    for items in submissions:
        assert any(
            call[i : i + len(items)] == items for call in writer.calls for i in range(len(call))
        )
    assert sorted(item for call in writer.calls for item in call) == list(range(11))


async def test_a_batch_stops_taking_submissions_once_it_holds_max_items() -> None:
    """When the queued items reach max_items, the rest wait for the next write."""
    writer = GatedWriter()
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer, max_items=2)
        tasks = await _queue_behind(group, [[1, 2], [3], [4]])
        writer.release.set()
        await asyncio.gather(first, *tasks)
        await group.close()
    assert writer.calls == [[0], [1, 2], [3, 4]]


async def test_a_failing_submission_fails_alone_and_the_others_of_its_batch_are_written() -> None:
    """When a shared write fails, each submission is written again on its own: only the one
    that fails alone gets the exception, the others get their results."""
    writer = GatedWriter(fail_items=[3])
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        tasks = await _queue_behind(group, [[1], [2, 3], [4, 5], [6]])
        writer.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert await first == [0]
        await group.close()
    assert outcomes[0] == [10]
    assert isinstance(outcomes[1], Boom)
    assert outcomes[2:] == [[40, 50], [60]]
    assert writer.calls == [[0], [1, 2, 3, 4, 5, 6], [1], [2, 3], [4, 5], [6]]


async def test_write_error_that_persists_reaches_every_caller_and_later_writes_work() -> None:
    """A write that fails for all (the database is down) fails each submission alone too, and
    the writer keeps serving new submissions."""
    writer = GatedWriter(fail_calls=[2, 3, 4])
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        tasks = await _queue_behind(group, [[1], [2, 3]])
        writer.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert await first == [0]
        assert all(isinstance(outcome, Boom) for outcome in outcomes)
        assert await group.submit([4]) == [40]
        await group.close()
    assert writer.calls == [[0], [1, 2, 3], [1], [2, 3], [4]]


async def test_write_error_on_a_lone_submission_reaches_its_caller() -> None:
    """The simplest case: one caller, one failing write, the caller sees the exception."""
    writer = GatedWriter(fail_calls=[1])
    group = GroupCommit(writer, 10)
    async with asyncio.timeout(TIMEOUT):
        writer.release.set()
        with pytest.raises(Boom):
            await group.submit([1])
        assert await group.submit([2]) == [20]
        await group.close()


async def test_cancelled_caller_does_not_break_the_others() -> None:
    """A queued caller that gives up is cancelled alone; its batch still writes and answers."""
    writer = GatedWriter()
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        keep_a, dropped, keep_b = await _queue_behind(group, [[1], [2], [3]])
        dropped.cancel()
        writer.release.set()
        assert await keep_a == [10]
        assert await keep_b == [30]
        assert await first == [0]
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert await group.submit([4]) == [40]
        await group.close()
    # The cancelled caller's items were already queued and are written anyway.
    assert writer.calls == [[0], [1, 2, 3], [4]]


async def test_cancelling_the_caller_whose_write_is_running_does_not_stop_the_writer() -> None:
    """The writer is its own task, so cancelling the caller that started it leaves it running."""
    writer = GatedWriter()
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        (waiting,) = await _queue_behind(group, [[1]])
        first.cancel()
        writer.release.set()
        assert await waiting == [10]
        with pytest.raises(asyncio.CancelledError):
            await first
        await group.close()
    assert writer.calls == [[0], [1]]


async def test_close_flushes_what_is_queued() -> None:
    """close() returns only after every queued submission has been written and answered."""
    writer = GatedWriter()
    async with asyncio.timeout(TIMEOUT):
        group, first = await _blocked_group(writer)
        tasks = await _queue_behind(group, [[1], [2, 3]])
        closing = asyncio.create_task(group.close())
        writer.release.set()
        await closing
        assert writer.calls == [[0], [1, 2, 3]]
        assert await asyncio.gather(first, *tasks) == [[0], [10], [20, 30]]


async def test_group_works_again_after_close() -> None:
    """A submission after close() starts a new writer instead of hanging."""
    writer = GatedWriter()
    writer.release.set()
    group = GroupCommit(writer, 10)
    async with asyncio.timeout(TIMEOUT):
        assert await group.submit([1]) == [10]
        await group.close()
        assert await group.submit([2]) == [20]
        await group.close()
    assert writer.calls == [[1], [2]]


async def test_close_without_submissions_returns() -> None:
    """Closing a group that never wrote anything is a no-op."""
    group: GroupCommit[int, int] = GroupCommit(GatedWriter(), 10)
    async with asyncio.timeout(TIMEOUT):
        await group.close()
