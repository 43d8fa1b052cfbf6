"""The tracking calls served straight from ASGI; every other request goes on to the FastAPI app.

The calls are nearly all of ingest's traffic, and FastAPI's middleware, dependency solving and
response encoding cost more CPU per call than the call's own work (docs/ingest-performance.md).
The FastAPI app still declares the same routes, served by the same `CallIntake`, so the OpenAPI
document describes them and `/docs` can try them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from services.ingest.intake import (
    CALL_TYPES,
    SUCCESS,
    CallIntake,
    IngestMetrics,
    Rejected,
    refusal,
)

log = structlog.get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BATCH = "batch"
_JSON = (b"content-type", b"application/json")
_SUCCESS_HEADERS = [_JSON, (b"content-length", str(len(SUCCESS)).encode())]


class TrackingCalls:
    """ASGI app: `POST /v1/<call>` and `POST /v1/batch` here, the rest to `fallback`."""

    def __init__(self, intake: CallIntake, metrics: IngestMetrics, fallback: ASGIApp) -> None:
        self._intake = intake
        self._metrics = metrics
        self.fallback = fallback
        self._routes = {f"/v1/{call}": call for call in (*CALL_TYPES, BATCH)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self._routes.get(scope["path"])
            if route is not None:
                await self._serve(route, scope, receive, send)
                return
        await self.fallback(scope, receive, send)

    async def _serve(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
        limit = self._intake.max_batch_bytes if route == BATCH else self._intake.max_event_bytes
        try:
            body = await _read_body(receive, limit, content_length)
            if route == BATCH:
                await self._intake.batch(body, authorization)
            else:
                await self._intake.call(route, body, authorization)
        except _ClientGone:
            return
        except Rejected as exc:
            self._metrics.rejected(exc.status)
            answer = refusal(exc)
            headers = [
                _JSON,
                (b"content-length", str(len(answer.body)).encode()),
                *((k.lower().encode(), v.encode("latin-1")) for k, v in answer.headers),
            ]
            await _answer(send, answer.status, headers, answer.body)
            return
        except Exception:
            log.exception("ingest.call_failed", path=scope["path"])
            self._metrics.rejected(500)
            body = b'{"success":false,"error":"internal error"}'
            headers = [_JSON, (b"content-length", str(len(body)).encode())]
            await _answer(send, 500, headers, body)
            return
        await _answer(send, 200, _SUCCESS_HEADERS, SUCCESS)


class _ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


async def _read_body(receive: Receive, limit: int, content_length: bytes | None) -> bytes:
    """The request body, refused with a 413 as soon as it is known to pass `limit`."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise Rejected(
            413, f"request body is {int(content_length)} bytes; the limit is {limit} bytes"
        )
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"request body is over {limit} bytes; the limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
