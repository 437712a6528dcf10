"""The floor: a bare relay in place of the publisher, with no persistence and no signing.

``python -m tests.bench.relay --deliver grpc|http [--max-in-flight N]`` serves the
publisher's gRPC API on 127.0.0.1 (port 0) and logs the publisher's ``serving`` line.
Emitted events wait in memory and go to the one registered endpoint, at most N at a
time, each sent once. ListDeliveries answers from memory (pending and delivered only),
so the harness times and counts the relay exactly as it does the publisher.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import yarl

from common import log
from common.gen.webhooks.v1 import (
    event_pb2,
    publisher_pb2,
    publisher_pb2_grpc,
    subscriber_pb2,
    subscriber_pb2_grpc,
)
from publisher import http_client
from publisher.ids import new_id

from . import runtime

logger = logging.getLogger("tests.bench.relay")
Context = grpc.aio.ServicerContext[Any, Any]
# The publisher's defaults for --delivery-timeout and --max-in-flight.
DELIVERY_TIMEOUT = 15.0
MAX_IN_FLIGHT = 256
PENDING = publisher_pb2.DELIVERY_STATE_PENDING
DELIVERED = publisher_pb2.DELIVERY_STATE_DELIVERED


class GrpcSender:
    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=runtime.GRPC_OPTIONS)
        self._stub: subscriber_pb2_grpc.SubscriberServiceAsyncStub = (
            subscriber_pb2_grpc.SubscriberServiceStub(self._channel)
        )

    async def send(self, delivery_id: str, event: event_pb2.Event) -> None:
        request = subscriber_pb2.ReceiveRequest(event=event, delivery_id=delivery_id, attempt=1)
        await self._stub.Receive(request, timeout=DELIVERY_TIMEOUT)

    async def close(self) -> None:
        await self._channel.close(None)


class HttpSender:
    """POSTs with the publisher's own HTTP client, as its HttpTransport does."""

    def __init__(self, url: str, max_in_flight: int) -> None:
        self._url = yarl.URL(url)
        self._client = http_client.Client(
            resolve=None,
            connect_timeout=5.0,
            max_response_bytes=65536,
            pool_limit=max_in_flight,
        )

    async def send(self, delivery_id: str, event: event_pb2.Event) -> None:
        # The ack receiver keys receipts on these two headers, as for the publisher's POSTs.
        headers = {
            "content-type": event.content_type,
            "webhook-id": event.id,
            "webhook-delivery-id": delivery_id,
        }
        response = await self._client.request(
            "POST", self._url, headers, event.payload, DELIVERY_TIMEOUT
        )
        if response.status >= 300:
            raise RuntimeError(f"HTTP {response.status}")

    async def close(self) -> None:
        await self._client.close()


