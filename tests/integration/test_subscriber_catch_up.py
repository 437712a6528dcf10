"""Catch-up end to end in one process: a real publisher (SQLite file and PostgreSQL, via the
parametrised ``database_url`` fixture) whose pushes cannot reach the subscriber, and the reference
subscriber pulling what it missed from the ListEvents feed into its inbox."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2

from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher import store as store_module
from publisher.app import PublisherApp
from subscriber import app, inbox, settings
from tests.conftest import StartPublisher
from tests.support import eventually

if TYPE_CHECKING:
    Stub = publisher_pb2_grpc.PublisherServiceAsyncStub

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
MATCHING = ["order.created", "order.paid", "order.shipped"]
NOT_MATCHING = ["user.created", "invoice.sent"]
INTERVAL = "0.2"


class Handled:
    """A handler that remembers what it was given, in order, to count effects."""

    def __init__(self) -> None:
        self.entries: list[inbox.Entry] = []

    async def __call__(self, entry: inbox.Entry) -> None:
        self.entries.append(entry)

    def event_ids(self) -> list[str]:
        return [entry.event_id for entry in self.entries]


class StartSubscriber(Protocol):
    async def __call__(
        self,
        publisher: str,
        subscriber_id: str,
        handler: Handled,
        *,
        secrets: tuple[str, ...] = (SECRET,),
        interval: str = INTERVAL,
    ) -> app.SubscriberApp: ...


@pytest.fixture
def subscriber_database_url(database_url: str, tmp_path: Path) -> str:
    """The subscriber's own SQLite file, or the test's PostgreSQL database (no table in common)."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'subscriber.db'}"
    return database_url


@pytest.fixture
async def start_subscriber(subscriber_database_url: str) -> AsyncIterator[StartSubscriber]:
    """Starts reference subscribers with catch-up on; all are stopped after the test."""
    started: list[app.SubscriberApp] = []

    async def start(
        publisher: str,
        subscriber_id: str,
        handler: Handled,
        *,
        secrets: tuple[str, ...] = (SECRET,),
        interval: str = INTERVAL,
    ) -> app.SubscriberApp:
        config = settings.parse(
            [
                "--listen=127.0.0.1:0",
                "--http-listen=off",
                f"--database-url={subscriber_database_url}",
                *(f"--secret={secret}" for secret in secrets),
                f"--audience={subscriber_id}",
                f"--catch-up-publisher={publisher}",
                f"--catch-up-interval={interval}",
            ]
        )
        subscriber = app.SubscriberApp(config, handler=handler)
        started.append(subscriber)
        await subscriber.start()
        return subscriber

    yield start
    for subscriber in started:
        # Stopping twice is harmless, so tests may stop one early to restart it.
        await subscriber.stop()


@pytest.fixture
async def publisher(start_publisher: StartPublisher) -> PublisherApp:
    return await start_publisher()


@pytest.fixture
async def stub(publisher: PublisherApp) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(publisher.address) as channel:
        yield publisher_pb2_grpc.PublisherServiceStub(channel)


async def register_unreachable(stub: Stub, endpoint: str) -> str:
    """A gRPC subscriber for order.* at ``endpoint``, where pushes all fail, retried only in
    an hour."""
    retry = duration_pb2.Duration(seconds=3600)
    response = await stub.RegisterSubscriber(
        publisher_pb2.RegisterSubscriberRequest(
            name="offline",
            endpoint=endpoint,
            protocol=publisher_pb2.PROTOCOL_GRPC,
            event_types=["order.*"],
            retry_schedule=[retry],
            secret=SECRET,
        )
    )
    subscriber_id: str = response.subscriber.id
    return subscriber_id


async def emit(stub: Stub, event_types: list[str]) -> list[str]:
    """Emits one event of each type, in order; their ids."""
    ids = []
    for event_type in event_types:
        response = await stub.Emit(
            publisher_pb2.EmitRequest(
                type=event_type, payload=f'{{"type":"{event_type}"}}'.encode()
            )
        )
        ids.append(response.event_id)
    return ids


def handled_all(
    subscriber: app.SubscriberApp, event_ids: list[str]
) -> Callable[[], Awaitable[list[inbox.Receipt] | None]]:
    """A check for ``eventually``: the receipts once every one of the events is processed."""

    async def check() -> list[inbox.Receipt] | None:
        found = [await subscriber.inbox.status(event_id) for event_id in event_ids]
        done = [r for r in found if r is not None and r.state is inbox.State.PROCESSED]
        return done if len(done) == len(event_ids) else None

    return check


