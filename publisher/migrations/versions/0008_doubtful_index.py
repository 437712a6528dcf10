"""Pending deliveries whose last attempt was uncertain, for the reconciliation sweep.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from publisher.migrations import indexes

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# schema.DOUBTFUL as it is today: a migration keeps its own copy, as the schema may change.
_DOUBTFUL = "state = 'pending' AND last_outcome = 'uncertain'"


def upgrade() -> None:
    indexes.create("ix_deliveries_doubtful", "deliveries", ["next_attempt_at"], where=_DOUBTFUL)


def downgrade() -> None:
    indexes.drop("ix_deliveries_doubtful", "deliveries")
