"""PostgreSQL LISTEN/NOTIFY: a replica's listener comes back after any failure.

A TCP proxy in front of the real server drops the first connection as its LISTEN goes
through, as a server restart or a failover at that moment would; later connections pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from publisher import wakeup
from publisher.store import NOTIFY_CHANNEL
from tests.support import eventually


class DropFirstListen:
    """Relays connections to ``host:port``, aborting the first one that sends a LISTEN."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection(*self._upstream)
        await asyncio.gather(
            self._pipe(client, to_server, watch=True),
            self._pipe(server, to_client, watch=False),
        )

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, watch: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if watch and b"LISTEN" in data and not self.dropped:
                    self.dropped += 1
                    sink.transport.abort()
                    return
                sink.write(data)
                await sink.drain()
        sink.close()


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[DropFirstListen]:
    url = make_url(postgres_url)
    relay = DropFirstListen(url.host or "127.0.0.1", url.port or 5432)
    await relay.start()
    yield relay
    await relay.stop()


async def test_a_listener_dropped_while_it_sets_up_listens_again_and_stops_cleanly(
    postgres_url: str, proxy: DropFirstListen, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wakeup, "RECONNECT_SECONDS", 0.1)
    through_proxy = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
    woken: list[int] = []
    listener = wakeup.PostgresWakeup(
        through_proxy.render_as_string(hide_password=False), lambda: woken.append(1)
    )

    async def was_woken() -> bool:
        return bool(woken)

    listener.start()
    try:
        # A listener wakes the dispatcher once as it starts listening: the dropped attempt
        # never got that far, so this is the one after it.
        await eventually(was_woken, what="listening again after the dropped LISTEN")
        assert proxy.dropped == 1
        woken.clear()
        notifier = await asyncpg.connect(make_url(postgres_url).render_as_string(False))
        try:
            await notifier.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        finally:
            await notifier.close()
        await eventually(was_woken, what="a NOTIFY wakes the listener")
    finally:
        await listener.stop()  # Raised the dropped connection's error before.
