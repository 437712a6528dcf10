"""Row ids: their shape, their order, and no two alike across threads and forks."""

from __future__ import annotations

import os
import re
import threading
import time

from publisher import ids

SHAPE = re.compile(r"evt_[0-9a-f]{12}[0-9a-f]{20}")


def test_an_id_is_the_prefix_the_milliseconds_and_twenty_random_hex_digits() -> None:
    before = time.time_ns() // 1_000_000
    value = ids.new_id("evt")
    after = time.time_ns() // 1_000_000
    assert SHAPE.fullmatch(value)
    assert before <= int(value[4:16], 16) <= after


def test_ids_made_later_sort_later() -> None:
    first = ids.new_id("dlv")
    # The order is by millisecond: the next id is made in a later one.
    while time.time_ns() // 1_000_000 <= int(first[4:16], 16):
        pass
    assert ids.new_id("dlv") > first


def test_many_ids_from_many_threads_are_all_different() -> None:
    """More than one pool of random bytes each, drawn at once from eight threads."""
    made: list[list[str]] = [[] for _ in range(8)]

    def make(into: list[str]) -> None:
        into.extend(ids.new_id("dlv") for _ in range(2_000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [value[16:] for into in made for value in into]
    assert len(set(every)) == len(every) == 16_000


def test_a_forked_child_does_not_hand_out_its_parents_random_bytes() -> None:
    ids.new_id("evt")  # The pool holds bytes the parent has not used yet.
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's side)
        os.write(write, ids.new_id("evt")[16:].encode())
        os._exit(0)
    os.close(write)
    try:
        in_child = os.read(read, 100).decode()
    finally:
        os.close(read)
        os.waitpid(child, 0)
    in_parent = ids.new_id("evt")[16:]
    assert len(in_child) == len(in_parent) == 20
    assert in_child != in_parent
