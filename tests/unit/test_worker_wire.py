"""What crosses the pipe to a delivery worker comes out as it went in."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from publisher import transport as tx
from publisher import worker_wire as wire

texts = st.text(max_size=40)
attempts = st.builds(
    tx.Attempt,
    delivery_id=texts,
    attempt=st.integers(1, 1000),
    event_id=texts,
    event_type=texts,
    payload=st.binary(max_size=200),
    content_type=texts,
    created_at=st.floats(0, 4e9),
    subscriber_id=texts,
    endpoint=texts,
    body_format=st.sampled_from(["raw", "form"]),
    keys=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=3).map(tuple),
    issuer=texts,
    timeout=st.floats(0.1, 60),
    status_url=texts,
)
results = st.builds(
    tx.Result,
    outcome=st.sampled_from(tx.Outcome),
    status_code=st.integers(0, 599),
    error=texts,
    retry_after=st.none() | st.floats(0, 86400),
    gone=st.booleans(),
)


@given(attempts)
def test_an_attempt_survives_the_wire(attempt: tx.Attempt) -> None:
    assert wire.attempt_from_wire(wire.attempt_to_wire(attempt)) == attempt


@given(results)
def test_a_result_survives_the_wire(result: tx.Result) -> None:
    assert wire.result_from_wire(wire.result_to_wire(result)) == result


@pytest.mark.parametrize("receipt", list(tx.Receipt))
def test_a_receipt_survives_the_wire(receipt: tx.Receipt) -> None:
    assert wire.receipt_from_wire(receipt.value) is receipt


async def test_frames_arrive_whole_and_in_order_then_the_end_is_an_error() -> None:
    reader = asyncio.StreamReader()
    messages: list[object] = [wire.Options(("10.0.0.0/8",), 5.0, 64, "INFO"), [(1, 2)], []]
    data = b"".join(wire.frame(message) for message in messages)
    # Fed in pieces, as a pipe may hand them over.
    for start in range(0, len(data), 7):
        reader.feed_data(data[start : start + 7])
    reader.feed_eof()
    assert [await wire.read_frame(reader) for _ in messages] == messages
    with pytest.raises(asyncio.IncompleteReadError):
        await wire.read_frame(reader)
