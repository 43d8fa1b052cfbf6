"""The tracking calls and SMS status callbacks served straight from ASGI; every other request
goes on to the FastAPI app.

The calls are nearly all of ingest's traffic, and FastAPI's middleware, dependency solving and
response encoding cost more CPU per call than the call's own work (docs/ingest-performance.md);
a provider posts two status callbacks for every text sent. The FastAPI app still declares the
same routes, served by the same `CallIntake` and `SmsStatusCallbacks`, so the OpenAPI document
describes them and `/docs` can try them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import structlog

from services.ingest.callbacks import PREFIX as CALLBACK_PREFIX
from services.ingest.callbacks import SIGNATURE_HEADER, SmsStatusCallbacks
from services.ingest.intake import (
    CALL_TYPES,
    SUCCESS,
    CallIntake,
    IngestMetrics,
    Rejected,
    refusal,
)
from shared.bodies import BadInput, BodyReader, capped_receive

log = structlog.get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BATCH = "batch"
CALLBACK = "sms status callback"
_SIGNATURE = SIGNATURE_HEADER.lower().encode()
_FORM = b"application/x-www-form-urlencoded"
# As many form fields as Starlette reads before it refuses a form.
MAX_FORM_FIELDS = 1000
_JSON = (b"content-type", b"application/json")
_SUCCESS_HEADERS = [_JSON, (b"content-length", str(len(SUCCESS)).encode())]


class TrackingCalls:
    """ASGI app: `POST /v1/<call>`, `POST /v1/batch` and form-encoded SMS status callbacks
    (`callbacks`) here, the rest to `fallback`."""

    def __init__(
        self,
        intake: CallIntake,
        metrics: IngestMetrics,
        fallback: ASGIApp,
        callbacks: SmsStatusCallbacks | None = None,
    ) -> None:
        self._intake = intake
        self._metrics = metrics
        self.fallback = fallback
        self._callbacks = callbacks
        self._routes = {f"/v1/{call}": call for call in (*CALL_TYPES, BATCH)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                path = scope["path"]
                route = self._routes.get(path)
                if route is not None:
                    await self._serve(route, scope, receive, send)
                    return
                if self._callbacks is not None and _callback_form(path, scope["headers"]):
                    await self._serve(CALLBACK, scope, receive, send)
                    return
            # Every other body (unsubscribe forms, multipart SMS callbacks) is capped too: by its
            # Content-Length here, then as it streams (the app's handler answers that 413).
            limit = self._intake.max_event_bytes
            for name, value in scope["headers"]:
                if name == b"content-length":
                    try:
                        BodyReader(limit, value, None)
                    except BadInput as exc:
                        await self._refuse(send, exc)
                        return
            receive = capped_receive(receive, limit, _rejected)
        await self.fallback(scope, receive, send)

    async def _serve(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = None
        content_length = None
        encoding = None
        signature: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
            elif name == b"content-encoding":
                encoding = value
            elif name == _SIGNATURE and signature is None:  # the first, as Starlette reads it
                signature = value.decode("latin-1")
        limit = self._intake.max_batch_bytes if route == BATCH else self._intake.max_event_bytes
        try:
            body = await read_body(receive, limit, content_length, encoding)
            if route == BATCH:
                await self._intake.batch(body, authorization)
            elif route == CALLBACK:
                await self._callback(self._callbacks, scope, body, signature or "")
                await _answer(send, 204, [], b"")
                return
            else:
                await self._intake.call(route, body, authorization)
        except ClientGone:
            return
        except BadInput as exc:
            await self._refuse(send, exc)
            return
        except Exception:
            log.exception("ingest.call_failed", path=scope["path"])
            self._metrics.rejected(500)
            body = b'{"success":false,"error":"internal error"}'
            headers = [_JSON, (b"content-length", str(len(body)).encode())]
            await _answer(send, 500, headers, body)
            return
        await _answer(send, 200, _SUCCESS_HEADERS, SUCCESS)

    async def _callback(
        self, callbacks: SmsStatusCallbacks | None, scope: Scope, body: bytes, signature: str
    ) -> None:
        """An SMS status callback with a form-encoded body (`SmsStatusCallbacks`). The form is
        read as Starlette reads one (names and values percent-decoded as UTF-8, blank values
        kept, the last of a repeated name wins, at most `MAX_FORM_FIELDS`), and the query string
        as UTF-8, so both routes check the same signature."""
        if callbacks is None:  # `__call__` routes callbacks here only when it has them
            raise RuntimeError("no SMS status callbacks to hand the form to")
        path: str = scope["path"]
        try:
            fields = parse_qsl(
                body.decode("latin-1"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
            )
        except ValueError as exc:
            raise Rejected(400, f"the form has more than {MAX_FORM_FIELDS} fields") from exc
        try:
            query = scope["query_string"].decode()
        except UnicodeDecodeError as exc:
            raise Rejected(400, "the query string is not UTF-8", field="query") from exc
        params = dict(fields)
        await callbacks.handle(path[len(CALLBACK_PREFIX) :], path, query, params, signature)

    async def _refuse(self, send: Send, exc: BadInput) -> None:
        self._metrics.rejected(exc.status)
        answer = refusal(exc)
        headers = [
            _JSON,
            (b"content-length", str(len(answer.body)).encode()),
            *((k.lower().encode(), v.encode("latin-1")) for k, v in answer.headers),
        ]
        await _answer(send, answer.status, headers, answer.body)


def _callback_form(path: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """A form-encoded POST to an SMS status callback URL (one token, no further segment)."""
    if not path.startswith(CALLBACK_PREFIX) or "/" in path[len(CALLBACK_PREFIX) :]:
        return False
    if len(path) == len(CALLBACK_PREFIX):
        return False
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == _FORM
    return False


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


def _rejected(exc: BadInput) -> Exception:
    return Rejected(exc.status, exc.message, exc.field)


async def read_body(
    receive: Receive, limit: int, content_length: bytes | None, encoding: bytes | None
) -> bytes:
    """The request body, decompressed, refused (413) as soon as it is known to pass `limit`:
    by its `Content-Length`, by the bytes received, or by the bytes decompressed (`BadInput`;
    `ClientGone` when the client left first). The FastAPI routes read their bodies with it too.
    """
    if encoding is None and content_length is not None and content_length.isdigit():
        # The common case, checked here without building a reader.
        if int(content_length) > limit:
            BodyReader(limit, content_length, None)  # raises the 413
    else:
        reader = BodyReader(limit, content_length, encoding)
        if reader.compressed:
            return await _read_into(reader, receive)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            BodyReader(limit, None, None).feed(body)  # raises the 413
        return body
    reader = BodyReader(limit, None, None)
    reader.feed(body)
    return await _read_into(reader, receive)


async def _read_into(reader: BodyReader, receive: Receive) -> bytes:
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        reader.feed(message.get("body", b""))
        more = message.get("more_body", False)
    return reader.body()


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
