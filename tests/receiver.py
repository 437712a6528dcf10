"""A scriptable HTTP subscriber: a real aiohttp server on 127.0.0.1 that records every request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Answer:
    """What the receiver answers one POST; ``hang`` holds the answer until the test ends."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    hang: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    # The client socket's port: which process sent it (tests.support.socket_owner).
    peer_port: int = 0


@dataclass
class Receiver:
    """A real aiohttp server that records every request and answers POSTs as scripted per path.

    ``GET /status/{event_id}`` is a status URL: "received" for an event it was POSTed, else
    "unknown".
    """

    base: str = ""
    requests: list[Request] = field(default_factory=list)
    scripts: dict[str, list[Answer]] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return self.base + path

    def script(self, path: str, *answers: Answer) -> str:
        """Answers POSTs to ``path`` in this order, the last one repeating; returns its URL."""
        self.scripts[path] = list(answers)
        return self.url(path)

    def posts(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def status_queries(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET"]

    def got(self, event_id: str) -> bool:
        return any(
            r.method == "POST" and r.headers.get("webhook-id") == event_id for r in self.requests
        )

    async def _record(self, request: web.Request) -> None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            Request(
                request.method,
                request.path,
                headers,
                await request.read(),
                peer_port=peer[1] if peer else 0,
            )
        )

    async def post(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        script = self.scripts.get(request.path) or [Answer()]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer.hang:
            await self.release.wait()
        return web.Response(status=answer.status, headers=answer.headers, text=answer.body)

    async def status(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        state = "received" if self.got(request.match_info["event_id"]) else "unknown"
        return web.json_response({"state": state})


@contextlib.asynccontextmanager
async def on_loopback(app: web.Application) -> AsyncIterator[str]:
    """Serves ``app`` on 127.0.0.1 on a port of its own; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    _, port = runner.addresses[0][:2]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    """A Receiver on a port of its own, with a status URL at ``/status/{event_id}``."""
    server = Receiver()
    app = web.Application()
    app.router.add_get("/status/{event_id}", server.status)
    app.router.add_post("/{path:.*}", server.post)
    async with on_loopback(app) as server.base:
        try:
            yield server
        finally:
            # Held answers end here, so that the server can stop.
            server.release.set()
