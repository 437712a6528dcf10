"""Alembic's entry point: runs the migrations on an async engine.

``publisher.migrate`` calls Alembic's commands in a worker thread, so ``asyncio.run`` here
starts a fresh event loop in that thread even when the caller's loop is running.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from common import db
from publisher import migrate, schema


def _run(connection: sa.Connection) -> None:
    # Before Alembic reads the revision: a migration that waited finds the other's result.
    migrate.take_turn(connection)
    context.configure(
        connection=connection,
        target_metadata=schema.metadata,
        # Batch operations recreate the table where SQLite cannot ALTER it and are plain
        # ALTERs on PostgreSQL, so a drafted revision runs on both whichever one drafted it.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    # Not db.create_engine: it turns SQLite's foreign keys on, and a batch operation that
    # recreates a referenced table would then cascade its deletes into the referencing rows.
    engine = create_async_engine(db.normalize_url(url), poolclass=sa.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")
asyncio.run(_run_async(context.config.attributes["database_url"]))
