"""The HTTP ceiling: a bare aiohttp server and an aiohttp client POSTing 1 KiB JSON bodies.

``python -m tests.bench.raw_http serve`` prints ``{"ready": true, "url": ...}`` and serves
until stdin closes; ``python -m tests.bench.raw_http post --url URL ...`` prints one JSON
line with the requests/s it measured.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
from aiohttp import web

from . import closedloop, runtime


async def serve() -> None:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    await runtime.serve_hook(answer, _no_commands)


async def _no_commands(command: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("the raw server takes no commands")


async def post(args: argparse.Namespace) -> None:
    body = runtime.payload(args.payload_bytes)
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(args.url, data=body, headers=headers) as response:
                await response.read()
                response.raise_for_status()

        result = await closedloop.drive(
            one, concurrency=args.concurrency, warmup=args.warmup, seconds=args.seconds
        )
    runtime.say(result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.raw_http")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve")
    client = commands.add_parser("post")
    client.add_argument("--url", required=True)
    client.add_argument("--concurrency", type=int, default=64)
    client.add_argument("--warmup", type=float, default=0.5)
    client.add_argument("--seconds", type=float, default=3.0)
    client.add_argument("--payload-bytes", type=int, default=runtime.PAYLOAD_BYTES)
    args = parser.parse_args()
    runtime.run(serve() if args.command == "serve" else post(args))


if __name__ == "__main__":
    main()
