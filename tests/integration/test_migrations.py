"""The publisher's migrations on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from common import db
from publisher import __main__ as publisher_main
from publisher import migrate, model, schema
from publisher.store import Store
from tests.support import WAITING_IN_THIS_DATABASE, eventually

POSTGRES_URL = os.environ.get(
    "WEBHOOKS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
POSTGRES_REQUIRED = os.environ.get("WEBHOOKS_REQUIRE_POSTGRES") == "1"
APP_TABLES = set(schema.metadata.tables)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'publisher.db'}"


@pytest.fixture
async def postgres_database_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    admin_url = make_url(POSTGRES_URL).set(drivername="postgresql")
    try:
        admin = await asyncpg.connect(admin_url.render_as_string(hide_password=False), timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        shown = admin_url.render_as_string(hide_password=True)
        reason = f"PostgreSQL at {shown} is unreachable: {error}"
        if POSTGRES_REQUIRED:
            pytest.fail(reason)
        pytest.skip(f"{reason} (set WEBHOOKS_REQUIRE_POSTGRES=1 to fail instead)")
    name = f"webhooks_mig_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest) -> str:
    """An empty database: an SQLite file, then a PostgreSQL database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_database_url"
    url: str = request.getfixturevalue(fixture)
    return url


async def _run_sync(url: str, work: Any) -> Any:
    engine = create_async_engine(db.normalize_url(url), poolclass=sa.NullPool)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(work)
    finally:
        await engine.dispose()


async def _schema_differences(url: str) -> list[Any]:
    def compare(connection: sa.Connection) -> list[Any]:
        # Server defaults too, which replicas of the previous version count on for the
        # columns they do not know; on PostgreSQL only, since Alembic reads SQLite's ''
        # back as a different default.
        opts = {"compare_server_default": connection.dialect.name == "postgresql"}
        differences: list[Any] = compare_metadata(
            MigrationContext.configure(connection, opts=opts), schema.metadata
        )
        return differences

    differences: list[Any] = await _run_sync(url, compare)
    return differences


async def _table_names(url: str) -> set[str]:
    names: set[str] = await _run_sync(url, lambda c: set(sa.inspect(c).get_table_names()))
    return names


async def _index_predicates(url: str) -> dict[str, str | bool | None]:
    """Each index's WHERE clause: its text on SQLite; on PostgreSQL, which rewrites it, whether
    there is one (``compare_metadata`` does not compare them)."""

    def reflect(connection: sa.Connection) -> dict[str, str | bool | None]:
        dialect = connection.dialect.name
        inspector = sa.inspect(connection)
        return {
            index["name"]: _predicate(
                dialect, index.get("dialect_options", {}).get(f"{dialect}_where")
            )
            for table in APP_TABLES
            for index in inspector.get_indexes(table)
            # PostgreSQL lists each unique constraint as an index too.
            if index["name"] is not None and "duplicates_constraint" not in index
        }

    predicates: dict[str, str | bool | None] = await _run_sync(url, reflect)
    return predicates


def _predicate(dialect: str, where: Any) -> str | bool | None:
    if dialect == "sqlite":
        return None if where is None else str(where)
    return where is not None


def _expected_index_predicates(dialect: str) -> dict[str, str | bool | None]:
    return {
        str(index.name): _predicate(dialect, index.dialect_options[dialect]["where"])
        for table in schema.metadata.tables.values()
        for index in table.indexes
    }


async def _downgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, migrate.alembic_config(url), revision)


async def test_upgrade_creates_schema_matching_metadata(empty_database_url: str) -> None:
    """Upgrading an empty database to head yields exactly ``publisher.schema.metadata``, so a
    schema.py change without a migration fails here."""
    url = empty_database_url
    assert await migrate.current(url) is None

    await migrate.upgrade(url)

    assert await migrate.current(url) == migrate.head()
    assert await _schema_differences(url) == []
    dialect = make_url(url).get_backend_name()
    assert await _index_predicates(url) == _expected_index_predicates(dialect)


async def test_downgrade_to_base_drops_every_table(empty_database_url: str) -> None:
    """Every revision's downgrade undoes its upgrade: at base only Alembic's table is left, and
    upgrading again gives the head schema back."""
    url = empty_database_url
    await migrate.upgrade(url)

    await _downgrade(url, "base")

    assert await _table_names(url) == {migrate.VERSION_TABLE}
    assert await migrate.current(url) is None
    await migrate.upgrade(url)
    assert await _schema_differences(url) == []


