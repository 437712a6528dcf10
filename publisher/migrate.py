"""Schema migrations: which revision a database is at, and bringing it to the code's.

The publisher checks at start-up that its database is at the head revision
(``ensure_current``); ``webhook-publisher migrate`` upgrades it (``upgrade``).
Only an empty embedded SQLite database is created at start-up: replicas sharing
PostgreSQL would race to create it, and a schema change there is an operator's call.

Alembic's commands are synchronous and the migration environment runs its own event
loop, so each command runs in a worker thread and can be awaited from a running loop.

    WebhooksError
     └── SchemaMismatch
          ├── SchemaBehind   the database needs ``webhook-publisher migrate``
          └── SchemaAhead    the database was migrated by a newer publisher
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from common import db, errors, log

logger = logging.getLogger("publisher.migrate")

SCRIPT_LOCATION = pathlib.Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version"
# The revision whose tables are those ``metadata.create_all`` made before migrations existed.
BASELINE = "0001"

# PostgreSQL: one migration of a database at a time. Replicas deployed together may each run
# ``webhook-publisher migrate`` as they start; two at once would both create the first tables
# (one fails), or both build and drop the same index CONCURRENTLY, each outside a transaction,
# until one fails to move the revision the other already moved. A session lock, so that it
# outlives the commits of those index builds; the key is "whmigrat" in ASCII.
MIGRATION_LOCK_KEY = 0x7768_6D69_6772_6174
_TAKE_MIGRATION_TURN = sa.select(sa.func.pg_try_advisory_lock(MIGRATION_LOCK_KEY))
# How often a migration waiting for its turn asks again.
TURN_POLL_SECONDS = 0.5


class SchemaMismatch(errors.WebhooksError):
    """The database's schema is not the one this publisher was built for."""

    def __init__(self, message: str, *, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(message)


class SchemaBehind(SchemaMismatch):
    """The database's schema is older than this publisher's; migrate it first."""


class SchemaAhead(SchemaMismatch):
    """The database's schema is newer than this publisher's."""


def alembic_config(url: str) -> Config:
    """Alembic's configuration for the database at ``url``; there is no ``alembic.ini``."""
    # Passed as an attribute, not as ``sqlalchemy.url``: the ini parser reads ``%`` in a
    # password as interpolation.
    config = Config(attributes={"database_url": url})
    config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    return config


def head() -> str:
    """The newest revision of the script directory."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations in {SCRIPT_LOCATION}")
    return revision


async def current(url: str) -> str | None:
    """The revision the database is at; None for an empty or unmigrated database."""
    revision, _tables = await _inspect(url)
    return revision


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrates the database up to ``revision``, creating the schema in an empty one.

    Raises SchemaAhead, changing nothing, when a newer publisher migrated it.
    """
    at = await current(url)
    if at is not None and not _is_known(at):
        raise _ahead(url, at)
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def stamp(url: str, revision: str) -> None:
    """Records that the database is at ``revision`` without running any migration.

    For databases whose tables were created before migrations existed (see ``BASELINE``).
    """
    await asyncio.to_thread(command.stamp, alembic_config(url), revision)


async def ensure_current(url: str, *, create_if_empty: bool) -> None:
    """Returns if the database is at head; creates an empty one if allowed; raises otherwise."""
    revision, tables = await _inspect(url)
    target = head()
    if revision == target:
        return
    shown = make_url(url).render_as_string(hide_password=True)
    migrate = f"webhook-publisher migrate --database-url {shown}"
    if revision is None and tables - {VERSION_TABLE}:
        raise SchemaBehind(
            f"the database {shown} has tables but no schema revision: it was created before "
            f"schema migrations existed, and its tables are those of revision {BASELINE}. "
            f"Back it up, record that with `{migrate} --stamp {BASELINE}`, then upgrade it "
            f"to revision {target} with `{migrate}`",
            current=None,
            head=target,
        )
    if revision is None:
        if create_if_empty:
            await upgrade(url)
            return
        raise SchemaBehind(
            f"the database {shown} is empty and this publisher needs schema revision "
            f"{target}: create it with `{migrate}`",
            current=None,
            head=target,
        )
    if not _is_known(revision):
        raise _ahead(url, revision)
    raise SchemaBehind(
        f"the database {shown} is at schema revision {revision} and this publisher needs "
        f"{target}: upgrade it with `{migrate}`",
        current=revision,
        head=target,
    )


def take_turn(connection: sa.Connection) -> None:
    """Waits until no other migration runs on this PostgreSQL database; the turn is held
    until ``connection`` closes. SQLite's migrations hold the database file's lock instead.

    It asks again and again rather than waiting in the lock: a statement waiting holds a
    snapshot, which the running migration's CREATE INDEX CONCURRENTLY waits for in turn,
    and PostgreSQL ends one of the two as a deadlock. Between questions no transaction
    is open.
    """
    if connection.dialect.name != "postgresql":
        return
    waited = False
    while True:
        taken = connection.scalar(_TAKE_MIGRATION_TURN)
        connection.commit()
        if taken:
            return
        if not waited:
            log.event(logger, "migration_waiting", logging.WARNING, reason="another one runs")
            waited = True
        time.sleep(TURN_POLL_SECONDS)


def _ahead(url: str, revision: str) -> SchemaAhead:
    shown = make_url(url).render_as_string(hide_password=True)
    return SchemaAhead(
        f"the database {shown} is at schema revision {revision}, which this publisher "
        f"does not know (its newest is {head()}): a newer publisher migrated it; run "
        "that version or a later one",
        current=revision,
        head=head(),
    )


async def _inspect(url: str) -> tuple[str | None, set[str]]:
    """The database's revision and the names of its tables."""
    engine = create_async_engine(db.normalize_url(url), poolclass=sa.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_read_state)
    finally:
        await engine.dispose()


def _read_state(connection: sa.Connection) -> tuple[str | None, set[str]]:
    revision = MigrationContext.configure(connection).get_current_revision()
    return revision, set(sa.inspect(connection).get_table_names())


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(SCRIPT_LOCATION)


def _is_known(revision: str) -> bool:
    try:
        _scripts().get_revision(revision)
    except CommandError:
        return False
    return True
