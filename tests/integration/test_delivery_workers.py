"""Delivery workers (``--delivery-workers``): the attempts leave from child processes, signed
as before, and a worker that dies costs an uncertain attempt that the subscriber settles, never
a lost or doubled delivery (on SQLite and PostgreSQL, via the ``database_url`` fixture)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from publisher import transport as tx
from publisher import worker_wire as wire
from publisher.transport_pool import NotStarted, RemoteTransport, TransportPool
from tests.integration.test_http_delivery import (
    HTTP,
    OUTCOME_CONFIRMED,
    emit_payload,
    first_attempt,
    new_secret,
)
from tests.integration.test_publisher_delivery import DELIVERED, delivery_in, register, schedule
from tests.receiver import Answer, Receiver
from tests.support import (
    DEFAULT_DEADLINE,
    FakeSubscriber,
    OpenPublisher,
    alive,
    children_of,
    claims_of,
    eventually,
    socket_owner,
)


async def test_http_deliveries_leave_from_the_workers_signed_as_from_the_publisher(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """Every POST comes over a connection a worker holds, not the publisher, and verifies with
    the standardwebhooks package."""
    running = await open_publisher(delivery_workers=2)
    workers = running.app.delivery_workers
    assert len(workers) == 2
    assert os.getpid() not in workers
    secret = new_secret()
    await register(running.stub, receiver.url("/hook"), protocol=HTTP, secret=secret)

    emitted = [await emit_payload(running.stub) for _ in range(6)]
    for event in emitted:
        await delivery_in(running.stub, event.event_id, DELIVERED)
    posts = receiver.posts("/hook")
    assert sorted(p.headers["webhook-id"] for p in posts) == sorted(e.event_id for e in emitted)
    for post in posts:
        Webhook(secret).verify(post.body, post.headers)
    senders = {socket_owner(post.peer_port, [os.getpid(), *workers]) for post in posts}
    assert senders <= set(workers), senders


async def test_grpc_deliveries_leave_from_a_worker_with_a_jwt_pyjwt_accepts(
    open_publisher: OpenPublisher, subscriber: FakeSubscriber
) -> None:
    running = await open_publisher(delivery_workers=1)
    [worker] = running.app.delivery_workers
    secret = new_secret()
    registered = await register(running.stub, f"127.0.0.1:{subscriber.port}", secret=secret)

    emitted = await emit_payload(running.stub)
    await delivery_in(running.stub, emitted.event_id, DELIVERED)
    [received] = subscriber.received
    assert claims_of(received, secret, registered.subscriber.id)["event_id"] == emitted.event_id
    port = int(received.peer.rsplit(":", 1)[1])
    assert socket_owner(port, [os.getpid(), worker]) == worker


async def test_a_worker_killed_mid_send_leaves_an_uncertain_attempt_the_status_url_settles(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """The send the worker took with it is UNCERTAIN, so the publisher asks (through a new
    worker) instead of sending again: one POST, a CONFIRMED attempt; later events flow."""
    running = await open_publisher(delivery_workers=1)
    [killed] = running.app.delivery_workers
    endpoint = receiver.script("/slow", Answer(hang=True), Answer())
    await register(
        running.stub,
        endpoint,
        protocol=HTTP,
        retry_schedule=schedule(60),
        status_url=receiver.url("/status/{event_id}"),
    )
    stuck = await emit_payload(running.stub)
    await eventually(
        lambda: _true(receiver.got(stuck.event_id)), what="the POST reached the receiver"
    )
    os.kill(killed, signal.SIGKILL)

    delivery = await first_attempt(running.stub, stuck.event_id)
    [attempt] = delivery.attempts
    assert (attempt.outcome, attempt.error) == (
        OUTCOME_CONFIRMED,
        "confirmed by status: the subscriber has the event "
        "(the delivery worker exited before it said whether this was sent)",
    )
    assert delivery.state == DELIVERED
    assert len(receiver.posts("/slow")) == 1
    [replacement] = running.app.delivery_workers
    assert replacement != killed

    later = await emit_payload(running.stub)
    await delivery_in(running.stub, later.event_id, DELIVERED)
    [post] = [p for p in receiver.posts("/slow") if p.headers["webhook-id"] == later.event_id]
    assert socket_owner(post.peer_port, [replacement]) == replacement


async def test_workers_ignore_sigterm_and_exit_when_the_publisher_stops(
    open_publisher: OpenPublisher, receiver: Receiver
) -> None:
    """A service manager's SIGTERM to the whole group leaves the workers to the publisher,
    which stops them after its own deliveries end."""
    running = await open_publisher(delivery_workers=1)
    [worker] = running.app.delivery_workers
    await register(running.stub, receiver.url("/hook"), protocol=HTTP)
    first = await emit_payload(running.stub)
    # Delivered: the worker is past its start-up and has its signal handling in place.
    await delivery_in(running.stub, first.event_id, DELIVERED)

    os.kill(worker, signal.SIGTERM)
    second = await emit_payload(running.stub)
    await delivery_in(running.stub, second.event_id, DELIVERED)
    assert running.app.delivery_workers == [worker]

    await running.app.stop()
    assert not alive(worker)


async def _true(value: bool) -> bool:
    return value


async def test_a_send_open_when_the_publisher_stops_is_dropped_with_its_lease(
    open_publisher: OpenPublisher, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the stop's grace the dispatcher gives the delivery back and cancels its send; the
    worker cancels it too, as an in-process send would be, instead of holding it open to the
    delivery timeout, and exits cleanly rather than being killed."""
    running = await open_publisher(delivery_workers=1, delivery_timeout=600)
    [worker] = running.app.delivery_workers
    endpoint = receiver.script("/slow", Answer(hang=True))
    await register(running.stub, endpoint, protocol=HTTP, retry_schedule=schedule(60))
    stuck = await emit_payload(running.stub)
    await eventually(
        lambda: _true(receiver.got(stuck.event_id)), what="the POST reached the receiver"
    )
    caplog.set_level(logging.DEBUG, logger="publisher.transport_pool")

    await running.app.stop()
    events = {record.getMessage(): getattr(record, "fields", {}) for record in caplog.records}
    assert "delivery_worker_killed" not in events
    assert events["delivery_worker_stopped"] == {"pid": worker, "returncode": 0}