async def test_missed_matching_events_are_pulled_once_each_in_emission_order(
    publisher: PublisherApp, stub: Stub, start_subscriber: StartSubscriber, nowhere: str
) -> None:
    """Events whose pushes failed reach the inbox through the feed: only the matching ones,
    recorded and handled once each, in the order they were emitted."""
    subscriber_id = await register_unreachable(stub, nowhere)
    emitted = await emit(
        stub, [MATCHING[0], NOT_MATCHING[0], MATCHING[1], NOT_MATCHING[1], MATCHING[2]]
    )
    wanted = [emitted[0], emitted[2], emitted[4]]
    handled = Handled()

    subscriber = await start_subscriber(publisher.address, subscriber_id, handled)

    found = await eventually(handled_all(subscriber, wanted), what="matching events handled")
    assert handled.event_ids() == wanted
    assert [entry.event_type for entry in handled.entries] == MATCHING
    assert handled.entries[0].payload == b'{"type":"order.created"}'
    assert await subscriber.inbox.count() == 3
    assert [receipt.receive_count for receipt in found] == [1, 1, 1]
    received_at = [receipt.received_at for receipt in found]
    assert received_at == sorted(received_at)
    for skipped in (emitted[1], emitted[3]):
        assert await subscriber.inbox.status(skipped) is None


async def test_restart_keeps_the_cursor_and_later_events_are_pulled_too(
    publisher: PublisherApp, stub: Stub, start_subscriber: StartSubscriber, nowhere: str
) -> None:
    """A restarted subscriber goes on from its stored cursor: the first batch is not pulled
    again (receive counts stay 1, no second effect) and a batch emitted later arrives."""
    subscriber_id = await register_unreachable(stub, nowhere)
    first = await emit(stub, MATCHING)
    before = Handled()
    subscriber = await start_subscriber(publisher.address, subscriber_id, before)
    await eventually(handled_all(subscriber, first), what="first batch handled")
    await subscriber.stop()

    after = Handled()
    restarted = await start_subscriber(publisher.address, subscriber_id, after)
    second = await emit(stub, [NOT_MATCHING[0], "order.refunded", "order.closed"])
    wanted = [second[1], second[2]]

    # One round pages from the cursor in feed order, so once the second batch is in,
    # any re-pull of the first batch would already have happened.
    await eventually(handled_all(restarted, wanted), what="second batch handled")
    assert before.event_ids() == first
    assert after.event_ids() == wanted
    assert await restarted.inbox.count() == 5
    assert await restarted.inbox.duplicates() == 0
    found = await eventually(handled_all(restarted, first + wanted))
    assert [receipt.receive_count for receipt in found] == [1] * 5


