"""Each subscriber's pending deliveries in due order, for claims that skip full subscribers.

The index on (subscriber_id, state) gains next_attempt_at and id, so it still
serves lookups by subscriber and state.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from publisher.migrations import indexes

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    indexes.create(
        "ix_deliveries_subscriber_due",
        "deliveries",
        ["subscriber_id", "state", "next_attempt_at", "id"],
    )
    indexes.drop("ix_deliveries_subscriber_state", "deliveries")


def downgrade() -> None:
    indexes.create("ix_deliveries_subscriber_state", "deliveries", ["subscriber_id", "state"])
    indexes.drop("ix_deliveries_subscriber_due", "deliveries")
