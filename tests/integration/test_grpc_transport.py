"""gRPC delivery against real servers on port 0: how GrpcTransport classifies what happened and
what it asks, verified with PyJWT and against the reference subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import jwt
import pytest

from common import signing
from common.gen.webhooks.v1 import subscriber_pb2, subscriber_pb2_grpc
from publisher import grpc_transport
from publisher import transport as tx
from subscriber import app
from tests import support
from tests.subscriber_apps import Handled, SubscriberApps
from tests.support import FakeSubscriber, eventually

SECRET = signing.generate_secret()
KEY = signing.secret_key(SECRET)
SUBSCRIBER_ID = "sub_grpc_transport"
ISSUER = "publisher.test"
PAYLOAD = b'{"order":42}'
# A deadline for the test, far above any attempt timeout used here.
DEADLINE = 20.0

T = TypeVar("T")


def make_attempt(endpoint: str, **changes: Any) -> tx.Attempt:
    return support.make_attempt(
        endpoint, key=KEY, subscriber_id=SUBSCRIBER_ID, payload=PAYLOAD, issuer=ISSUER, **changes
    )


@dataclass
class Questioned(FakeSubscriber):
    """A FakeSubscriber whose GetStatus answers ``state``, any number, and keeps each question's
    metadata."""

    state: int = subscriber_pb2.RECEIPT_STATE_UNKNOWN
    questions: list[dict[str, str]] = field(default_factory=list)

    async def GetStatus(
        self, request: subscriber_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> subscriber_pb2.GetStatusResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.questions.append(metadata)
        response = subscriber_pb2.GetStatusResponse()
        # Set after construction: a number outside the enum passes through as an open enum does.
        response.state = self.state  # type: ignore[assignment]
        return response


@pytest.fixture
async def fake() -> AsyncIterator[Questioned]:
    subscriber = Questioned()
    await subscriber.start()
    yield subscriber
    await subscriber.stop()


@pytest.fixture
async def transport() -> AsyncIterator[grpc_transport.GrpcTransport]:
    sender = grpc_transport.GrpcTransport(now=time.time)
    yield sender
    await sender.close()


@pytest.fixture
def handled() -> Handled:
    return Handled()


@pytest.fixture
async def reference(tmp_path: Path, handled: Handled) -> AsyncIterator[app.SubscriberApp]:
    """The reference subscriber, gRPC only, on port 0 with its own SQLite file."""
    apps = SubscriberApps(tmp_path)
    yield await apps.start(
        "--http-listen=off", f"--secret={SECRET}", f"--audience={SUBSCRIBER_ID}", handler=handled
    )
    await apps.stop_all()


@contextlib.asynccontextmanager
async def cuttable_proxy(port: int) -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A TCP proxy on 127.0.0.1 to ``port``; aborting the yielded client writers cuts the
    connection the way a network failure or a load balancer reset does."""
    clients: list[asyncio.StreamWriter] = []
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients.append(writer)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        for task in (
            asyncio.create_task(pipe(reader, upstream_writer)),
            asyncio.create_task(pipe(upstream_reader, writer)),
        ):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", clients
    finally:
        server.close()
        for writer in clients:
            writer.transport.abort()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await server.wait_closed()


async def send(sender: grpc_transport.GrpcTransport, attempt: tx.Attempt) -> tx.Result:
    async with asyncio.timeout(DEADLINE):
        return await sender.send(attempt)


# -- status questions ---------------------------------------------------------------------------