async def test_a_publisher_whose_workers_cannot_start_refuses_to_start_and_holds_nothing(
    open_publisher: OpenPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing at start, where an operator sees it, rather than failing every attempt later;
    and the database is free for the next start (its SQLite lock released)."""
    with monkeypatch.context() as patched:
        # A "Python" that exits at once with status 1, as a broken install would.
        patched.setattr(sys, "executable", "/bin/false")
        with pytest.raises(NotStarted, match=r"exited before it was ready \(exit status 1\)"):
            await open_publisher(delivery_workers=2)

    running = await open_publisher(delivery_workers=1)
    assert len(running.app.delivery_workers) == 1


async def test_a_request_a_worker_cannot_make_is_answered_not_left_hanging() -> None:
    """A request that raises in the worker (here: a protocol it has no transport for) comes
    back failed, or unanswered for a status question, instead of holding its send slot."""
    pool = TransportPool(1, wire.Options((), 5.0, 8, "INFO"))
    await pool.start()
    attempt = _attempt("127.0.0.1:9")
    pigeon = RemoteTransport(pool, "carrier-pigeon")
    try:
        # A deadline, so that a request left unanswered fails the test instead of hanging it.
        async with asyncio.timeout(DEFAULT_DEADLINE):
            sent = await pigeon.send(attempt)
            asked = await pigeon.status(attempt)
    finally:
        await pool.close()
    assert sent.outcome == tx.Outcome.FAILED
    assert sent.error == "internal error: KeyError('carrier-pigeon')"
    assert asked == tx.Receipt.UNANSWERED


async def test_a_worker_that_cannot_be_started_again_leaves_its_turns_to_the_others(
    subscriber: FakeSubscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two workers, one killed and its restart failing, sends go to the other instead
    of failing as not sent."""
    pool = TransportPool(2, wire.Options((), 5.0, 8, "INFO"))
    await pool.start()
    grpc_ = RemoteTransport(pool, "grpc")
    attempt = _attempt(f"127.0.0.1:{subscriber.port}")
    subscriber.lose_next = 1
    try:
        async with asyncio.timeout(DEFAULT_DEADLINE):
            # The first send goes to the first worker, which dies holding it.
            held = asyncio.create_task(grpc_.send(attempt))
            await eventually(lambda: _true(bool(subscriber.received)), what="the first send")
            os.kill(pool.pids[0], signal.SIGKILL)
            lost = await held
            # No worker can start from now on.
            monkeypatch.setattr(sys, "executable", "/bin/false")
            sent = [await grpc_.send(attempt) for _ in range(4)]
    finally:
        await pool.close()
    assert lost.outcome == tx.Outcome.UNCERTAIN
    assert [result.outcome for result in sent] == [tx.Outcome.DELIVERED] * 4
    assert len(subscriber.received) == 5


def _attempt(endpoint: str) -> tx.Attempt:
    return tx.Attempt(
        delivery_id="d1",
        attempt=1,
        event_id="e1",
        event_type="order.paid",
        payload=b"{}",
        content_type="application/json",
        created_at=time.time(),
        subscriber_id="s1",
        endpoint=endpoint,
        body_format="raw",
        keys=(b"k" * 32,),
        issuer="grpc-webhooks",
        timeout=5.0,
    )


async def test_a_restart_given_up_on_leaves_no_worker_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt whose budget runs out while its worker is being started again (one that
    hangs as it starts) takes the half-started worker down with it: nobody else holds it.

    The attempt is given up once the new worker runs, not after a fixed time: given up
    before the worker was spawned, there would be nothing left behind to look for."""
    pool = TransportPool(1, wire.Options((), 5.0, 8, "INFO"))
    await pool.start()
    grpc_ = RemoteTransport(pool, "grpc")
    hangs = tmp_path / "hangs-as-it-starts"
    started = tmp_path / "started"
    hangs.write_text(
        f"#!{sys.executable}\nimport os, pathlib, time\n"
        f"pathlib.Path({str(started)!r}).write_text(str(os.getpid()))\ntime.sleep(60)\n"
    )
    hangs.chmod(0o755)
    try:
        os.kill(pool.pids[0], signal.SIGKILL)
        # The worker's death is seen when its pipe closes.
        await eventually(lambda: _true(not alive(pool.pids[0])), what="the worker gone")
        monkeypatch.setattr(sys, "executable", str(hangs))
        sending = asyncio.create_task(grpc_.send(_attempt("127.0.0.1:1")))

        async def hanging_worker() -> int | None:
            text = started.read_text() if started.exists() else ""
            return int(text) if text else None

        pid = await eventually(hanging_worker, what="the new worker hanging as it starts")
        assert not sending.done()
        sending.cancel()  # What an attempt's budget running out does to the send.
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert not alive(pid)
        left = [pid for pid in children_of(os.getpid()) if str(hangs) in _command_of(pid)]
        assert left == []
    finally:
        await pool.close()


def _command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