async def test_0002_keeps_rows_and_fills_new_columns(empty_database_url: str) -> None:
    """Upgrading a populated 0001 database to 0002 keeps every row and gives the new columns
    their defaults."""
    url = empty_database_url
    await migrate.upgrade(url, "0001")
    await _run_sync(url, _insert_0001_rows)

    await migrate.upgrade(url, "0002")

    def read(connection: sa.Connection) -> tuple[Any, ...]:
        subscriber = connection.execute(
            sa.text("SELECT failing_since, disable_notice_due FROM subscribers")
        ).one()
        delivery = connection.execute(
            sa.text("SELECT last_outcome, notified_at FROM deliveries")
        ).one()
        attempts = connection.execute(sa.text("SELECT count(*) FROM attempts")).scalar_one()
        return tuple(subscriber), tuple(delivery), attempts

    subscriber, delivery, attempts = await _run_sync(url, read)
    assert subscriber == (None, False)
    assert delivery == ("", None)
    assert attempts == 1


# Every revision but the newest, oldest first.
_EARLIER = [
    script.revision
    for script in reversed(list(ScriptDirectory(str(migrate.SCRIPT_LOCATION)).walk_revisions()))
][:-1]


@pytest.mark.parametrize("revision", _EARLIER)
async def test_a_database_with_rows_upgrades_from_each_revision(
    empty_database_url: str, revision: str
) -> None:
    """A database at any earlier revision, holding a subscriber, an event, a dead-lettered
    delivery and its attempt, upgrades to head with the head's schema, and the store reads
    them all back."""
    url = empty_database_url
    await migrate.upgrade(url, "0001")
    await _run_sync(url, _insert_0001_rows)
    await migrate.upgrade(url, revision)

    await migrate.upgrade(url)

    assert await _schema_differences(url) == []
    store = Store(db.create_engine(url))
    try:
        subscriber = await store.get_subscriber("sub_1")
        delivery = await store.get_delivery("dlv_1")
        event = await store.get_event("evt_1")
    finally:
        await store.close()
    assert (subscriber.spec.max_in_flight, subscriber.previous_secret) == (0, "")
    assert delivery.state == model.DeliveryState.FAILED
    assert [(attempt.number, attempt.error) for attempt in delivery.log] == [(1, "boom")]
    assert event.payload == b"{}"


def _insert_0001_rows(connection: sa.Connection) -> None:
    connection.execute(
        sa.text(
            "INSERT INTO subscribers (id, name, endpoint, protocol, event_types, retry_schedule,"
            " contact_email, secret, body_format, status_url, state, state_reason, created_at,"
            " updated_at) VALUES ('sub_1', 'n', 'e', 'grpc', '[]', '[]', 'a@b.c', 's', 'raw',"
            " '', 'active', '', 1, 1)"
        )
    )
    connection.execute(
        sa.text(
            "INSERT INTO events (id, type, payload, content_type, created_at)"
            " VALUES ('evt_1', 't', :payload, 'application/json', 1)"
        ),
        {"payload": b"{}"},
    )
    connection.execute(
        sa.text(
            "INSERT INTO deliveries (id, event_id, subscriber_id, state, attempts,"
            " round_attempts, next_attempt_at, created_at, updated_at, last_error)"
            " VALUES ('dlv_1', 'evt_1', 'sub_1', 'failed', 1, 1, 1, 1, 1, 'boom')"
        )
    )
    connection.execute(
        sa.text(
            "INSERT INTO attempts (delivery_id, number, started_at, duration, outcome,"
            " status_code, error) VALUES ('dlv_1', 1, 1, 0.5, 'failed', 500, 'boom')"
        )
    )


async def test_ensure_current_creates_empty_database_when_allowed(
    empty_database_url: str,
) -> None:
    """``ensure_current(create_if_empty=True)`` migrates an empty database to head."""
    url = empty_database_url

    await migrate.ensure_current(url, create_if_empty=True)

    assert await migrate.current(url) == migrate.head()
    assert await _schema_differences(url) == []


