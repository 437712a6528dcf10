"""A bare aiohttp webhook receiver: answers every POST with 204 at once and notes when it arrived.

``python -m tests.bench.ack_http``: prints ``{"ready": true, "url": ...}``, then serves
control commands (tests.bench.receipts) on stdin.
"""

from __future__ import annotations

from aiohttp import web

from . import receipts, runtime


async def main() -> None:
    seen = receipts.Receipts()

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        event_id = request.headers.get("webhook-id", "")
        seen.add(request.headers.get("webhook-delivery-id", event_id), event_id)
        return web.Response(status=204)

    await runtime.serve_hook(receive, seen.handle)


if __name__ == "__main__":
    runtime.run(main())
