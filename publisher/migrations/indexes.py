"""Index changes that leave the table writable on PostgreSQL, for migrations of live databases.

A plain CREATE INDEX holds a lock that blocks writes to its table for the whole
build, and DROP INDEX one that blocks reads too; while either waits for its lock,
every write queued behind it waits as well. On a deliveries table of millions of
rows that stops emits and records for as long as the build takes, while
publishers of the previous version are still running. PostgreSQL's CONCURRENTLY
forms do not block them, but cannot run inside a transaction, so they run in an
autocommit block. A build that was interrupted leaves an invalid index behind,
so creating first drops any index of that name: running the migration again
builds it afresh. SQLite's migrations run with the publisher stopped (it holds the
file alone), and there the plain forms are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


def create(name: str, table: str, columns: Sequence[str], *, where: str | None = None) -> None:
    """``where``: SQL of the rows a partial index covers, the same on both databases."""
    rows = None if where is None else sa.text(where)
    if _is_postgresql():
        with op.get_context().autocommit_block():
            op.drop_index(name, table_name=table, if_exists=True, postgresql_concurrently=True)
            op.create_index(
                name, table, list(columns), postgresql_concurrently=True, postgresql_where=rows
            )
    else:
        op.create_index(name, table, list(columns), sqlite_where=rows)


def drop(name: str, table: str) -> None:
    if _is_postgresql():
        with op.get_context().autocommit_block():
            op.drop_index(name, table_name=table, if_exists=True, postgresql_concurrently=True)
    else:
        op.drop_index(name, table_name=table)


def _is_postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"
