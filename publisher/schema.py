"""The publisher's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Times are float seconds since the epoch: portable, indexable and exact enough.
A claimed delivery's ``next_attempt_at`` is set to its lease expiry, so one
index on due pending deliveries finds both new work and work whose owner died.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

subscribers = sa.Table(
    "subscribers",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("endpoint", sa.String(2048), nullable=False),
    sa.Column("protocol", sa.String(10), nullable=False),
    # JSON lists: read and written whole, never queried into.
    sa.Column("event_types", sa.Text, nullable=False),
    sa.Column("retry_schedule", sa.Text, nullable=False),
    sa.Column("contact_email", sa.String(320), nullable=False),
    sa.Column("secret", sa.String(200), nullable=False),
    sa.Column("body_format", sa.String(10), nullable=False),
    sa.Column("status_url", sa.String(2048), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    # Set by the first failure after a success; a subscriber failing for too long is disabled.
    sa.Column("failing_since", sa.Double, nullable=True),
    # When the last dead-letter digest went out: at most one per notify window.
    sa.Column("last_notified_at", sa.Double, nullable=True),
    # Disabled automatically, and the people have not been told yet.
    sa.Column("disable_notice_due", sa.Boolean, nullable=False, server_default=sa.false()),
    # When a replica took that notice to send it; NULL: nobody is sending it.
    sa.Column("disable_notice_taken_at", sa.Double, nullable=True),
    # During a rotation the old secret signs too, until it expires.
    sa.Column("previous_secret", sa.String(200), nullable=True),
    sa.Column("previous_secret_expires_at", sa.Double, nullable=True),
    # Its own limit on sends in flight; 0: the publisher's.
    sa.Column("max_in_flight", sa.Integer, nullable=False, server_default="0"),
)

events = sa.Table(
    "events",
    metadata,
    # Insertion order, for paging through events in the order they were emitted.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.String(200), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
    # Retention finds what expired through it without reading the rest.
    sa.Index("ix_events_created", "created_at"),
)

# The rows of ix_deliveries_doubtful and ix_deliveries_failed; queries spell these values
# inline so that both databases see that they imply them.
DOUBTFUL = "state = 'pending' AND last_outcome = 'uncertain'"
FAILED = "state = 'failed'"

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("event_id", sa.String(40), sa.ForeignKey("events.id"), nullable=False),
    sa.Column(
        "subscriber_id",
        sa.String(40),
        sa.ForeignKey("subscribers.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("state", sa.String(10), nullable=False),
    # Every claim bumps it: the attempt number and the fencing token of the lease.
    sa.Column("attempts", sa.Integer, nullable=False),
    # The retry schedule counts from the first attempt of a round; Redeliver starts a new round.
    sa.Column("round_attempts", sa.Integer, nullable=False),
    sa.Column("round_started_at", sa.Double, nullable=True),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("lease_owner", sa.String(80), nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    # The outcome of the latest attempt; "uncertain" ones are asked about before a resend.
    sa.Column("last_outcome", sa.String(10), nullable=False, server_default=""),
    # When a failed (dead-lettered) delivery was included in an email; NULL = not yet.
    sa.Column("notified_at", sa.Double, nullable=True),
    sa.Index(
        "ix_deliveries_due",
        "next_attempt_at",
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    ),
    sa.Index("ix_deliveries_event", "event_id"),
    # The reconciliation sweep's: the few pending deliveries whose last attempt was uncertain,
    # found without walking every pending one (240-290 ms a sweep at 1M pending on SQLite,
    # on the thread claims and records wait for).
    sa.Index(
        "ix_deliveries_doubtful",
        "next_attempt_at",
        sqlite_where=sa.text(DOUBTFUL),
        postgresql_where=sa.text(DOUBTFUL),
    ),
    # The dead letters by id, as ListDeliveries pages through them (state FAILED): without
    # it a page walked every delivery, 1 s at 1M on SQLite, on the thread emits wait for.
    sa.Index(
        "ix_deliveries_failed",
        "id",
        sqlite_where=sa.text(FAILED),
        postgresql_where=sa.text(FAILED),
    ),
    # A subscriber's deliveries by state, and its pending ones in due order: a claim that
    # skips full subscribers takes each other one's oldest due deliveries through it. The
    # id makes that order one that only this index gives (see statements).
    sa.Index("ix_deliveries_subscriber_due", "subscriber_id", "state", "next_attempt_at", "id"),
    sa.Index(
        "ix_deliveries_unnotified",
        "subscriber_id",
        sqlite_where=sa.text("state = 'failed' AND notified_at IS NULL"),
        postgresql_where=sa.text("state = 'failed' AND notified_at IS NULL"),
    ),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column(
        "delivery_id",
        sa.String(40),
        sa.ForeignKey("deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("duration", sa.Double, nullable=False),
    sa.Column("outcome", sa.String(10), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Index("ix_attempts_delivery", "delivery_id", "number"),
)
