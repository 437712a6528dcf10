"""Wires the publisher together (store, transports, dispatcher, server); starts and stops it."""

from __future__ import annotations

import logging
import os
import secrets
import socket

import grpc.aio
from sqlalchemy.engine import make_url

from common import db, grpc_server, log
from common.gen.webhooks.v1 import publisher_pb2, publisher_pb2_grpc
from publisher import collector, mailer, migrate, model, ssrf, transport_worker
from publisher import worker_wire as wire
from publisher.dispatcher import EMBEDDED_DEPTH, Dispatcher
from publisher.notifier import Notifier
from publisher.periodic import Periodic
from publisher.retention import Retention
from publisher.servicer import PublisherServicer
from publisher.settings import Settings
from publisher.store import Store
from publisher.transport import Transport
from publisher.transport_pool import TransportPool
from publisher.wakeup import PostgresWakeup

logger = logging.getLogger("publisher")

# Seconds between retention rounds: what expires in the meantime can wait that long.
RETENTION_INTERVAL = 600.0


class AlreadyRunning(RuntimeError):
    """Another publisher owns this SQLite database."""


class PublisherApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        # The host name cut short: with the sweep's prefix (store.sweeper_of) an owner must
        # fit the lease column's 80 characters, and a host name may take 64.
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
        self._lock: db.FileLock | None = None
        self._server: grpc.aio.Server | None = None
        self._store: Store | None = None
        self._dispatcher: Dispatcher | None = None
        self._transports: dict[model.Protocol, Transport] = {}
        self._pool: TransportPool | None = None
        self._stopped = False
        self._periodic: list[Periodic] = []
        self._wakeup: PostgresWakeup | None = None
        self._health: grpc_server.Health | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def delivery_workers(self) -> list[int]:
        """The process ids of the delivery workers (``--delivery-workers``); none by default."""
        return [] if self._pool is None else self._pool.pids

    async def start(self) -> None:
        settings = self.settings
        path = db.sqlite_path(settings.database_url)
        if path is not None:
            self._lock = db.FileLock(path + ".lock")
            if not self._lock.acquire():
                self._lock = None
                raise AlreadyRunning(
                    f"another publisher is using {path}: the embedded SQLite database takes one "
                    "publisher; to run several replicas, point them all at one PostgreSQL "
                    "database with --database-url postgresql://..."
                )
        try:
            # The embedded default creates its database; a shared one is migrated on purpose.
            await migrate.ensure_current(settings.database_url, create_if_empty=path is not None)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        try:
            await self._start_serving(path)
        except BaseException:
            # Whatever failed (the port taken, the database gone): give back what was taken,
            # the SQLite lock above all, so that this process or another can start again.
            await self.stop()
            raise

    async def _start_serving(self, path: str | None) -> None:
        """Everything after the lock and the schema check: store, sending, jobs, the server."""
        settings = self.settings
        store = self._store = Store(db.create_engine(settings.database_url))
        if path is not None:
            # This process holds the file lock, so every lease left in it belongs to a dead run.
            reclaimed = await store.reclaim_all()
            if reclaimed:
                log.event(logger, "stale_leases_reclaimed", count=reclaimed)
        guard = ssrf.Guard(settings.allow_cidrs)
        options = wire.Options(
            allow_cidrs=settings.allow_cidrs,
            connect_timeout=settings.connect_timeout,
            # Every delivery in flight may hold a connection; fewer would queue sends
            # behind the pool while the dispatcher counts them as in flight.
            pool_limit=settings.max_in_flight,
            log_level=settings.log_level,
        )
        if settings.delivery_workers:
            pool = TransportPool(settings.delivery_workers, options)
            # Held only once started: a pool that failed to start has stopped its workers.
            await pool.start()
            self._pool = pool
            self._transports = pool.transports()
        else:
            self._transports = transport_worker.transports(options)
        dispatcher = self._dispatcher = Dispatcher(
            store,
            self._transports,
            owner=self.owner,
            issuer=settings.issuer,
            delivery_timeout=settings.delivery_timeout,
            max_in_flight=settings.max_in_flight,
            max_in_flight_per_subscriber=settings.per_subscriber_in_flight,
            claim_batch=settings.claim_batch,
            # The only publisher on an SQLite file leases ahead; replicas share the work.
            depth=EMBEDDED_DEPTH if path is not None else 1,
        )
        store.on_new_work = dispatcher.wake
        store.on_subscriber_changed = dispatcher.forget
        if path is not None:
            # The only publisher on this file: new deliveries can be leased to it at once.
            store.taker = dispatcher
        else:
            # Replicas share the work: tell each other when some becomes due.
            self._wakeup = PostgresWakeup(settings.database_url, dispatcher.wake)
            self._wakeup.start()
        notifier = Notifier(
            store,
            mailer.Mailer(settings.smtp),
            publisher_name=settings.issuer,
            window=settings.notify_window,
            disable_after=settings.disable_after,
        )
        self._periodic = [Periodic("notifier", settings.notify_interval, notifier.run_once)]
        if settings.reconcile_interval > 0:
            self._periodic.append(
                Periodic("reconciler", settings.reconcile_interval, dispatcher.reconcile_once)
            )
        if settings.retention > 0:
            retention = Retention(store, settings.retention)
            self._periodic.append(Periodic("retention", RETENTION_INTERVAL, retention.run_once))
        server = self._server = grpc_server.create_server()
        publisher_pb2_grpc.add_PublisherServiceServicer_to_server(
            PublisherServicer(
                store,
                issuer=settings.issuer,
                max_payload_bytes=settings.max_payload_bytes,
                check_url=guard.check_registration,
            ),
            server,
        )
        self._health = await grpc_server.add_health_and_reflection(
            server, [publisher_pb2.DESCRIPTOR.services_by_name["PublisherService"]]
        )
        self.port = grpc_server.bind(server, settings.host, settings.port)
        await server.start()
        dispatcher.start()
        for job in self._periodic:
            job.start()
        log.event(logger, "serving", grpc=self.address, database=_safe_url(settings.database_url))

    async def stop(self) -> None:
        """Refuses new calls, finishes those in flight, then settles or releases deliveries."""
        if self._stopped:
            return
        self._stopped = True
        log.event(logger, "stopping")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grpc_server.GRACE_SECONDS)
        for job in self._periodic:
            await job.stop()
        if self._wakeup is not None:
            await self._wakeup.stop()
        if self._dispatcher is not None:
            await self._dispatcher.stop(grpc_server.GRACE_SECONDS)
        for transport in self._transports.values():
            await transport.close()
        if self._pool is not None:
            await self._pool.close()
        if self._store is not None:
            await self._store.close()
        if self._lock is not None:
            self._lock.release()
        log.event(logger, "stopped")

    async def run(self) -> None:
        await self.start()
        collector.settle(self.settings.max_in_flight)
        try:
            await grpc_server.wait_for_stop_signal()
        finally:
            await self.stop()


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