async def test_ensure_current_refuses_empty_database_when_not_allowed(
    empty_database_url: str,
) -> None:
    """Without ``create_if_empty`` an empty database raises SchemaBehind naming the migrate
    command, and is left empty."""
    url = empty_database_url

    with pytest.raises(migrate.SchemaBehind) as raised:
        await migrate.ensure_current(url, create_if_empty=False)

    assert raised.value.current is None
    assert raised.value.head == migrate.head()
    assert f"webhook-publisher migrate --database-url {url}" in str(raised.value)
    assert migrate.head() in str(raised.value)
    assert await _table_names(url) == set()


async def test_ensure_current_returns_at_head(empty_database_url: str) -> None:
    """A database at head passes ``ensure_current`` unchanged, whatever ``create_if_empty``."""
    url = empty_database_url
    await migrate.upgrade(url)

    await migrate.ensure_current(url, create_if_empty=False)
    await migrate.ensure_current(url, create_if_empty=True)

    assert await migrate.current(url) == migrate.head()


async def test_ensure_current_refuses_database_behind_head(empty_database_url: str) -> None:
    """A database at an older revision raises SchemaBehind naming both revisions and the migrate
    command, even when ``create_if_empty``; running that upgrade clears it."""
    url = empty_database_url
    await migrate.upgrade(url)
    await _downgrade(url, "-1")
    older = await migrate.current(url)
    assert older is not None
    assert older != migrate.head()

    with pytest.raises(migrate.SchemaBehind) as raised:
        await migrate.ensure_current(url, create_if_empty=True)

    assert (raised.value.current, raised.value.head) == (older, migrate.head())
    message = str(raised.value)
    assert older in message
    assert migrate.head() in message
    assert f"webhook-publisher migrate --database-url {url}" in message
    await migrate.upgrade(url)
    await migrate.ensure_current(url, create_if_empty=False)


async def test_ensure_current_treats_database_at_base_as_empty(empty_database_url: str) -> None:
    """A database downgraded to base (only Alembic's empty table left) is created again when
    allowed and refused otherwise."""
    url = empty_database_url
    await migrate.upgrade(url)
    await _downgrade(url, "base")

    with pytest.raises(migrate.SchemaBehind):
        await migrate.ensure_current(url, create_if_empty=False)
    await migrate.ensure_current(url, create_if_empty=True)

    assert await migrate.current(url) == migrate.head()


async def test_ensure_current_refuses_database_ahead_of_head(empty_database_url: str) -> None:
    """A database at a revision this code does not know (a newer publisher migrated it) raises
    SchemaAhead, never SchemaBehind: migrating would not help."""
    url = empty_database_url
    await migrate.upgrade(url)
    await _run_sync(
        url, lambda c: c.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
    )

    with pytest.raises(migrate.SchemaAhead) as raised:
        await migrate.ensure_current(url, create_if_empty=True)

    assert (raised.value.current, raised.value.head) == ("ffff", migrate.head())
    assert "ffff" in str(raised.value)


async def test_ensure_current_refuses_tables_made_before_migrations(
    empty_database_url: str,
) -> None:
    """Tables made by ``create_all`` with no revision raise SchemaBehind naming the stamp and
    upgrade commands, even when ``create_if_empty``; once stamped the database passes."""
    url = empty_database_url
    await _run_sync(url, schema.metadata.create_all)

    with pytest.raises(migrate.SchemaBehind) as raised:
        await migrate.ensure_current(url, create_if_empty=True)

    assert raised.value.current is None
    message = str(raised.value)
    migrate_command = f"webhook-publisher migrate --database-url {url}"
    assert f"`{migrate_command} --stamp {migrate.BASELINE}`" in message
    assert f"`{migrate_command}`" in message
    assert await migrate.current(url) is None
    # These tables came from today's metadata, so they are at head rather than at the baseline.
    await migrate.stamp(url, "head")
    await migrate.ensure_current(url, create_if_empty=False)


async def test_schema_mismatch_message_hides_the_password(postgres_database_url: str) -> None:
    """The command in a SchemaBehind message shows the database URL with its password hidden."""
    url = make_url(postgres_database_url)
    if url.password is None:
        # Trust authentication ignores a password, so one can be added to check that it is hidden.
        url = url.set(password="hunter2-secret")
    password = str(url.password)
    with_password = url.render_as_string(hide_password=False)

    with pytest.raises(migrate.SchemaBehind) as raised:
        await migrate.ensure_current(with_password, create_if_empty=False)

    message = str(raised.value)
    assert password not in message
    assert url.render_as_string(hide_password=True) in message


