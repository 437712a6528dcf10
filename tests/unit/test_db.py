"""The embedded store refuses an SQLite too old for its SQL, saying which it found."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from common import db


def test_an_sqlite_older_than_the_store_needs_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 32, 3))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.32.3")
    with pytest.raises(RuntimeError, match=r"SQLite is 3\.32\.3; .* needs 3\.33\.0 or newer"):
        db.create_sqlite_thread_engine(f"sqlite:///{tmp_path / 'old.db'}")


def test_this_pythons_sqlite_is_new_enough(tmp_path: Path) -> None:
    db.create_sqlite_thread_engine(f"sqlite:///{tmp_path / 'new.db'}").dispose()
