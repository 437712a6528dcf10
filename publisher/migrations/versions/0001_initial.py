"""The publisher's first tables: subscribers, events, their deliveries and each attempt.

These are also the tables ``metadata.create_all`` made before migrations existed, so a
database created that way is stamped at this revision (``publisher.migrate.BASELINE``).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# 64-bit keys on PostgreSQL; SQLite's INTEGER PRIMARY KEY is the 64-bit rowid already.
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "subscribers",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("protocol", sa.String(10), nullable=False),
        sa.Column("event_types", sa.Text(), nullable=False),
        sa.Column("retry_schedule", sa.Text(), nullable=False),
        sa.Column("contact_email", sa.String(320), nullable=False),
        sa.Column("secret", sa.String(200), nullable=False),
        sa.Column("body_format", sa.String(10), nullable=False),
        sa.Column("status_url", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("seq", _BIG_ID, primary_key=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("event_id", sa.String(40), sa.ForeignKey("events.id"), nullable=False),
        sa.Column(
            "subscriber_id",
            sa.String(40),
            sa.ForeignKey("subscribers.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("round_attempts", sa.Integer(), nullable=False),
        sa.Column("round_started_at", sa.Double(), nullable=True),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("lease_owner", sa.String(80), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
    )
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["next_attempt_at"],
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index("ix_deliveries_event", "deliveries", ["event_id"])
    op.create_index("ix_deliveries_subscriber_state", "deliveries", ["subscriber_id", "state"])
    op.create_table(
        "attempts",
        sa.Column("id", _BIG_ID, primary_key=True),
        sa.Column(
            "delivery_id",
            sa.String(40),
            sa.ForeignKey("deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("duration", sa.Double(), nullable=False),
        sa.Column("outcome", sa.String(10), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
    )
    op.create_index("ix_attempts_delivery", "attempts", ["delivery_id", "number"])


def downgrade() -> None:
    # Dropping a table drops its indexes.
    op.drop_table("attempts")
    op.drop_table("deliveries")
    op.drop_table("events")
    op.drop_table("subscribers")
