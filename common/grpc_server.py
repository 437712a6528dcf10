"""What every gRPC server here needs: health, reflection, errors, and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import Protocol

import grpc
import grpc.aio
from google.protobuf import descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import errors

# Finish in-flight RPCs for this long after a stop is asked for.
GRACE_SECONDS = 5.0
# Large enough for a 1,000-event EmitBatch of 1 KiB payloads and the default 1 MiB payload limit.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Health(Protocol):
    """The parts of grpc_health's asyncio servicer we use (its stubs predate it)."""

    async def set(self, service: str, status: int) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


def create_server() -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[errors.ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


async def add_health_and_reflection(
    server: grpc.aio.Server, services: Sequence[descriptor.ServiceDescriptor]
) -> Health:
    """Serves grpc.health.v1 and reflection for ``services``; all start SERVING.

    ``enter_graceful_shutdown()`` on the returned servicer turns every status to
    NOT_SERVING, so load balancers stop sending before the server stops.
    """
    health_servicer: Health = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [service.full_name for service in services]
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return health_servicer


class BindError(OSError):
    """The server could not listen where it was told to (the port is taken, or the host
    is not this machine's)."""


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Binds insecurely to host:port (port 0 picks one) and returns the bound port."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as error:
        # Newer grpcio raises where older releases returned 0.
        raise BindError(f"could not listen on {target}: {error}") from None
    if bound == 0:
        raise BindError(f"could not listen on {target}")
    return bound


async def wait_for_stop_signal() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