class Relay(publisher_pb2_grpc.PublisherServiceServicer):
    def __init__(self, deliver: str, max_in_flight: int) -> None:
        self._deliver = deliver
        self._max_in_flight = max_in_flight
        self._sender: GrpcSender | HttpSender | None = None
        self._subscriber_id = ""
        self._queue: asyncio.Queue[tuple[str, event_pb2.Event]] = asyncio.Queue()
        # Delivery id -> event id, from Emit until the send ends.
        self._pending: dict[str, str] = {}
        # (delivery id, event id, wall time the send ended), in that order.
        self.delivered: list[tuple[str, str, float]] = []
        self.failed = 0

    async def RegisterSubscriber(
        self, request: publisher_pb2.RegisterSubscriberRequest, context: Context
    ) -> publisher_pb2.RegisterSubscriberResponse:
        if self._sender is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "the relay serves one subscriber"
            )
        if self._deliver == "grpc":
            self._sender = GrpcSender(request.endpoint)
        else:
            self._sender = HttpSender(request.endpoint, self._max_in_flight)
        self._subscriber_id = new_id("sub")
        subscriber = publisher_pb2.Subscriber(
            id=self._subscriber_id, name=request.name, endpoint=request.endpoint
        )
        return publisher_pb2.RegisterSubscriberResponse(subscriber=subscriber)

    async def Emit(
        self, request: publisher_pb2.EmitRequest, context: Context
    ) -> publisher_pb2.EmitResponse:
        return self._accept(request)

    async def EmitBatch(
        self, request: publisher_pb2.EmitBatchRequest, context: Context
    ) -> publisher_pb2.EmitBatchResponse:
        return publisher_pb2.EmitBatchResponse(results=[self._accept(e) for e in request.events])

    def _accept(self, request: publisher_pb2.EmitRequest) -> publisher_pb2.EmitResponse:
        event_id = new_id("evt")
        if self._sender is None:
            return publisher_pb2.EmitResponse(event_id=event_id, delivery_count=0)
        event = event_pb2.Event(
            id=event_id,
            type=request.type,
            payload=request.payload,
            content_type=request.content_type or "application/json",
        )
        event.created_at.GetCurrentTime()
        delivery_id = new_id("dlv")
        self._pending[delivery_id] = event_id
        self._queue.put_nowait((delivery_id, event))
        return publisher_pb2.EmitResponse(event_id=event_id, delivery_count=1)

    async def ListDeliveries(
        self, request: publisher_pb2.ListDeliveriesRequest, context: Context
    ) -> publisher_pb2.ListDeliveriesResponse:
        rows: Iterator[tuple[str, str, float]]
        if request.state == PENDING:
            rows = ((d, e, 0.0) for d, e in self._pending.items())
        elif request.state == DELIVERED:
            rows = iter(self.delivered)
        else:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only pending or delivered")
        if request.subscriber_id not in ("", self._subscriber_id):
            rows = iter(())
        if request.event_id:
            rows = (row for row in rows if row[1] == request.event_id)
        limit, offset = request.page_size or 100, int(request.page_token or 0)
        response = publisher_pb2.ListDeliveriesResponse()
        for delivery_id, event_id, ended in itertools.islice(rows, offset, offset + limit):
            delivery = response.deliveries.add(
                id=delivery_id, event_id=event_id, subscriber_id=self._subscriber_id
            )
            delivery.state = request.state
            if ended:
                delivery.updated_at.FromNanoseconds(int(ended * 1e9))
        if len(response.deliveries) == limit:
            response.next_page_token = str(offset + limit)
        return response

    async def work(self) -> None:
        """One of ``--max-in-flight`` workers: sends what Emit queued, one at a time."""
        while True:
            delivery_id, event = await self._queue.get()
            assert self._sender is not None
            try:
                await self._sender.send(delivery_id, event)
            except Exception as error:  # Sent once only: the harness sees the shortfall.
                self.failed += 1
                log.event(logger, "delivery_failed", logging.WARNING, error=repr(error))
            else:
                self.delivered.append((delivery_id, event.id, time.time()))
            finally:
                del self._pending[delivery_id]

    async def close(self) -> None:
        if self._sender is not None:
            await self._sender.close()


async def main(args: argparse.Namespace) -> None:
    log.configure()
    # The methods the harness never calls stay the generated base's, which answer UNIMPLEMENTED.
    relay = Relay(args.deliver, args.max_in_flight)  # type: ignore[abstract]
    server = grpc.aio.server(options=runtime.GRPC_OPTIONS)
    publisher_pb2_grpc.add_PublisherServiceServicer_to_server(relay, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # As the publisher does after starting: a floor that paid for collections the product
    # avoids would not be a floor.
    gc.freeze()
    workers = [asyncio.create_task(relay.work()) for _ in range(args.max_in_flight)]
    # The publisher's ready line: tests.bench.cluster waits for it and reads the address.
    log.event(logger, "serving", grpc=f"127.0.0.1:{port}", deliver=args.deliver)
    try:
        await runtime.serve_commands(_no_commands)
    finally:
        await server.stop(1.0)
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await relay.close()
        log.event(logger, "stopped", delivered=len(relay.delivered), failed=relay.failed)


async def _no_commands(command: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("the relay takes no commands")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.relay")
    parser.add_argument("--deliver", choices=["grpc", "http"], required=True)
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT)
    args = parser.parse_args()
    if args.max_in_flight <= 0:
        parser.error("--max-in-flight must be positive")
    return args


if __name__ == "__main__":
    runtime.run(main(parse()))
