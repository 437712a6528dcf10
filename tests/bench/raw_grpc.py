"""The gRPC ceiling: a bare grpc.aio unary server and a client, no persistence, no signing.

``python -m tests.bench.raw_grpc serve`` prints ``{"ready": true, "address": ...}`` and
serves until stdin closes; ``python -m tests.bench.raw_grpc call --target ADDR ...`` prints
one JSON line with the calls/s it measured. Requests are the ReceiveRequest a
delivery sends, with a 1 KiB payload.
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc.aio

from common.gen.webhooks.v1 import event_pb2, subscriber_pb2, subscriber_pb2_grpc

from . import closedloop, runtime

Context = grpc.aio.ServicerContext[Any, Any]


class Answer(subscriber_pb2_grpc.SubscriberServiceServicer):
    async def Receive(
        self, request: subscriber_pb2.ReceiveRequest, context: Context
    ) -> subscriber_pb2.ReceiveResponse:
        return subscriber_pb2.ReceiveResponse()

    async def GetStatus(
        self, request: subscriber_pb2.GetStatusRequest, context: Context
    ) -> subscriber_pb2.GetStatusResponse:
        return subscriber_pb2.GetStatusResponse(state=subscriber_pb2.RECEIPT_STATE_UNKNOWN)


async def serve() -> None:
    server = grpc.aio.server(options=runtime.GRPC_OPTIONS)
    subscriber_pb2_grpc.add_SubscriberServiceServicer_to_server(Answer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runtime.say({"ready": True, "address": f"127.0.0.1:{port}"})
    try:
        await runtime.serve_commands(_no_commands)
    finally:
        await server.stop(1.0)


async def _no_commands(command: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("the raw server takes no commands")


async def call(args: argparse.Namespace) -> None:
    request = subscriber_pb2.ReceiveRequest(
        event=event_pb2.Event(
            id="evt_raw", type=runtime.EVENT_TYPE, payload=runtime.payload(args.payload_bytes)
        ),
        delivery_id="dlv_raw",
        attempt=1,
    )
    async with grpc.aio.insecure_channel(args.target, options=runtime.GRPC_OPTIONS) as channel:
        await channel.channel_ready()
        stub = subscriber_pb2_grpc.SubscriberServiceStub(channel)
        result = await closedloop.drive(
            lambda: stub.Receive(request, timeout=10.0),
            concurrency=args.concurrency,
            warmup=args.warmup,
            seconds=args.seconds,
        )
    runtime.say(result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.raw_grpc")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve")
    client = commands.add_parser("call")
    client.add_argument("--target", required=True)
    client.add_argument("--concurrency", type=int, default=64)
    client.add_argument("--warmup", type=float, default=0.5)
    client.add_argument("--seconds", type=float, default=3.0)
    client.add_argument("--payload-bytes", type=int, default=runtime.PAYLOAD_BYTES)
    args = parser.parse_args()
    runtime.run(serve() if args.command == "serve" else call(args))


if __name__ == "__main__":
    main()
