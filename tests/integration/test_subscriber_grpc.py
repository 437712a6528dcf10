"""The subscriber over gRPC: a real server on port 0 and a real SQLite file, tokens from PyJWT."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.gen.webhooks.v1 import event_pb2, subscriber_pb2, subscriber_pb2_grpc
from subscriber import app, handlers, inbox
from tests.subscriber_apps import Handled, SubscriberApps, delivery_token
from tests.support import eventually

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
AUDIENCE = "sub_grpc"
ROOT = Path(__file__).absolute().parents[2]
DEADLINE_SECONDS = 30.0

# The async stub type exists only for type checkers.
Stub: TypeAlias = "subscriber_pb2_grpc.SubscriberServiceAsyncStub"


class StartSubscriber(Protocol):
    async def __call__(
        self, *flags: str, handler: handlers.Handler | None = None
    ) -> app.SubscriberApp: ...


def token(
    event_id: str,
    payload: bytes,
    *,
    key: bytes = KEY,
    audience: str = AUDIENCE,
    algorithm: str = "HS256",
    issued_ago: int = 0,
    event_type: str = "order.created",
) -> str:
    return delivery_token(
        event_id,
        payload,
        key=key,
        audience=audience,
        algorithm=algorithm,
        issued_ago=issued_ago,
        event_type=event_type,
    )


def request(event_id: str, payload: bytes = b'{"order":1}') -> subscriber_pb2.ReceiveRequest:
    event = event_pb2.Event(
        id=event_id, type="order.created", payload=payload, content_type="application/json"
    )
    event.created_at.GetCurrentTime()
    return subscriber_pb2.ReceiveRequest(event=event, delivery_id="dlv_" + event_id, attempt=1)


def bearer(jwt_token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + jwt_token),)


async def receive(stub: Stub, req: subscriber_pb2.ReceiveRequest) -> bool:
    """Delivers ``req`` with a valid token; True if the subscriber called it a duplicate."""
    metadata = bearer(token(req.event.id, req.event.payload))
    response = await stub.Receive(req, metadata=metadata, timeout=DEADLINE_SECONDS)
    return response.duplicate


@pytest.fixture
def handled() -> Handled:
    return Handled()


@pytest.fixture
async def start_subscriber(tmp_path: Path, handled: Handled) -> AsyncIterator[StartSubscriber]:
    """Starts subscribers on port 0 with a fresh SQLite file each; stops them all afterwards."""
    apps = SubscriberApps(tmp_path)

    async def start(*flags: str, handler: handlers.Handler | None = None) -> app.SubscriberApp:
        return await apps.start(
            "--http-listen=off",
            f"--secret={SECRET}",
            f"--audience={AUDIENCE}",
            *flags,
            handler=handler or handled,
        )

    yield start
    await apps.stop_all()


@pytest.fixture
async def subscriber(start_subscriber: StartSubscriber) -> app.SubscriberApp:
    return await start_subscriber()


@pytest.fixture
async def stub_for() -> AsyncIterator[Callable[[app.SubscriberApp], Stub]]:
    channels: list[grpc.aio.Channel] = []

    def connect(subscriber: app.SubscriberApp) -> Stub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{subscriber.grpc_port}")
        channels.append(channel)
        return subscriber_pb2_grpc.SubscriberServiceStub(channel)

    yield connect
    for channel in channels:
        await channel.close(grace=None)


@pytest.fixture
def stub(subscriber: app.SubscriberApp, stub_for: Callable[[app.SubscriberApp], Stub]) -> Stub:
    return stub_for(subscriber)


async def test_valid_delivery_is_recorded_handled_and_acknowledged_as_new(
    subscriber: app.SubscriberApp, stub: Stub, handled: Handled
) -> None:
    """A signed Receive is stored with its exact payload, handled once, and not a duplicate."""
    assert await receive(stub, request("evt_1", b'{"order":1}')) is False

    assert await subscriber.inbox.count() == 1
    assert [(e.event_id, e.payload, e.delivery_id) for e in handled.entries] == [
        ("evt_1", b'{"order":1}', "dlv_evt_1")
    ]
    receipt = await subscriber.inbox.status("evt_1")
    assert receipt is not None
    assert receipt.state is inbox.State.PROCESSED


async def test_redelivery_is_acknowledged_as_duplicate_without_a_second_effect(
    subscriber: app.SubscriberApp, stub: Stub, handled: Handled
) -> None:
    """The same event delivered twice is OK both times, recorded once and handled once."""
    assert await receive(stub, request("evt_1")) is False
    assert await receive(stub, request("evt_1")) is True

    assert await subscriber.inbox.count() == 1
    assert await subscriber.inbox.duplicates() == 1
    assert len(handled.entries) == 1


async def test_concurrent_deliveries_of_the_same_events_have_one_effect_each(
    subscriber: app.SubscriberApp, stub: Stub, handled: Handled
) -> None:
    """Under concurrency (group commit) each event is new exactly once; the rest are duplicates."""
    events, copies = 30, 10
    requests = [request(f"evt_{n % events}") for n in range(events * copies)]

    duplicates = await asyncio.gather(*(receive(stub, req) for req in requests))

    assert duplicates.count(False) == events
    assert await subscriber.inbox.count() == events
    assert await subscriber.inbox.duplicates() == events * (copies - 1)
    assert sorted(e.event_id for e in handled.entries) == sorted(f"evt_{n}" for n in range(events))


async def test_postgresql_inbox_gives_one_effect_per_event_under_concurrency(
    start_subscriber: StartSubscriber,
    stub_for: Callable[[app.SubscriberApp], Stub],
    handled: Handled,
    postgres_url: str,
) -> None:
    """On PostgreSQL too, concurrent redeliveries are absorbed and a changed body is refused."""
    subscriber = await start_subscriber(f"--database-url={postgres_url}")
    stub = stub_for(subscriber)
    requests = [request(f"evt_{n % 20}") for n in range(100)]

    duplicates = await asyncio.gather(*(receive(stub, req) for req in requests))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await receive(stub, request("evt_0", b'{"order":2}'))

    assert duplicates.count(False) == 20
    assert await subscriber.inbox.count() == 20
    assert await subscriber.inbox.duplicates() == 80
    assert len(handled.entries) == 20
    assert raised.value.code() is grpc.StatusCode.ALREADY_EXISTS


def tampered(req: subscriber_pb2.ReceiveRequest) -> tuple[tuple[str, str], ...]:
    return bearer(token(req.event.id, req.event.payload + b" "))


@pytest.mark.parametrize(
    ("metadata_for", "reason"),
    [
        pytest.param(tampered, "body_sha256 does not match", id="tampered-payload"),
        pytest.param(
            lambda r: bearer(token(r.event.id, r.event.payload, audience="sub_other")),
            "Audience doesn't match",
            id="wrong-audience",
        ),
        pytest.param(
            lambda r: bearer(token(r.event.id, r.event.payload, issued_ago=3600)),
            "expired",
            id="expired",
        ),
        pytest.param(
            lambda r: bearer(token(r.event.id, r.event.payload, algorithm="none")),
            "alg value is not allowed",
            id="alg-none",
        ),
        pytest.param(
            lambda r: bearer(token(r.event.id, r.event.payload, key=os.urandom(32))),
            "Signature verification failed",
            id="other-secret",
        ),
        pytest.param(
            lambda r: bearer(token("evt_other", r.event.payload)),
            "token is for event 'evt_other'",
            id="token-for-another-event",
        ),
        pytest.param(
            lambda r: bearer(token(r.event.id, r.event.payload, event_type="order.deleted")),
            "event type",
            id="token-for-another-type",
        ),
        pytest.param(lambda r: (), "missing authorization", id="missing-metadata"),
        pytest.param(
            lambda r: (("authorization", "Basic dXNlcjpwYXNz"),), "Bearer", id="not-bearer"
        ),
    ],
)
async def test_delivery_without_a_valid_token_is_unauthenticated_and_not_recorded(
    subscriber: app.SubscriberApp,
    stub: Stub,
    handled: Handled,
    metadata_for: Callable[[subscriber_pb2.ReceiveRequest], tuple[tuple[str, str], ...]],
    reason: str,
) -> None:
    """Every way a token can fail ends in UNAUTHENTICATED with a reason, and nothing is stored."""
    req = request("evt_1")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Receive(req, metadata=metadata_for(req), timeout=DEADLINE_SECONDS)

    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert reason in (raised.value.details() or "")
    assert await subscriber.inbox.count() == 0
    assert handled.entries == []


@pytest.mark.parametrize("field", ["id", "type"])
async def test_delivery_missing_an_event_field_is_invalid_argument_naming_it(
    subscriber: app.SubscriberApp, stub: Stub, field: Literal["id", "type"]
) -> None:
    """A signed request without an event id or type is refused, naming the field."""
    req = request("evt_1")
    req.event.ClearField(field)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Receive(
            req, metadata=bearer(token(req.event.id, req.event.payload)), timeout=DEADLINE_SECONDS
        )

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"event.{field}:")
    assert await subscriber.inbox.count() == 0


async def test_event_id_too_long_to_store_is_refused_alone_not_with_its_batch(
    subscriber: app.SubscriberApp, stub: Stub
) -> None:
    """An unstorable event is INVALID_ARGUMENT before it joins a group commit with others."""
    good = [receive(stub, request(f"evt_{n}")) for n in range(20)]
    too_long = receive(stub, request("e" * 256))

    *answers, refused = await asyncio.gather(*good, too_long, return_exceptions=True)

    assert answers == [False] * 20
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.details() or "").startswith("event_id: longer than 255")
    assert await subscriber.inbox.count() == 20


def signed_receive(
    req: subscriber_pb2.ReceiveRequest,
) -> tuple[subscriber_pb2.ReceiveRequest, tuple[tuple[str, str], ...]]:
    """``req`` with a valid token for exactly what it carries, whatever that is."""
    return req, bearer(token(req.event.id, req.event.payload, event_type=req.event.type))


def with_event(**changes: str) -> subscriber_pb2.ReceiveRequest:
    req = request("evt_1")
    for name, value in changes.items():
        if name == "delivery_id":
            req.delivery_id = value
        else:
            setattr(req.event, name, value)
    return req


@pytest.mark.parametrize(
    ("req", "field"),
    [
        pytest.param(with_event(type="t" * 256), "event_type", id="type"),
        pytest.param(with_event(content_type="a/" + "b" * 254), "content_type", id="content-type"),
        pytest.param(with_event(delivery_id="d" * 256), "delivery_id", id="delivery-id"),
    ],
)
async def test_a_field_too_long_to_store_is_invalid_argument_naming_it_and_nothing_is_recorded(
    subscriber: app.SubscriberApp,
    stub: Stub,
    handled: Handled,
    req: subscriber_pb2.ReceiveRequest,
    field: str,
) -> None:
    """Each text field the inbox keeps is checked, not only the event id; a signed request
    that carries one too long is refused naming it, and leaves no receipt behind."""
    req, metadata = signed_receive(req)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Receive(req, metadata=metadata, timeout=DEADLINE_SECONDS)

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}: longer than 255")
    assert await subscriber.inbox.count() == 0
    assert handled.entries == []


async def test_get_status_without_an_event_id_is_invalid_argument(stub: Stub) -> None:
    """A status question must name its event."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetStatus(
            subscriber_pb2.GetStatusRequest(),
            metadata=bearer(token("", b"")),
            timeout=DEADLINE_SECONDS,
        )

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("event_id:")


