"""Failure tracking: how long a subscriber has been failing, and who was told about what.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscribers") as batch:
        batch.add_column(sa.Column("failing_since", sa.Double(), nullable=True))
        batch.add_column(sa.Column("last_notified_at", sa.Double(), nullable=True))
        batch.add_column(
            sa.Column("disable_notice_due", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(
            sa.Column("last_outcome", sa.String(10), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("notified_at", sa.Double(), nullable=True))
        batch.create_index(
            "ix_deliveries_unnotified",
            ["subscriber_id"],
            sqlite_where=sa.text("state = 'failed' AND notified_at IS NULL"),
            postgresql_where=sa.text("state = 'failed' AND notified_at IS NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_unnotified")
        batch.drop_column("notified_at")
        batch.drop_column("last_outcome")
    with op.batch_alter_table("subscribers") as batch:
        batch.drop_column("disable_notice_due")
        batch.drop_column("last_notified_at")
        batch.drop_column("failing_since")
