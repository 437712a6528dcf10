"""Dead-lettered deliveries by id, for ListDeliveries with state FAILED.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from publisher.migrations import indexes

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# schema.FAILED as it is today: a migration keeps its own copy, as the schema may change.
_FAILED = "state = 'failed'"


def upgrade() -> None:
    indexes.create("ix_deliveries_failed", "deliveries", ["id"], where=_FAILED)


def downgrade() -> None:
    indexes.drop("ix_deliveries_failed", "deliveries")
