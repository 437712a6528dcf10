"""The two binaries as real processes on loopback, on the embedded SQLite default."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import signing
from common.gen.webhooks.v1 import (
    publisher_pb2,
    subscriber_pb2,
    subscriber_pb2_grpc,
)
from tests.soak import Cluster, duration, free_port, publisher_stub, soak
from tests.support import Process, alive, children_of, eventually


def test_both_programs_print_help() -> None:
    for program in ("publisher", "subscriber"):
        done = subprocess.run(
            [sys.executable, "-m", program, "--help"], capture_output=True, text=True, check=True
        )
        assert "--listen" in done.stdout
        assert "--database-url" in done.stdout
    migrate = subprocess.run(
        [sys.executable, "-m", "publisher", "migrate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--stamp" in migrate.stdout


async def test_whole_path_register_emit_receive_and_ask(tmp_path: Path) -> None:
    """Register, emit, the reference subscriber gets it, GetDelivery and GetStatus agree."""
    cluster = Cluster(tmp_path, 0, free_port())
    await cluster.start_publisher()
    try:
        async with publisher_stub(cluster.publisher_address) as stub:
            registered = await stub.RegisterSubscriber(
                publisher_pb2.RegisterSubscriberRequest(
                    name="reference", endpoint=cluster.subscriber_address, secret=cluster.secret
                )
            )
            cluster.subscriber_id = registered.subscriber.id
            await cluster.start_subscriber()
            emitted = await stub.Emit(
                publisher_pb2.EmitRequest(type="order.paid", payload=b'{"order": 1}')
            )

            async def delivered() -> publisher_pb2.Delivery | None:
                listing = await stub.ListDeliveries(
                    publisher_pb2.ListDeliveriesRequest(event_id=emitted.event_id)
                )
                (delivery,) = listing.deliveries
                return (
                    delivery if delivery.state == publisher_pb2.DELIVERY_STATE_DELIVERED else None
                )

            delivery = await eventually(delivered, what="delivered")
            assert delivery.attempt_count == 1

        token = signing.sign_delivery(
            signing.secret_key(cluster.secret),
            issuer="grpc-webhooks",
            audience=cluster.subscriber_id,
            event_id=emitted.event_id,
            event_type="order.paid",
            attempt=0,
            payload=b"",
            now=time.time(),
        )
        async with grpc.aio.insecure_channel(cluster.subscriber_address) as channel:
            status = await subscriber_pb2_grpc.SubscriberServiceStub(channel).GetStatus(
                subscriber_pb2.GetStatusRequest(event_id=emitted.event_id),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        assert status.state in (
            subscriber_pb2.RECEIPT_STATE_RECEIVED,
            subscriber_pb2.RECEIPT_STATE_PROCESSED,
        )
        assert status.received_at.seconds > 0
    finally:
        await cluster.stop()
    assert cluster.inbox() == {emitted.event_id: 1}


async def test_publisher_serves_health_and_reflection(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 0, free_port())
    await cluster.start_publisher()
    try:
        async with grpc.aio.insecure_channel(cluster.publisher_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "webhooks.v1.PublisherService"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            response = await anext(aiter(responses))
            names = {s.name for s in response.list_services_response.service}
            assert "webhooks.v1.PublisherService" in names
            assert "grpc.health.v1.Health" in names
    finally:
        assert cluster.publisher is not None
        assert await cluster.publisher.stop() == 0


async def test_delivery_workers_leave_when_their_publisher_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives the publisher no chance to stop its workers: they see their pipe close
    and exit on their own, so a restart on the same database starts with no stragglers."""
    args = ["--listen", "127.0.0.1:0", "--database-url", "sqlite:///publisher.db"]
    publisher = Process("publisher", [*args, "--delivery-workers", "2"], cwd=str(tmp_path))
    await publisher.logged("serving")
    workers = children_of(publisher.pid)
    assert len(workers) == 2
    assert all(alive(pid) for pid in workers)

    await publisher.kill()

    async def gone() -> bool:
        return not any(alive(pid) for pid in workers)

    await eventually(gone, what="the workers of a killed publisher exit")
    again = Process("publisher", args, cwd=str(tmp_path))
    try:
        await again.logged("serving")
    finally:
        assert await again.stop() == 0


async def test_graceful_restart_with_pending_deliveries_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM while deliveries wait for a subscriber that is down; all arrive after restart."""
    cluster = Cluster(tmp_path, 0, free_port())
    await cluster.start_publisher()
    event_ids = []
    try:
        async with publisher_stub(cluster.publisher_address) as stub:
            registered = await stub.RegisterSubscriber(
                publisher_pb2.RegisterSubscriberRequest(
                    name="reference",
                    endpoint=cluster.subscriber_address,
                    secret=cluster.secret,
                    # Every half second for two minutes: however long the restart takes,
                    # no delivery runs out of quick retries while the subscriber is down.
                    # (With 0.5, 1, 2 s and then an hour, a restart 2 s late failed it.)
                    retry_schedule=[duration(n / 2) for n in range(1, 241)],
                )
            )
            cluster.subscriber_id = registered.subscriber.id
            for index in range(20):
                emitted = await stub.Emit(
                    publisher_pb2.EmitRequest(type="order.paid", payload=b"%d" % index)
                )
                event_ids.append(emitted.event_id)

            async def all_attempted() -> bool:
                listing = await stub.ListDeliveries(
                    publisher_pb2.ListDeliveriesRequest(page_size=100)
                )
                attempted = [d for d in listing.deliveries if d.attempt_count >= 1]
                return len(attempted) == len(event_ids)

            await eventually(all_attempted, what="every delivery tried once")
        assert cluster.publisher is not None
        assert await cluster.publisher.stop() == 0
        await cluster.start_subscriber()
        await cluster.start_publisher()

        async def inbox_complete() -> bool:
            return set(cluster.inbox()) == set(event_ids)

        await eventually(inbox_complete, deadline=60, what="every event received")
    finally:
        await cluster.stop()
    assert set(cluster.inbox().values()) == {1}


@pytest.mark.parametrize("http", [False, True], ids=["grpc", "http"])
@pytest.mark.parametrize("workers", [0, 2])
async def test_sigkill_soak_delivers_every_event_exactly_once_as_an_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, http: bool
) -> None:
    """The short kill soak: 300 events, the publisher SIGKILLed twice mid-stream, sending
    from its own process and from two delivery workers (which a kill leaves to exit alone),
    to the reference subscriber over gRPC and over HTTP."""
    monkeypatch.setenv("WEBHOOKS_DELIVERY_WORKERS", str(workers))
    report = await soak(
        events=300, rate=100, kill_every=0, kill_at=(100, 200), seed=7, workdir=tmp_path, http=http
    )
    assert report.publisher_kills == 2
    assert report.ok, report
    assert report.effects == 300
