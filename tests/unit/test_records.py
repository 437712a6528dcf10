"""Records (common.records): what frozen dataclasses gave the code, without their cost at run
time. The type checker still refuses an assignment to a field; values compare and hash by
their fields and have no per-instance dict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mypy import api as mypy_api

from publisher import model
from publisher import transport as tx
from tests.support import make_attempt


def _attempt(delivery_id: str = "dlv-1") -> tx.Attempt:
    return make_attempt(
        "127.0.0.1:1", key=b"k" * 32, subscriber_id="sub-1", payload=b"{}", delivery_id=delivery_id
    )


def test_records_compare_and_hash_by_their_fields_as_frozen_dataclasses_do() -> None:
    assert _attempt() == _attempt()
    assert len({_attempt(), _attempt(), _attempt("dlv-2")}) == 2
    assert dataclasses.replace(_attempt(), delivery_id="dlv-2") == _attempt("dlv-2")
    assert not hasattr(_attempt(), "__dict__")


def test_records_build_without_the_frozen_dataclass_setattr_per_field() -> None:
    # What the speed comes from: a frozen dataclass's __init__ sets every field through
    # object.__setattr__; a record's assigns them.
    for record_type in (tx.Attempt, tx.Result, model.Claim, model.Event, model.NewEvent):
        assert not vars(record_type)["__dataclass_params__"].frozen


@pytest.mark.parametrize(
    "statement",
    ["attempt.attempt = 2", "event.payload = b''"],
)
def test_the_type_checker_refuses_an_assignment_to_a_field(tmp_path: Path, statement: str) -> None:
    source = tmp_path / "assigns.py"
    source.write_text(
        "from publisher import model\n"
        "from publisher import transport as tx\n"
        "def change(attempt: tx.Attempt, event: model.Event) -> None:\n"
        f"    {statement}\n"
    )
    out, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--follow-imports=silent", str(source)]
    )
    assert status == 1, out
    assert "read-only" in out, out