async def test_upgrade_leaves_the_running_event_loop_free(sqlite_url: str) -> None:
    """``upgrade`` awaited on a running loop runs Alembic (and env.py's own ``asyncio.run``) in a
    worker thread: the loop keeps running other tasks meanwhile, and the migration completes."""
    started = threading.Event()
    released = threading.Event()
    real_upgrade = command.upgrade

    def upgrade_once_released(*args: Any, **kwargs: Any) -> None:
        started.set()
        # Only this loop sets ``released``: were Alembic running on it, this would wait out.
        if not released.wait(timeout=60):
            raise AssertionError("the event loop was blocked while Alembic ran")
        real_upgrade(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(command, "upgrade", upgrade_once_released)
        upgrading = asyncio.create_task(migrate.upgrade(sqlite_url))
        await asyncio.to_thread(started.wait, 60)
        released.set()
        await upgrading

    assert await migrate.current(sqlite_url) == migrate.head()


# The migrations that build an index, the revision before each, and a row its table takes
# while it runs: the write of a publisher of the previous version, still running (the rows
# of _insert_0001_rows are there).
_WRITES_DURING_INDEXING = {
    "0004": (
        "0003",
        "INSERT INTO deliveries (id, event_id, subscriber_id, state, attempts, round_attempts,"
        " next_attempt_at, created_at, updated_at, last_error)"
        " VALUES ('dlv_{n}', 'evt_1', 'sub_1', 'pending', 0, 0, 1, 1, 1, '')",
    ),
    "0005": (
        "0004",
        "INSERT INTO events (id, type, payload, content_type, created_at)"
        " VALUES ('evt_{n}', 't', '\\x7b7d', 'application/json', 1)",
    ),
    "0008": (
        "0007",
        "INSERT INTO deliveries (id, event_id, subscriber_id, state, attempts, round_attempts,"
        " next_attempt_at, created_at, updated_at, last_error, last_outcome)"
        " VALUES ('dlv_{n}', 'evt_1', 'sub_1', 'pending', 0, 0, 1, 1, 1, '', 'uncertain')",
    ),
    "0009": (
        "0008",
        "INSERT INTO deliveries (id, event_id, subscriber_id, state, attempts, round_attempts,"
        " next_attempt_at, created_at, updated_at, last_error, last_outcome)"
        " VALUES ('dlv_{n}', 'evt_1', 'sub_1', 'failed', 0, 0, 1, 1, 1, '', 'failed')",
    ),
}


@pytest.mark.parametrize("revision", sorted(_WRITES_DURING_INDEXING))
async def test_building_an_index_leaves_its_table_writable(
    postgres_database_url: str, revision: str
) -> None:
    """PostgreSQL: while a migration builds an index, a write to its table goes through.

    A transaction that wrote to the table is open as the migration starts, so the build
    waits for it. A plain CREATE INDEX waiting for its lock queues every later write
    behind it (here: the second write runs into its lock_timeout); CONCURRENTLY does not.
    """
    url = postgres_database_url
    admin_url = make_url(url).set(drivername="postgresql").render_as_string(False)
    before, write = _WRITES_DURING_INDEXING[revision]
    await migrate.upgrade(url, "0001")
    await _run_sync(url, _insert_0001_rows)
    await migrate.upgrade(url, before)
    first = await asyncpg.connect(admin_url)
    second = await asyncpg.connect(admin_url)
    try:
        open_writer = first.transaction()
        await open_writer.start()
        await first.execute(write.format(n=2))
        upgrading = asyncio.create_task(migrate.upgrade(url, revision))

        async def migration_waits() -> bool:
            waiting = await second.fetchval(WAITING_IN_THIS_DATABASE)
            return bool(waiting) or upgrading.done()

        await eventually(migration_waits, what="the migration waiting for the open writer")
        assert not upgrading.done(), upgrading
        await second.execute("SET lock_timeout = '10s'")
        await second.execute(write.format(n=3))

        await open_writer.commit()
        await asyncio.wait_for(upgrading, 60)
    finally:
        await first.close()
        await second.close()
    assert await migrate.current(url) == revision
    invalid = await _run_sync(
        url,
        lambda connection: connection.execute(
            sa.text("SELECT count(*) FROM pg_index WHERE NOT indisvalid")
        ).scalar_one(),
    )
    assert invalid == 0


async def test_an_index_build_that_broke_off_is_built_again(postgres_database_url: str) -> None:
    """PostgreSQL: a concurrent build that fails leaves an invalid index of its name behind.
    Running the migration again replaces it with a valid one (here the broken one is a
    unique index that duplicates made fail)."""
    url = postgres_database_url
    await migrate.upgrade(url, "0001")
    await _run_sync(url, _insert_0001_rows)
    await migrate.upgrade(url, "0004")
    admin_url = make_url(url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(_WRITES_DURING_INDEXING["0005"][1].format(n=2))  # Type 't' twice.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_events_created ON events (type)"
            )
        assert await conn.fetchval(
            "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'ix_events_created'::regclass"
        )

        await migrate.upgrade(url, "0005")

        valid, definition = await conn.fetchrow(
            "SELECT indisvalid, pg_get_indexdef(indexrelid) FROM pg_index"
            " WHERE indexrelid = 'ix_events_created'::regclass"
        )
    finally:
        await conn.close()
    assert valid
    assert definition.endswith("USING btree (created_at)")


async def test_a_migration_waits_for_one_already_running(postgres_database_url: str) -> None:
    """PostgreSQL: replicas deployed together may each run ``webhook-publisher migrate``. One
    that starts while another holds the migration turn waits, creating nothing, with no
    transaction open (which the other one's concurrent index builds would wait for), and
    migrates once the turn is free."""
    url = postgres_database_url
    admin_url = make_url(url).set(drivername="postgresql").render_as_string(False)
    other = await asyncpg.connect(admin_url)
    observer = await asyncpg.connect(admin_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", migrate.MIGRATION_LOCK_KEY)
        upgrading = asyncio.create_task(migrate.upgrade(url))

        async def asked_for_turn() -> bool:
            asked = await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND datname = current_database() AND state = 'idle'"
                " AND query LIKE '%pg_try_advisory_lock%'"
            )
            return bool(asked) or upgrading.done()

        await eventually(asked_for_turn, what="the migration asking for its turn")
        assert not upgrading.done(), upgrading
        assert await _table_names(url) == set()

        await other.execute("SELECT pg_advisory_unlock($1)", migrate.MIGRATION_LOCK_KEY)
        await asyncio.wait_for(upgrading, 60)
    finally:
        await other.close()
        await observer.close()
    assert await migrate.current(url) == migrate.head()
    assert await _schema_differences(url) == []


async def test_migrate_commands_started_together_all_succeed(postgres_database_url: str) -> None:
    """PostgreSQL: three ``webhook-publisher migrate`` of one empty database at once take
    turns: each ends at head, none fails on the tables or the revision another one wrote
    meanwhile. (Processes, since Alembic's ``op`` and ``context`` are global to one.)"""
    url = postgres_database_url
    command_line = [sys.executable, "-m", "publisher", "migrate", "--database-url", url]

    runs = await asyncio.gather(
        *(
            asyncio.to_thread(
                subprocess.run, command_line, capture_output=True, text=True, timeout=120
            )
            for _ in range(3)
        )
    )

    failed = [run.stderr[-2000:] for run in runs if run.returncode]
    assert failed == []
    assert await migrate.current(url) == migrate.head()
    assert await _schema_differences(url) == []


def test_migrate_command_refuses_a_database_ahead_of_it(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``webhook-publisher migrate`` of a database a newer publisher migrated exits 1 with
    one line naming both revisions (no traceback), and leaves the database as it was."""
    asyncio.run(migrate.upgrade(sqlite_url))
    ahead = sa.text("UPDATE alembic_version SET version_num = 'ffff'")
    asyncio.run(_run_sync(sqlite_url, lambda c: c.execute(ahead)))

    with pytest.raises(SystemExit) as exited:
        publisher_main.main(["migrate", "--database-url", sqlite_url])

    assert exited.value.code == 1

    error = capsys.readouterr().err
    assert error.startswith("webhook-publisher migrate: "), error
    assert "ffff" in error
    assert migrate.head() in error
    assert "Traceback" not in error
    assert asyncio.run(migrate.current(sqlite_url)) == "ffff"
