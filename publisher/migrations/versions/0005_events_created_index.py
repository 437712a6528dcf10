"""Events by creation time, for retention.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from publisher.migrations import indexes

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    indexes.create("ix_events_created", "events", ["created_at"])


def downgrade() -> None:
    indexes.drop("ix_events_created", "events")