@pytest.mark.parametrize(
    ("req", "field"),
    [
        pytest.param(with_event(id="evt_\x00"), "event_id", id="event-id"),
        pytest.param(with_event(type="order.\x00"), "event_type", id="type"),
        pytest.param(with_event(content_type="a/b; c=\x00"), "content_type", id="content-type"),
        pytest.param(with_event(delivery_id="dlv_\x00"), "delivery_id", id="delivery-id"),
    ],
)
async def test_a_nul_character_postgresql_cannot_store_is_refused_alone(
    start_subscriber: StartSubscriber,
    stub_for: Callable[[app.SubscriberApp], Stub],
    handled: Handled,
    postgres_url: str,
    req: subscriber_pb2.ReceiveRequest,
    field: str,
) -> None:
    """PostgreSQL refuses NUL in text. A signed request carrying one is INVALID_ARGUMENT
    naming the field, records nothing, and does not fail the deliveries committed with it."""
    subscriber = await start_subscriber(f"--database-url={postgres_url}")
    stub = stub_for(subscriber)
    bad, metadata = signed_receive(req)
    good = [receive(stub, request(f"evt_good_{n}")) for n in range(10)]
    refused = stub.Receive(bad, metadata=metadata, timeout=DEADLINE_SECONDS)

    *answers, outcome = await asyncio.gather(*good, refused, return_exceptions=True)

    assert answers == [False] * 10
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert (outcome.code(), (outcome.details() or "").partition(":")[0]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )
    assert await subscriber.inbox.count() == 10
    assert sorted(e.event_id for e in handled.entries) == sorted(f"evt_good_{n}" for n in range(10))


