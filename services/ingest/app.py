"""Ingest HTTP API, compatible with Segment's HTTP Tracking API (and so with its SDKs).

Routes decode and authenticate, the domain normalises, the publisher writes to Kafka; a 200 is
returned only after the broker acknowledged (acks=all, idempotent producer).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, ValidationError

from services.ingest.adapters.publisher import EventPublisher
from services.ingest.domain.calls import Batch, Call, to_event
from services.ingest.settings import IngestSettings
from shared.clock import Clock
from shared.contracts import Event
from shared.kafka import DeliveryFailed, ProducerBusy

CALL_TYPES = ("track", "identify", "page", "screen", "alias", "group")


class Rejected(Exception):
    """A request we refuse, with the status and a message that names the field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def create_app(
    settings: IngestSettings,
    publisher: EventPublisher,
    clock: Clock,
    new_message_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> FastAPI:
    """Build the ingest app around its collaborators (composition happens in `__main__`)."""
    app = FastAPI(
        title="Waypost ingest",
        version="1",
        description="Segment-compatible HTTP tracking API. Authenticate with the write key as "
        "the HTTP Basic user name (empty password) or as `writeKey` in the body.",
    )
    write_keys = settings.write_keys()
    registry = CollectorRegistry()
    accepted = Counter(
        "waypost_ingest_events",
        "Events acknowledged by Kafka, by source and call type",
        ["source", "type"],
        registry=registry,
    )
    rejected = Counter(
        "waypost_ingest_rejected_requests",
        "Requests refused, by HTTP status",
        ["status"],
        registry=registry,
    )

    @app.exception_handler(Rejected)
    async def _rejected(_request: Request, exc: Rejected) -> JSONResponse:
        rejected.labels(str(exc.status)).inc()
        body: dict[str, Any] = {"success": False, "error": exc.message}
        if exc.field:
            body["field"] = exc.field
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": 'Basic realm="waypost"'}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    async def read_json(request: Request, limit: int) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > limit:
            raise Rejected(413, f"request body is {len(raw)} bytes; the limit is {limit} bytes")
        try:
            payload = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Rejected(400, f"body is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise Rejected(400, "body must be a JSON object")
        return payload

    def source_of(request: Request, body_key: object) -> str:
        key = _basic_user(request.headers.get("authorization")) or (
            body_key if isinstance(body_key, str) else None
        )
        if key is None:
            raise Rejected(401, "missing write key (HTTP Basic user name or writeKey)")
        source = write_keys.get(key)
        if source is None:
            raise Rejected(401, "unknown write key")
        return source

    async def publish(events: list[Event]) -> None:
        try:
            await publisher.publish(events)
        except ProducerBusy as exc:
            raise Rejected(503, "ingest is over capacity, retry shortly") from exc
        except DeliveryFailed as exc:
            raise Rejected(503, f"event log unavailable: {exc}") from exc
        for event in events:
            accepted.labels(event.source or "default", event.type).inc()

    def parse_call(payload: dict[str, Any], call_type: str, prefix: str = "") -> Call:
        try:
            return Call.model_validate({**payload, "type": call_type})
        except ValidationError as exc:
            raise _validation_rejection(exc, prefix) from exc

    def add_call_route(call_type: str) -> None:
        async def route(request: Request) -> dict[str, bool]:
            payload = await read_json(request, settings.max_event_bytes)
            source = source_of(request, payload.get("writeKey"))
            call = parse_call(payload, call_type)
            event = to_event(
                call,
                message_id=call.message_id or new_message_id(),
                received_at=clock.now(),
                source=source,
            )
            await publish([event])
            return {"success": True}

        app.post(
            f"/v1/{call_type}",
            name=call_type,
            summary=f"Record a {call_type} call",
            openapi_extra=_body_schema(Call),
            responses=_ERROR_RESPONSES,
        )(route)

    for call_type in CALL_TYPES:
        add_call_route(call_type)

    @app.post(
        "/v1/batch",
        summary="Record many calls at once",
        openapi_extra=_body_schema(Batch),
        responses=_ERROR_RESPONSES,
    )
    async def batch(request: Request) -> dict[str, bool]:
        payload = await read_json(request, settings.max_batch_bytes)
        source = source_of(request, payload.get("writeKey"))
        try:
            parsed = Batch.model_validate(payload)
        except ValidationError as exc:
            raise _validation_rejection(exc) from exc
        received_at = clock.now()
        events = []
        for index, item in enumerate(parsed.batch):
            size = len(json.dumps(item, separators=(",", ":")))
            if size > settings.max_event_bytes:
                raise Rejected(
                    413,
                    f"batch[{index}] is {size} bytes; the limit per event is "
                    f"{settings.max_event_bytes} bytes",
                    field=f"batch[{index}]",
                )
            call_type = item.get("type")
            if call_type not in CALL_TYPES:
                raise Rejected(
                    400,
                    f"batch[{index}].type must be one of {', '.join(CALL_TYPES)}",
                    field=f"batch[{index}].type",
                )
            item_context = item.get("context") or {}
            if not isinstance(item_context, dict):
                raise Rejected(
                    400,
                    f"batch[{index}].context must be an object",
                    field=f"batch[{index}].context",
                )
            merged = {**item, "context": {**parsed.context, **item_context}}
            call = parse_call(merged, str(call_type), prefix=f"batch[{index}].")
            events.append(
                to_event(
                    call,
                    message_id=call.message_id or new_message_id(),
                    received_at=received_at,
                    source=source,
                )
            )
        await publish(events)
        return {"success": True}

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid call; `field` names the offending field"},
    401: {"description": "Missing or unknown write key"},
    413: {"description": "Event over 32 KB or batch over 500 KB"},
    503: {"description": "Event log unavailable or over capacity; honour Retry-After"},
}


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema(by_alias=True)}},
        }
    }


def _validation_rejection(exc: ValidationError, prefix: str = "") -> Rejected:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "type" or len(first["loc"]) > 1]
    named = (first.get("ctx") or {}).get("field")
    if not loc and isinstance(named, str):
        loc = [named]
    field = prefix + ".".join(loc) if loc else prefix.rstrip(".") or None
    message = first["msg"].removeprefix("Value error, ")
    return Rejected(400, f"{field}: {message}" if field else message, field=field)


def _basic_user(header: str | None) -> str | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _sep, _password = decoded.partition(":")
    return user or None
