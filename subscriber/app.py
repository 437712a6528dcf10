"""The subscriber process: database, inbox, gRPC server, HTTP receiver and catch-up, run as one."""

from __future__ import annotations

import asyncio
import logging

import grpc.aio
from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from common import db, grpc_server, log
from common.gen.webhooks.v1 import subscriber_pb2, subscriber_pb2_grpc
from subscriber import catch_up, handlers, http_receiver, inbox, servicer, settings, verifier

logger = logging.getLogger(__name__)


class SubscriberApp:
    """One subscriber; ``grpc_port`` and ``http_port`` are the bound ports once started."""

    def __init__(
        self, config: settings.Settings, handler: handlers.Handler = handlers.log_event
    ) -> None:
        self.config = config
        self._handler = handler
        self.grpc_port = 0
        # None while the HTTP receiver is off.
        self.http_port: int | None = None
        self._engine: AsyncEngine | None = None
        self._inbox: inbox.Inbox | None = None
        self._server: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._health: grpc_server.Health | None = None
        self._catch_up: catch_up.CatchUp | None = None
        # Set when stopping, so that no further unhandled event is taken up.
        self._stopping = asyncio.Event()

    @property
    def inbox(self) -> inbox.Inbox:
        if self._inbox is None:
            raise RuntimeError("the subscriber is not started")
        return self._inbox

    async def start(self) -> None:
        config = self.config
        if config.audience is None:
            log.event(
                logger,
                "audience_not_checked",
                logging.WARNING,
                reason="no --audience: tokens issued for any subscriber sharing the secret "
                "are accepted",
            )
        checks = verifier.Verifier(
            keys=config.keys,
            audience=config.audience,
            allowlist=config.allowlist,
            timestamp_tolerance=config.timestamp_tolerance,
        )
        self._engine = db.create_engine(config.database_url)
        self._inbox = inbox.Inbox(self._engine)
        await self._inbox.start()
        # Listed before anything can record an event, so that each of these is
        # handled here and never also by the delivery that recorded it.
        unhandled = await self._inbox.unhandled()
        self._stopping.clear()

        self._server = grpc_server.create_server()
        subscriber_pb2_grpc.add_SubscriberServiceServicer_to_server(
            servicer.SubscriberServicer(checks, self._inbox, self._handler), self._server
        )
        self._health = await grpc_server.add_health_and_reflection(
            self._server, [subscriber_pb2.DESCRIPTOR.services_by_name["SubscriberService"]]
        )
        grpc_host, grpc_port = config.listen
        self.grpc_port = grpc_server.bind(self._server, grpc_host, grpc_port)
        await self._server.start()

        http_address = None
        if config.http_listen is not None:
            http_host, http_port = config.http_listen
            self._http = web.AppRunner(
                http_receiver.create_app(checks, self._inbox, self._handler),
                shutdown_timeout=grpc_server.GRACE_SECONDS,
                # Its lines are not JSON; every delivery is logged by its handler instead.
                access_log=None,
            )
            await self._http.setup()
            site = web.TCPSite(self._http, http_host, http_port)
            await site.start()
            self.http_port = _bound_port(self._http)
            http_address = _address(http_host, self.http_port)

        if config.catch_up is not None:
            self._catch_up = catch_up.CatchUp(
                target=config.catch_up.publisher,
                issuer=config.catch_up.issuer,
                subscriber_id=config.catch_up.subscriber_id,
                # Each --secret in turn: which one the publisher accepts depends on how far a
                # rotation went, and on the order the flags were given in.
                keys=config.keys,
                interval=config.catch_up.interval,
                engine=self._engine,
                store=self._inbox,
                handler=self._handler,
            )
            await self._catch_up.start()
        handlers.resume(self._handler, self._inbox, unhandled, self._stopping)

        log.event(
            logger,
            "serving",
            grpc=_address(grpc_host, self.grpc_port),
            http=http_address,
            catch_up=None if config.catch_up is None else config.catch_up.publisher,
            database=_redacted(config.database_url),
        )

    async def stop(self) -> None:
        """Stops pulling, then taking calls; in-flight work gets the grace period; then flushes."""
        log.event(logger, "stopping", grace_seconds=grpc_server.GRACE_SECONDS)
        self._stopping.set()
        if self._catch_up is not None:
            await self._catch_up.stop()
            self._catch_up = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        closing = []
        if self._server is not None:
            closing.append(self._server.stop(grpc_server.GRACE_SECONDS))
        if self._http is not None:
            closing.append(self._http.cleanup())
        await asyncio.gather(*closing)
        await handlers.drain(grpc_server.GRACE_SECONDS)
        self._server = self._http = None
        if self._inbox is not None:
            await self._inbox.stop()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        log.event(logger, "stopped")

    async def run(self) -> None:
        """Serves until SIGTERM or SIGINT; a start that fails half-way is cleaned up too."""
        try:
            await self.start()
            await grpc_server.wait_for_stop_signal()
        finally:
            await self.stop()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        # IPv4 and IPv6 sockets give (host, port, ...) tuples; the port is second either way.
        return int(address[1])
    raise OSError("the HTTP receiver is not bound")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