async def test_same_event_id_with_a_different_payload_is_refused_as_already_existing(
    subscriber: app.SubscriberApp, stub: Stub
) -> None:
    """A second body under a known event id is not the same event: ALREADY_EXISTS, no effect."""
    await receive(stub, request("evt_1", b'{"amount":1}'))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await receive(stub, request("evt_1", b'{"amount":100}'))

    assert raised.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert await subscriber.inbox.duplicates() == 0


async def test_caller_outside_the_ip_allowlist_is_permission_denied(
    start_subscriber: StartSubscriber, stub_for: Callable[[app.SubscriberApp], Stub]
) -> None:
    """Only listed networks may call; localhost is not in 10.0.0.0/8."""
    fenced = await start_subscriber("--allow-ip=10.0.0.0/8")
    open_to_localhost = await start_subscriber("--allow-ip=10.0.0.0/8", "--allow-ip=127.0.0.0/8")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await receive(stub_for(fenced), request("evt_1"))

    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "127.0.0.1 is not in the IP allowlist" in (raised.value.details() or "")
    assert await fenced.inbox.count() == 0
    assert await receive(stub_for(open_to_localhost), request("evt_1")) is False


async def test_handler_failure_marks_the_event_failed_but_acknowledges_the_delivery(
    start_subscriber: StartSubscriber, stub_for: Callable[[app.SubscriberApp], Stub]
) -> None:
    """The event is durable before the handler runs, so a broken handler must not cause retries."""

    async def broken(entry: inbox.Entry) -> None:
        raise RuntimeError("handler bug")

    subscriber = await start_subscriber(handler=broken)
    stub = stub_for(subscriber)

    assert await receive(stub, request("evt_1")) is False
    status = await stub.GetStatus(
        subscriber_pb2.GetStatusRequest(event_id="evt_1"),
        metadata=bearer(token("evt_1", b"")),
        timeout=DEADLINE_SECONDS,
    )
    assert status.state == subscriber_pb2.RECEIPT_STATE_FAILED


