"""What every bench helper process shares: the event loop, the payload, and the control channel.

A helper prints one JSON line on stdout once it is ready, then answers JSON
commands read from stdin, one line each, until stdin closes or SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

PAYLOAD_BYTES = 1024
EVENT_TYPE = "bench.event"
# Large enough for a 1,000-event EmitBatch of 1 KiB payloads.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
WebHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs ``main`` on uvloop when it is installed, as the publisher does."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def payload(size: int = PAYLOAD_BYTES) -> bytes:
    """A JSON object of exactly ``size`` bytes (at least 11)."""
    head, tail = b'{"pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve_commands(handle: Handler) -> None:
    """Answers commands from stdin until it closes or SIGTERM/SIGINT arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def answer() -> None:
        while line := await reader.readline():
            command = json.loads(line)
            try:
                reply = await handle(command)
            except Exception as error:  # The orchestrator shows it; the helper stays up.
                reply = {"error": f"{type(error).__name__}: {error}"}
            say(reply)

    commands = asyncio.create_task(answer())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({commands, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (commands, stopped):
        task.cancel()
    await asyncio.gather(commands, stopped, return_exceptions=True)


async def serve_hook(answer: WebHandler, commands: Handler) -> None:
    """Serves ``POST /hook`` on 127.0.0.1, port 0; says where, then takes commands."""
    app = web.Application()
    app.router.add_post("/hook", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    say({"ready": True, "url": f"http://{host}:{port}/hook"})
    try:
        await serve_commands(commands)
    finally:
        await runner.cleanup()
