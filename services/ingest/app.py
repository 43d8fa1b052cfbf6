"""Ingest HTTP API, compatible with Segment's HTTP Tracking API (and so with its SDKs).

The tracking calls go through `CallIntake` (decode, authenticate, validate, publish), served
straight from ASGI by `TrackingCalls` and declared on the FastAPI app too; a 200 is returned only
after the broker acknowledged (acks=all, idempotent producer). Signed links (unsubscribe, open
pixel, click) and SMS status callbacks arrive here too.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from services.ingest.adapters.publisher import EventPublisher
from services.ingest.callbacks import SIGNATURE_HEADER, SmsStatusCallbacks
from services.ingest.domain.calls import Batch, Call, encode
from services.ingest.domain.tracking import (
    email_link_clicked,
    email_opened,
    unsubscribed,
)
from services.ingest.fastpath import ASGIApp, ClientGone, TrackingCalls, read_body
from services.ingest.intake import (
    CALL_TYPES,
    SUCCESS,
    CallIntake,
    IngestMetrics,
    Rejected,
    refusal,
)
from services.ingest.settings import IngestSettings
from shared.bodies import BadInput
from shared.clock import Clock
from shared.contracts import Event
from shared.links import InvalidLink, LinkClaims, LinkKind, LinkSigner
from shared.settings import api_docs_urls

log = structlog.get_logger(__name__)

# Waypost exports Prometheus metrics; FastAPI's built-in OpenTelemetry hooks would look up the
# global providers (reading the environment) on every request for nothing.
_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(
    settings: IngestSettings,
    publisher: EventPublisher,
    clock: Clock,
    new_message_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> ASGIApp:
    """Build the ingest app around its collaborators (composition happens in `__main__`)."""
    app = FastAPI(
        title="Waypost ingest",
        version="1",
        description="Segment-compatible HTTP tracking API. Authenticate with the write key as "
        "the HTTP Basic user name (empty password) or as `writeKey` in the body.",
        telemetry=_NO_TELEMETRY,
        lifespan=lifespan,
        **api_docs_urls(settings.serves_api_docs()),
    )
    metrics = IngestMetrics()
    intake = CallIntake(settings, publisher, clock, metrics, new_message_id)
    signer = LinkSigner(settings.link_secret.get_secret_value(), settings.public_url)

    @app.exception_handler(BadInput)
    async def _rejected(_request: Request, exc: BadInput) -> Response:
        metrics.rejected(exc.status)
        answer = refusal(exc)
        return Response(
            answer.body,
            status_code=answer.status,
            headers=dict(answer.headers),
            media_type="application/json",
        )

    async def publish(events: list[Event]) -> None:
        await intake.publish([encode(event) for event in events])

    callbacks = SmsStatusCallbacks(
        signer, settings.sms_auth_token.get_secret_value(), clock, publish
    )

    async def body_of(request: Request, limit: int) -> bytes:
        headers = request.headers
        length, encoding = headers.get("content-length"), headers.get("content-encoding")
        try:
            return await read_body(
                request.receive,
                limit,
                None if length is None else length.encode("latin-1"),
                None if encoding is None else encoding.encode("latin-1"),
            )
        except ClientGone:
            return b""

    def add_call_route(call_type: str) -> None:
        async def route(request: Request) -> Response:
            body = await body_of(request, intake.max_event_bytes)
            await intake.call(call_type, body, request.headers.get("authorization"))
            return Response(SUCCESS, media_type="application/json")

        app.post(
            f"/v1/{call_type}",
            name=call_type,
            summary=f"Record a {call_type} call",
            openapi_extra=_body_schema(Call),
            responses=_SUCCESS_RESPONSE | _ERROR_RESPONSES,
        )(route)

    for call_type in CALL_TYPES:
        add_call_route(call_type)

    @app.post(
        "/v1/batch",
        summary="Record many calls at once",
        openapi_extra=_body_schema(Batch),
        responses=_SUCCESS_RESPONSE | _ERROR_RESPONSES,
    )
    async def batch(request: Request) -> Response:
        body = await body_of(request, intake.max_batch_bytes)
        await intake.batch(body, request.headers.get("authorization"))
        return Response(SUCCESS, media_type="application/json")

    def read_link(token: str, kind: LinkKind, now: datetime) -> LinkClaims:
        try:
            return signer.read(token, kind, now)
        except InvalidLink as exc:
            raise Rejected(400, f"token: {exc}", field="token") from exc

    async def publish_best_effort(event: Event) -> None:
        # The reader must see the image or reach the page even when the event log is down.
        try:
            await publish([event])
        except Rejected as exc:
            metrics.unrecorded.labels(event.event or event.type).inc()
            log.warning(
                "tracking event not published",
                name=event.event,
                message_id=event.message_id,
                error=exc.message,
            )

    @app.get(
        "/u/{token}",
        summary="Unsubscribe page: asks to confirm, changes nothing",
        response_class=HTMLResponse,
        responses=_LINK_RESPONSES,
    )
    async def unsubscribe_page(token: str) -> HTMLResponse:
        # Link scanners follow GET links, so only the form's POST unsubscribes.
        read_link(token, "unsubscribe", clock.now())
        return HTMLResponse(_confirmation_page(f"{signer.public_url}/u/{token}"))

    @app.post(
        "/u/{token}",
        summary="Unsubscribe (RFC 8058 one-click, or the confirmation page's form)",
        response_class=HTMLResponse,
        responses=_LINK_RESPONSES,
    )
    async def unsubscribe(token: str, request: Request) -> HTMLResponse:
        now = clock.now()
        claims = read_link(token, "unsubscribe", now)
        method = _unsubscribe_method(await request.body())
        await publish([unsubscribed(claims, now, method)])
        return HTMLResponse(_UNSUBSCRIBED_PAGE)

    @app.get(
        "/o/{token}.gif",
        summary="Open pixel: records Email Opened",
        response_class=Response,
        responses={200: {"content": {"image/gif": {}}}, **_LINK_RESPONSES},
    )
    async def open_pixel(token: str, request: Request) -> Response:
        now = clock.now()
        claims = read_link(token, "open", now)
        await publish_best_effort(email_opened(claims, now, request.headers.get("user-agent")))
        return Response(_PIXEL, media_type="image/gif", headers=_NO_STORE)

    @app.get(
        "/c/{token}",
        summary="Tracked link: records Email Link Clicked and redirects to its destination",
        response_class=RedirectResponse,
        status_code=302,
        responses=_LINK_RESPONSES,
    )
    async def click(token: str, request: Request) -> RedirectResponse:
        now = clock.now()
        claims = read_link(token, "click", now)
        if not claims.url or not _is_web_url(claims.url):
            raise Rejected(400, "token: the link has no http(s) destination", field="token")
        await publish_best_effort(
            email_link_clicked(claims, now, request.headers.get("user-agent"))
        )
        return RedirectResponse(claims.url, status_code=302, headers=_NO_STORE)

    @app.post(
        "/v1/sms/status/{token}",
        summary="SMS status callback (Twilio-compatible, signed with X-Twilio-Signature)",
        status_code=204,
        response_class=Response,
        responses={
            **_LINK_RESPONSES,
            403: {"description": "Missing or wrong X-Twilio-Signature"},
            413: {"description": "Body over 32 KB, as sent or once gzip-inflated"},
            415: {"description": "A Content-Encoding other than gzip, or any on a multipart form"},
        },
    )
    async def sms_status(token: str, request: Request) -> Response:
        # The form-encoded callbacks every provider sends are served by `TrackingCalls`
        # (gzip inflated there); this route takes the rest (a multipart form) and documents
        # the call.
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise Rejected(
                415,
                f"Content-Encoding '{encoding}' is accepted on form-encoded callbacks only",
                field="Content-Encoding",
            )
        raw = await request.body()
        if len(raw) > settings.max_event_bytes:
            raise Rejected(
                413,
                f"request body is {len(raw)} bytes; the limit is {settings.max_event_bytes} bytes",
            )
        # Closed once read: a multipart form may have spooled a file part to disk.
        async with request.form() as form:
            params = {name: value for name, value in form.multi_items() if isinstance(value, str)}
        signature = request.headers.get(SIGNATURE_HEADER, "")
        await callbacks.handle(token, request.url.path, request.url.query, params, signature)
        return Response(status_code=204)

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return TrackingCalls(intake, metrics, fallback=app, callbacks=callbacks)


_SUCCESS_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Kafka acknowledged every event of the call",
        "content": {"application/json": {"example": {"success": True}}},
    }
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid call; `field` names the offending field"},
    401: {"description": "Missing or unknown write key"},
    413: {
        "description": "Event over 32 KB as written, or body over 32 KB (call) / 500 KB (batch), "
        "as sent or once gzip-inflated"
    },
    415: {"description": "A Content-Encoding other than gzip"},
    503: {"description": "Event log unavailable or over capacity; honour Retry-After"},
}

_LINK_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed, tampered, expired or other-kind token (`field` is `token`)"},
    503: {"description": "Event log unavailable or over capacity; honour Retry-After"},
}

# A 1x1 transparent GIF.
_PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
# Every open and click should reach us, not a cache.
_NO_STORE = {"Cache-Control": "no-store, max-age=0"}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex"><title>{title}</title></head>
<body><main><h1>{title}</h1>{content}</main></body></html>
"""
_UNSUBSCRIBED_PAGE = _PAGE.format(
    title="You are unsubscribed",
    content="<p>You will no longer receive these messages.</p>",
)


def _confirmation_page(action: str) -> str:
    form = (
        f'<form method="post" action="{html.escape(action, quote=True)}">'
        '<input type="hidden" name="via" value="page">'
        '<button type="submit">Unsubscribe</button></form>'
    )
    return _PAGE.format(
        title="Unsubscribe?",
        content=f"<p>Confirm to stop receiving these messages.</p>{form}",
    )


def _unsubscribe_method(body: bytes) -> str:
    """How the contact unsubscribed: our confirmation form, else one-click (any body, RFC 8058)."""
    fields = parse_qs(body.decode("utf-8", errors="replace")) if len(body) <= 1024 else {}
    return "page" if fields.get("via") == ["page"] else "one_click"


def _is_web_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema(by_alias=True)}},
        }
    }