async def test_catch_up_goes_on_across_empty_pages_to_an_event_far_ahead(
    publisher: PublisherApp,
    stub: Stub,
    start_subscriber: StartSubscriber,
    nowhere: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With many events for others between two of its own, more than one call of the feed
    looks through, the subscriber follows the moving cursor across the empty pages in
    between and pulls the far one too."""
    monkeypatch.setattr(store_module, "FEED_STRETCH", 2)
    monkeypatch.setattr(store_module, "FEED_STRETCHES_PER_CALL", 1)
    subscriber_id = await register_unreachable(stub, nowhere)
    near = await emit(stub, [MATCHING[0]])
    await emit(stub, NOT_MATCHING * 5)
    far = await emit(stub, [MATCHING[1]])
    handled = Handled()

    # One round only (the next is an hour away): it must not end at the first empty page.
    subscriber = await start_subscriber(publisher.address, subscriber_id, handled, interval="3600")

    await eventually(handled_all(subscriber, near + far), what="the far event handled")
    assert handled.event_ids() == near + far


async def test_wrong_secret_records_nothing_and_logs_a_configuration_error(
    publisher: PublisherApp,
    stub: Stub,
    start_subscriber: StartSubscriber,
    caplog: pytest.LogCaptureFixture,
    nowhere: str,
) -> None:
    """A token signed with a secret the publisher does not hold is UNAUTHENTICATED: nothing is
    pulled, and the error names the settings to check."""
    subscriber_id = await register_unreachable(stub, nowhere)
    await emit(stub, MATCHING)
    handled = Handled()

    subscriber = await start_subscriber(
        publisher.address, subscriber_id, handled, secrets=(OTHER_SECRET,)
    )

    record = await eventually(
        lambda: _logged(caplog, "catch_up_misconfigured"), what="configuration error logged"
    )
    fields = _fields(record)
    assert record.levelno == logging.ERROR
    assert fields["code"] == "UNAUTHENTICATED"
    assert fields["subscriber_id"] == subscriber_id
    assert "--secret" in fields["reason"]
    assert await subscriber.inbox.count() == 0
    assert handled.entries == []


@pytest.mark.parametrize("new_first", [True, False], ids=["new-secret-first", "old-secret-first"])
async def test_catch_up_goes_on_across_a_rotation_whichever_secret_is_listed_first(
    publisher: PublisherApp,
    stub: Stub,
    start_subscriber: StartSubscriber,
    caplog: pytest.LogCaptureFixture,
    nowhere: str,
    new_first: bool,
) -> None:
    """Given the old and the new secret, the subscriber pulls its feed before RotateSecret and
    after the old secret expired, in either flag order: a refused token is signed again with
    the other secret, which is then kept (one change logged per switch), and no round fails."""
    caplog.set_level(logging.INFO, logger="subscriber.catch_up")
    # The publisher holds SECRET; the rotation gives it OTHER_SECRET.
    subscriber_id = await register_unreachable(stub, nowhere)
    secrets = (OTHER_SECRET, SECRET) if new_first else (SECRET, OTHER_SECRET)
    handled = Handled()
    subscriber = await start_subscriber(publisher.address, subscriber_id, handled, secrets=secrets)

    async def pull_one_at_a_time(event_types: list[str]) -> list[str]:
        """Each event after the first needs a later round, so the kept secret is used too."""
        pulled = []
        for event_type in event_types:
            pulled += await emit(stub, [event_type])
            await eventually(handled_all(subscriber, pulled), what=f"{event_type} handled")
        return pulled

    before = await pull_one_at_a_time(MATCHING[:2])
    no_grace = duration_pb2.Duration(seconds=0)
    await stub.RotateSecret(
        publisher_pb2.RotateSecretRequest(
            subscriber_id=subscriber_id, secret=OTHER_SECRET, previous_valid_for=no_grace
        )
    )
    after = await pull_one_at_a_time(["order.refunded", "order.closed"])

    assert handled.event_ids() == before + after
    changed = [r for r in caplog.records if r.getMessage() == "catch_up_secret_changed"]
    # Listed first, the new secret is refused until RotateSecret; listed second, it is needed
    # once the old one has expired.
    assert [_fields(r)["secret"] for r in changed] == ([2, 1] if new_first else [2])
    assert all(_fields(r)["secrets"] == 2 for r in changed)
    assert await _logged(caplog, "catch_up_misconfigured") is None


class FlakyPublisher:
    """A publisher feed that answers UNAVAILABLE ``failures`` times, then that it is empty."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def ListEvents(
        self,
        request: publisher_pb2.ListEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> publisher_pb2.ListEventsResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")
        return publisher_pb2.ListEventsResponse(next_cursor=request.cursor)


@pytest.fixture
async def flaky_publisher() -> AsyncIterator[tuple[FlakyPublisher, str]]:
    flaky = FlakyPublisher(failures=5)
    server = grpc.aio.server()
    # Only ListEvents: the generated servicer base would ask for every method.
    service = publisher_pb2.DESCRIPTOR.services_by_name["PublisherService"].full_name
    list_events = grpc.unary_unary_rpc_method_handler(
        flaky.ListEvents,
        request_deserializer=publisher_pb2.ListEventsRequest.FromString,
        response_serializer=publisher_pb2.ListEventsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {"ListEvents": list_events})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield flaky, f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_outage_is_logged_once_and_the_recovery_once(
    flaky_publisher: tuple[FlakyPublisher, str],
    start_subscriber: StartSubscriber,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five rounds in a row failing with UNAVAILABLE make one warning, not five; the next
    round that works says so once, and rounds go on."""
    caplog.set_level(logging.INFO, logger="subscriber.catch_up")
    flaky, address = flaky_publisher

    await start_subscriber(address, "sub_flaky", Handled())

    async def round_after_recovery() -> bool:
        # Round 6 succeeded and was logged before round 7 asked.
        return flaky.calls >= 7

    await eventually(round_after_recovery, what="a round after the one that recovered")
    warnings = [r for r in caplog.records if r.getMessage() == "catch_up_unavailable"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert _fields(warnings[0])["code"] == "UNAVAILABLE"
    resumed = [r for r in caplog.records if r.getMessage() == "catch_up_resumed"]
    assert len(resumed) == 1
    assert _fields(resumed[0])["after"] == "UNAVAILABLE"


async def _logged(caplog: pytest.LogCaptureFixture, event: str) -> logging.LogRecord | None:
    return next((r for r in caplog.records if r.getMessage() == event), None)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = record.__dict__["fields"]
    return fields


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param((), "--audience: required with --catch-up-publisher", id="no-audience"),
        pytest.param(
            ("--audience=sub_1", "--catch-up-interval=0"), "--catch-up-interval:", id="interval-0"
        ),
        pytest.param(
            ("--audience=sub_1", "--catch-up-interval=nan"), "--catch-up-interval:", id="nan"
        ),
        pytest.param(
            ("--audience=sub_1", "--catch-up-publisher=nowhere"),
            "--catch-up-publisher:",
            id="not-host-port",
        ),
    ],
)
def test_catch_up_settings_are_refused_naming_the_flag(
    flags: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Catch-up needs the subscriber id (--audience), a positive interval and a HOST:PORT."""
    with pytest.raises(SystemExit) as exited:
        settings.parse([f"--secret={SECRET}", "--catch-up-publisher=127.0.0.1:1", *flags])

    assert exited.value.code != 0
    assert message in capsys.readouterr().err + str(exited.value.code)


def test_catch_up_is_off_by_default_and_on_with_a_publisher() -> None:
    """No --catch-up-publisher: no catch-up; with one: the feed of --audience, every 30 s."""
    assert settings.parse([f"--secret={SECRET}"]).catch_up is None

    config = settings.parse(
        [f"--secret={SECRET}", "--audience=sub_1", "--catch-up-publisher=127.0.0.1:50051"]
    )

    assert config.catch_up == settings.CatchUp(
        publisher="127.0.0.1:50051", subscriber_id="sub_1", interval=30.0, issuer="grpc-webhooks"
    )