async def test_a_status_question_carries_a_status_token_that_cannot_pass_for_a_delivery(
    fake: Questioned, transport: grpc_transport.GrpcTransport
) -> None:
    """GetStatus's JWT verifies with PyJWT and names the event with purpose "status" and no
    body_sha256: a subscriber cannot take it for an empty delivery of the event."""
    receipt = await transport.status(make_attempt(f"127.0.0.1:{fake.port}"))

    assert receipt is tx.Receipt.MISSING
    [question] = fake.questions
    token = question["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, KEY, algorithms=["HS256"], audience=SUBSCRIBER_ID, issuer=ISSUER)
    assert (claims["event_id"], claims["purpose"]) == ("evt-1", "status")
    assert "body_sha256" not in claims


async def test_a_captured_status_question_cannot_deliver_its_event_to_the_reference_subscriber(
    fake: Questioned,
    transport: grpc_transport.GrpcTransport,
    reference: app.SubscriberApp,
    handled: Handled,
) -> None:
    """Replayed as a Receive with an empty payload, the question's token is UNAUTHENTICATED and
    nothing is recorded, so the genuine delivery afterwards is recorded with its payload."""
    await transport.status(make_attempt(f"127.0.0.1:{fake.port}"))
    [question] = fake.questions
    replay = subscriber_pb2.ReceiveRequest(delivery_id="forged", attempt=1)
    replay.event.id, replay.event.type = "evt-1", "order.created"

    async with grpc.aio.insecure_channel(f"127.0.0.1:{reference.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await subscriber_pb2_grpc.SubscriberServiceStub(channel).Receive(
                replay, metadata=(("authorization", question["authorization"]),), timeout=DEADLINE
            )
    genuine = await send(transport, make_attempt(f"127.0.0.1:{reference.grpc_port}"))

    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "purpose is 'status'" in (refused.value.details() or "")
    assert genuine.outcome is tx.Outcome.DELIVERED
    assert [(e.event_id, e.payload) for e in handled.entries] == [("evt-1", PAYLOAD)]


async def test_the_reference_subscriber_answers_status_questions_before_and_after_delivery(
    transport: grpc_transport.GrpcTransport, reference: app.SubscriberApp
) -> None:
    """The status token opens GetStatus: unknown before the delivery, held after it."""
    attempt = make_attempt(f"127.0.0.1:{reference.grpc_port}")

    before = await transport.status(attempt)
    await send(transport, attempt)
    after = await transport.status(attempt)

    assert (before, after) == (tx.Receipt.MISSING, tx.Receipt.HAS_IT)


async def test_a_receipt_state_the_publisher_does_not_know_is_unanswered_not_raised(
    fake: Questioned, transport: grpc_transport.GrpcTransport
) -> None:
    """Proto enums are open: a state number outside the publisher's enum is no answer, and
    status() does not raise."""
    fake.state = 7

    receipt = await transport.status(make_attempt(f"127.0.0.1:{fake.port}"))

    assert receipt is tx.Receipt.UNANSWERED
    assert len(fake.questions) == 1


# -- UNAVAILABLE: never sent, or sent and cut off ----------------------------------------------


async def test_a_connection_cut_after_the_call_was_sent_leaves_the_outcome_uncertain(
    fake: Questioned, transport: grpc_transport.GrpcTransport
) -> None:
    """The subscriber accepted the event, then the connection broke before its answer: grpc
    says UNAVAILABLE, and the attempt is UNCERTAIN (ask before resending), not FAILED."""
    fake.hang = DEADLINE

    async with cuttable_proxy(fake.port) as (endpoint, clients):
        sending = asyncio.create_task(send(transport, make_attempt(endpoint)))
        await eventually(lambda: _value(fake.accepted), what="the subscriber accepted the event")
        for client in clients:
            client.transport.abort()
        result = await sending

    assert result.outcome is tx.Outcome.UNCERTAIN
    assert result.status_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert result.error.startswith("sent, but the connection broke: UNAVAILABLE: ")
    assert fake.accepted == {"evt-1"}


async def test_a_subscriber_stopping_under_the_call_leaves_the_outcome_uncertain(
    fake: Questioned, transport: grpc_transport.GrpcTransport
) -> None:
    """A subscriber that stops while the call is in its hands cancels it with UNAVAILABLE; it
    may have recorded the event, so the attempt is UNCERTAIN."""
    fake.hang = DEADLINE
    sending = asyncio.create_task(send(transport, make_attempt(f"127.0.0.1:{fake.port}")))
    await eventually(lambda: _value(fake.accepted), what="the subscriber accepted the event")

    await fake.stop()
    result = await sending

    assert result.outcome is tx.Outcome.UNCERTAIN
    assert result.status_code == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_a_closed_port_fails_as_never_sent(
    transport: grpc_transport.GrpcTransport,
) -> None:
    """Nothing listens: UNAVAILABLE before any connection, so FAILED (safe to resend)."""
    with support.refusing_port() as port:
        result = await send(transport, make_attempt(f"127.0.0.1:{port}"))

    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert result.error.startswith("UNAVAILABLE: failed to connect to all addresses")


async def test_a_connection_reset_before_the_call_went_out_fails_as_never_sent(
    transport: grpc_transport.GrpcTransport,
) -> None:
    """A peer that takes the TCP connection and drops it before HTTP/2 is up received no call:
    FAILED, not UNCERTAIN."""
    accepted: list[int] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        result = await send(transport, make_attempt(f"127.0.0.1:{port}"))
    finally:
        server.close()
        await server.wait_closed()

    assert accepted
    assert result.outcome is tx.Outcome.FAILED
    assert result.status_code == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_unavailable_answered_by_a_live_subscriber_is_a_failed_attempt(
    fake: Questioned, transport: grpc_transport.GrpcTransport
) -> None:
    """The subscriber itself answers UNAVAILABLE over a connection that stays up: a refusal,
    FAILED, and its words are kept."""
    fake.fail_with = grpc.StatusCode.UNAVAILABLE

    result = await send(transport, make_attempt(f"127.0.0.1:{fake.port}"))

    assert result == tx.Result(
        tx.Outcome.FAILED,
        status_code=grpc.StatusCode.UNAVAILABLE.value[0],
        error="UNAVAILABLE: scripted failure",
    )


async def _value(value: T) -> T:
    return value
