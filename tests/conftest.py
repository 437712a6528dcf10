"""Shared fixtures: a fresh database per test (SQLite file or PostgreSQL database), a running
publisher on port 0 with a client stub, and a scriptable gRPC subscriber."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc.aio
import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy.engine import make_url

from common import db
from common.gen.webhooks.v1 import publisher_pb2_grpc
from publisher import migrate
from publisher.app import PublisherApp
from publisher.settings import Settings
from publisher.store import Store
from tests.support import FakeSubscriber, refusing_port

# Examples take milliseconds, but on a machine shared with other jobs one can stall past
# Hypothesis's default deadline (200 ms) and fail the test as Flaky with nothing wrong.
# Speed is measured by `make bench`; property tests check properties.
hypothesis_settings.register_profile("grpc-webhooks", deadline=None)
hypothesis_settings.load_profile("grpc-webhooks")

# The local server this machine kind runs; where there is none the tests skip, saying why.
POSTGRES_URL = os.environ.get(
    "WEBHOOKS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
POSTGRES_REQUIRED = os.environ.get("WEBHOOKS_REQUIRE_POSTGRES") == "1"
TEST_VARIABLES = frozenset({"WEBHOOKS_TEST_POSTGRES_URL", "WEBHOOKS_REQUIRE_POSTGRES"})


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both programs take their flags' defaults from WEBHOOKS_* variables; one left in the
    shell that runs the tests (WEBHOOKS_SECRET after trying the README, say) would change
    what every test starts, in this process and in the ones it spawns."""
    for name in list(os.environ):
        if name.startswith("WEBHOOKS_") and name not in TEST_VARIABLES:
            monkeypatch.delenv(name)


async def _postgres_admin() -> asyncpg.Connection:
    if not POSTGRES_URL:
        reason = "WEBHOOKS_TEST_POSTGRES_URL is not set"
        if POSTGRES_REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    url = make_url(POSTGRES_URL).set(drivername="postgresql")
    try:
        connection: asyncpg.Connection = await asyncpg.connect(
            url.render_as_string(hide_password=False), timeout=5
        )
    except (OSError, asyncpg.PostgresError) as error:
        reason = f"PostgreSQL at {POSTGRES_URL} is unreachable: {error}"
        if POSTGRES_REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    return connection


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    admin = await _postgres_admin()
    name = f"webhooks_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        # A shared database is migrated on purpose (the embedded SQLite one creates itself).
        await migrate.upgrade(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """The publisher's store alone, on the test's database."""
    await migrate.ensure_current(database_url, create_if_empty=True)
    store = Store(db.create_engine(database_url))
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each delivery test runs once on an SQLite file and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'publisher.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


StartPublisher = Callable[..., Awaitable[PublisherApp]]


@pytest.fixture
async def start_publisher(database_url: str) -> AsyncIterator[StartPublisher]:
    """Starts publishers in this process (port 0); all are stopped after the test."""
    apps: list[PublisherApp] = []

    async def start(**overrides: Any) -> PublisherApp:
        values: dict[str, Any] = {"port": 0, "database_url": database_url, "delivery_timeout": 5.0}
        settings = Settings(**{**values, **overrides})
        app = PublisherApp(settings)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in reversed(apps):
        await app.stop()


@pytest.fixture
async def publisher(start_publisher: StartPublisher) -> PublisherApp:
    return await start_publisher()


@pytest.fixture
async def stub(
    publisher: PublisherApp,
) -> AsyncIterator[publisher_pb2_grpc.PublisherServiceAsyncStub]:
    async with grpc.aio.insecure_channel(publisher.address) as channel:
        yield publisher_pb2_grpc.PublisherServiceStub(channel)


@pytest.fixture
async def subscriber() -> AsyncIterator[FakeSubscriber]:
    fake = FakeSubscriber()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def nowhere() -> Iterator[str]:
    """The endpoint of a subscriber that is never up: a port of this test's that refuses
    every connection."""
    with refusing_port() as port:
        yield f"127.0.0.1:{port}"
