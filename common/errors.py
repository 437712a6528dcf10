"""The errors both services raise, and the one place they become gRPC status codes.

    WebhooksError
     ├── InvalidArgument      INVALID_ARGUMENT  (names the offending field)
     ├── NotFound             NOT_FOUND
     ├── AlreadyExists        ALREADY_EXISTS
     ├── FailedPrecondition   FAILED_PRECONDITION
     ├── Unauthenticated      UNAUTHENTICATED
     └── PermissionDenied     PERMISSION_DENIED

Servicers raise these and never build a status themselves; ``ErrorInterceptor``
turns them into statuses so that the mapping lives only here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio


class WebhooksError(Exception):
    """Something went wrong in grpc-webhooks."""

    status = grpc.StatusCode.INTERNAL

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class InvalidArgument(WebhooksError):
    """A request field is not valid."""

    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class NotFound(WebhooksError):
    """No such object."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(WebhooksError):
    """The object exists already."""

    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(WebhooksError):
    """The system is not in a state that allows this."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(WebhooksError):
    """The caller's credentials are missing or not valid."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(WebhooksError):
    """The caller may not do this."""

    status = grpc.StatusCode.PERMISSION_DENIED


_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


# The stubs make ServerInterceptor generic; at run time it is not subscriptable.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


# UTF-8 bytes of a message sent as a status's details. Messages quote what was wrong (an
# id, a cursor), and gRPC sends details in a header, percent-encoding each byte outside
# ASCII into three: a client refuses headers past 8 KiB now and then and past 16 KiB
# always, and its caller then sees RESOURCE_EXHAUSTED instead of the status's own code.
MAX_DETAILS_BYTES = 2000


def _details(message: str) -> str:
    encoded = message.encode()
    if len(encoded) <= MAX_DETAILS_BYTES:
        return message
    return encoded[: MAX_DETAILS_BYTES - 3].decode(errors="ignore") + "…"


class ErrorInterceptor(_ServerInterceptor):
    """Answers a ``WebhooksError`` raised by a unary handler with its status code."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        inner: _Behavior | None = getattr(handler, "unary_unary", None)
        if inner is None:
            return handler

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await inner(request, context)
            except WebhooksError as error:
                await context.abort(error.status, _details(str(error)))

        # RpcMethodHandler is a namedtuple; swap the behaviour, keep the serializers.
        replaced: grpc.RpcMethodHandler[Any, Any] = handler._replace(unary_unary=behavior)  # type: ignore[attr-defined]
        return replaced