async def test_a_handler_slower_than_the_callers_deadline_still_runs_to_the_end(
    start_subscriber: StartSubscriber, stub_for: Callable[[app.SubscriberApp], Stub]
) -> None:
    """The caller gives up after the record committed: the handler must still finish, or the
    event would stay "received" while every redelivery is absorbed as a duplicate."""
    release = asyncio.Event()
    finished: list[str] = []

    async def slow(entry: inbox.Entry) -> None:
        await release.wait()
        finished.append(entry.event_id)

    subscriber = await start_subscriber(handler=slow)
    stub = stub_for(subscriber)
    req = request("evt_slow")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Receive(req, metadata=bearer(token("evt_slow", req.event.payload)), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    release.set()

    async def processed() -> bool:
        status = await stub.GetStatus(
            subscriber_pb2.GetStatusRequest(event_id="evt_slow"),
            metadata=bearer(token("evt_slow", b"")),
            timeout=DEADLINE_SECONDS,
        )
        return status.state == subscriber_pb2.RECEIPT_STATE_PROCESSED

    await eventually(processed, what="the slow handler finished")
    assert finished == ["evt_slow"]


async def test_get_status_of_an_unseen_event_is_unknown_without_a_time(stub: Stub) -> None:
    """Never received: RECEIPT_STATE_UNKNOWN and no received_at."""
    status = await stub.GetStatus(
        subscriber_pb2.GetStatusRequest(event_id="evt_unseen"),
        metadata=bearer(token("evt_unseen", b"")),
        timeout=DEADLINE_SECONDS,
    )

    assert status.state == subscriber_pb2.RECEIPT_STATE_UNKNOWN
    assert not status.HasField("received_at")


async def test_get_status_of_an_event_id_postgresql_cannot_store_is_unknown(
    start_subscriber: StartSubscriber,
    stub_for: Callable[[app.SubscriberApp], Stub],
    postgres_url: str,
) -> None:
    """An id with a NUL was never recorded (Receive refuses it): UNKNOWN, not a database error."""
    stub = stub_for(await start_subscriber(f"--database-url={postgres_url}"))

    status = await stub.GetStatus(
        subscriber_pb2.GetStatusRequest(event_id="evt_\x00"),
        metadata=bearer(token("evt_\x00", b"")),
        timeout=DEADLINE_SECONDS,
    )

    assert status.state == subscriber_pb2.RECEIPT_STATE_UNKNOWN


async def test_get_status_of_a_handled_event_is_processed_with_its_receipt_time(
    stub: Stub,
) -> None:
    """Received and handled: RECEIPT_STATE_PROCESSED and when it arrived."""
    before = time.time()
    await receive(stub, request("evt_1"))

    status = await stub.GetStatus(
        subscriber_pb2.GetStatusRequest(event_id="evt_1"),
        metadata=bearer(token("evt_1", b"")),
        timeout=DEADLINE_SECONDS,
    )

    assert status.state == subscriber_pb2.RECEIPT_STATE_PROCESSED
    assert before - 1 <= status.received_at.ToNanoseconds() / 1e9 <= time.time() + 1


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: token("evt_other", b""), id="token-for-another-event"),
        pytest.param(lambda: token("evt_1", b'{"order":1}'), id="token-over-a-payload"),
    ],
)
async def test_get_status_needs_a_token_for_that_event_over_an_empty_payload(
    stub: Stub, make_token: Callable[[], str]
) -> None:
    """A delivery token or another event's token does not open a status query."""
    await receive(stub, request("evt_1"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetStatus(
            subscriber_pb2.GetStatusRequest(event_id="evt_1"),
            metadata=bearer(make_token()),
            timeout=DEADLINE_SECONDS,
        )

    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def read_json_line(
    stream: asyncio.StreamReader, event: str, lines: list[str]
) -> dict[str, Any]:
    """The first JSON log line whose event is ``event``; every line read is kept in ``lines``."""
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"no {event!r} line before EOF:\n" + "".join(lines))
        lines.append(raw.decode())
        try:
            line: dict[str, Any] = json.loads(raw)
        except ValueError:
            continue
        if line.get("event") == event:
            return line


async def test_process_serves_health_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`python -m subscriber` logs where it serves, answers health checks, exits 0 on SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subscriber",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--database-url",
        f"sqlite:///{tmp_path / 'process.db'}",
        "--secret",
        SECRET,
        "--audience",
        AUDIENCE,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        serving = await asyncio.wait_for(
            read_json_line(process.stderr, "serving", lines), DEADLINE_SECONDS
        )
        async with grpc.aio.insecure_channel(serving["grpc"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            service = subscriber_pb2.DESCRIPTOR.services_by_name["SubscriberService"].full_name
            answer = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_SECONDS
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert serving["http"].startswith("127.0.0.1:")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(process.communicate(), DEADLINE_SECONDS)

    log = "".join(lines) + rest.decode()
    assert process.returncode == 0, log
    assert '"event": "stopped"' in log


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "subscriber",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE_SECONDS)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_help_lists_every_flag_with_its_environment_variable() -> None:
    """--help works without a secret and documents the WEBHOOKS_* fallbacks."""
    code, out, _ = await run_cli("--help")

    assert code == 0
    for flag in ("--listen", "--http-listen", "--secret", "--audience", "--allow-ip"):
        assert flag in out
    assert "WEBHOOKS_TIMESTAMP_TOLERANCE" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param((), "--secret: at least one whsec_ secret is required", id="no-secret"),
        pytest.param(("--secret", "hunter2"), "--secret: must start with", id="bad-secret"),
        pytest.param(
            ("--secret", SECRET, "--allow-ip", "10.0.0.1/8"), "--allow-ip:", id="bad-cidr"
        ),
        pytest.param(("--secret", SECRET, "--listen", "nowhere"), "--listen:", id="bad-listen"),
        pytest.param(
            ("--secret", SECRET, "--database-url", "mysql://db/x"),
            "--database-url: unsupported database",
            id="bad-database",
        ),
        pytest.param(
            ("--secret", SECRET, "--timestamp-tolerance", "-1"),
            "--timestamp-tolerance:",
            id="bad-tolerance",
        ),
    ],
)
async def test_cli_refuses_invalid_settings_naming_the_flag(
    args: tuple[str, ...], message: str
) -> None:
    """An invalid value stops the process at once with a message that names the flag."""
    code, _, err = await run_cli(*args)

    assert code != 0
    assert message in err
