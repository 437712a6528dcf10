"""A minimal gRPC subscriber: answers every Receive with OK at once and notes when it arrived.

``python -m tests.bench.ack_grpc``: prints ``{"ready": true, "address": ...}``, then
serves control commands (tests.bench.receipts) on stdin.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from common.gen.webhooks.v1 import subscriber_pb2, subscriber_pb2_grpc

from . import receipts, runtime

Context = grpc.aio.ServicerContext[Any, Any]


class AckSubscriber(subscriber_pb2_grpc.SubscriberServiceServicer):
    def __init__(self, seen: receipts.Receipts) -> None:
        self._seen = seen

    async def Receive(
        self, request: subscriber_pb2.ReceiveRequest, context: Context
    ) -> subscriber_pb2.ReceiveResponse:
        self._seen.add(request.delivery_id, request.event.id)
        return subscriber_pb2.ReceiveResponse()

    async def GetStatus(
        self, request: subscriber_pb2.GetStatusRequest, context: Context
    ) -> subscriber_pb2.GetStatusResponse:
        # Every Receive is answered at once, so an event asked about has been received.
        known = self._seen.has_event(request.event_id)
        state = (
            subscriber_pb2.RECEIPT_STATE_PROCESSED
            if known
            else subscriber_pb2.RECEIPT_STATE_UNKNOWN
        )
        return subscriber_pb2.GetStatusResponse(state=state)


async def main() -> None:
    seen = receipts.Receipts()
    server = grpc.aio.server(options=runtime.GRPC_OPTIONS)
    subscriber_pb2_grpc.add_SubscriberServiceServicer_to_server(AckSubscriber(seen), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runtime.say({"ready": True, "address": f"127.0.0.1:{port}"})
    try:
        await runtime.serve_commands(seen.handle)
    finally:
        await server.stop(1.0)


if __name__ == "__main__":
    runtime.run(main())
