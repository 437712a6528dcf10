"""The HTTP face of the subscriber, for publishers that deliver webhooks as HTTP POSTs.

``POST /webhooks`` takes the payload as the raw body (any content type) or as
the ``payload`` field of an ``application/x-www-form-urlencoded`` body, signed
with a delivery JWT over the payload and, if present, Standard Webhooks headers
over the raw body (then both must hold and agree). The JWT is required: the
Standard signature covers only id, timestamp and body, so alone it would let
whoever replays or rewrites a request choose the event type and, by switching
the content type between form and raw, what counts as the payload. Events land
in the same inbox as gRPC deliveries, so an event delivered both ways is
recorded once.
"""

from __future__ import annotations

import logging
import traceback
import urllib.parse

from aiohttp import typedefs, web

from common import errors, grpc_server, log, signing
from subscriber import handlers, inbox, verifier

logger = logging.getLogger(__name__)

FORM = "application/x-www-form-urlencoded"
# A form payload field must be present; its content type can ride along in this one.
FORM_PAYLOAD_FIELD = "payload"
FORM_CONTENT_TYPE_FIELD = "content_type"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_HTTP_STATUS = {
    errors.InvalidArgument: 400,
    errors.Unauthenticated: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    # The inbox refuses writes while the subscriber stops: the publisher should retry.
    errors.FailedPrecondition: 503,
}


def create_app(
    checks: verifier.Verifier, store: inbox.Inbox, handler: handlers.Handler
) -> web.Application:
    routes = _Routes(checks, store, handler)
    # aiohttp's default (1 MiB) would refuse a form-encoded 1 MiB payload, which percent-encoding
    # can triple; gRPC's message ceiling is the one limit both receivers share.
    app = web.Application(
        middlewares=[_errors_as_json], client_max_size=grpc_server.MAX_MESSAGE_BYTES
    )
    app.router.add_post("/webhooks", routes.receive)
    app.router.add_get("/webhooks/status/{event_id}", routes.status)
    return app


@web.middleware
async def _errors_as_json(request: web.Request, handler: typedefs.Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.WebhooksError as error:
        status = next((code for kind, code in _HTTP_STATUS.items() if isinstance(error, kind)), 500)
        return web.json_response({"error": str(error)}, status=status)
    except web.HTTPError as error:
        return web.json_response({"error": error.reason}, status=error.status)
    except Exception as error:
        log.event(
            logger,
            "http_request_failed",
            logging.ERROR,
            path=request.path,
            error=repr(error),
            exc=traceback.format_exc(),
        )
        return web.json_response({"error": "internal error"}, status=500)


class _Routes:
    def __init__(
        self, checks: verifier.Verifier, store: inbox.Inbox, handler: handlers.Handler
    ) -> None:
        self._checks = checks
        self._store = store
        self._handler = handler

    async def receive(self, request: web.Request) -> web.Response:
        self._checks.check_address(verifier.parse_address(request.remote))
        headers = request.headers
        authorization = headers.get("authorization")
        if authorization is None:
            raise errors.Unauthenticated(
                "unsigned: authorization: Bearer <token> is required; webhook-signature alone "
                "does not cover the event type nor the content type"
            )
        # The token before the body: a request nobody signed is refused before it can
        # make this process hold its body (up to grpc_server.MAX_MESSAGE_BYTES).
        claims = self._checks.delivery_token(authorization)
        body = await request.read()
        payload, content_type = _payload(request, body)

        standard_id: str | None = None
        signature = headers.get("webhook-signature")
        if signature is not None:
            self._checks.standard(
                headers.get("webhook-id"), headers.get("webhook-timestamp"), signature, body
            )
            standard_id = headers["webhook-id"]
        signing.check_payload(claims, payload)
        if not claims.event_type:
            raise errors.Unauthenticated(
                "token has no event_type: the webhook-event-type header is not signed"
            )
        event_id = _agreed("event id", standard_id, claims.event_id)
        event_type = _agreed(
            "event type", headers.get("webhook-event-type") or None, claims.event_type
        )
        if not event_id:
            raise errors.InvalidArgument("event id", "must not be empty")

        entry = inbox.Entry(
            event_id=event_id,
            event_type=event_type,
            payload=payload,
            content_type=content_type,
            created_at=None,
            # HTTP deliveries name the event, not the delivery.
            delivery_id="",
            attempt=claims.attempt,
        )
        try:
            is_new = await handlers.record_and_run(self._handler, self._store, entry)
        except inbox.Conflict:
            raise errors.AlreadyExists(
                f"replay with a different body: event {event_id!r} was received before"
            ) from None
        return web.json_response({"event_id": event_id, "duplicate": not is_new})

    async def status(self, request: web.Request) -> web.Response:
        self._checks.check_address(verifier.parse_address(request.remote))
        event_id = request.match_info["event_id"]
        self._checks.status_query(request.headers.get("authorization"), event_id)
        receipt = await self._store.status(event_id)
        return web.json_response(
            {
                "event_id": event_id,
                "state": "unknown" if receipt is None else receipt.state.value,
                "received_at": None if receipt is None else receipt.received_at,
            }
        )


def _payload(request: web.Request, body: bytes) -> tuple[bytes, str]:
    """The event's payload and content type: the raw body, or the form's payload field."""
    if request.content_type != FORM:
        return body, request.headers.get("content-type", DEFAULT_CONTENT_TYPE)
    fields = _form_fields(body)
    payloads = fields.get(FORM_PAYLOAD_FIELD, [])
    if len(payloads) != 1:
        raise errors.InvalidArgument(
            FORM_PAYLOAD_FIELD, f"a form body needs exactly one field, got {len(payloads)}"
        )
    content_types = fields.get(FORM_CONTENT_TYPE_FIELD, [])
    content_type = content_types[0].decode("utf-8", "replace") if content_types else ""
    return payloads[0], content_type or DEFAULT_CONTENT_TYPE


def _form_fields(body: bytes) -> dict[str, list[bytes]]:
    """Decodes a urlencoded body keeping values as bytes.

    Not urllib.parse.parse_qs or request.post(): both decode values to text,
    and signatures are over the payload's exact bytes, whatever its encoding.
    """
    fields: dict[str, list[bytes]] = {}
    for pair in body.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        key = urllib.parse.unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
        fields.setdefault(key, []).append(urllib.parse.unquote_to_bytes(value.replace(b"+", b" ")))
    return fields


def _agreed(what: str, header_value: str | None, claim: str) -> str:
    """The signed claim, which the header (if any) must not contradict."""
    if header_value is not None and header_value != claim:
        raise errors.Unauthenticated(f"token {what} {claim!r} does not match {header_value!r}")
    return claim
