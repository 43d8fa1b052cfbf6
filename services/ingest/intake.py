"""Tracking calls from request bytes to acknowledged events, apart from any web framework.

Decode, authenticate, validate once, normalise, encode once, publish, and wait once for the
broker. The direct ASGI path (`services.ingest.fastpath`) and the FastAPI routes both use it.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from services.ingest.adapters.publisher import EventPublisher
from services.ingest.domain import quick
from services.ingest.domain.calls import Batch, Call, CallContext, EncodedEvent, encode_call
from services.ingest.settings import IngestSettings
from shared.bodies import BadInput, check_depth, few_containers, parse_json
from shared.clock import Clock
from shared.kafka import DeliveryFailed, ProducerBusy

CALL_TYPES = ("track", "identify", "page", "screen", "alias", "group")
SUCCESS = b'{"success":true}'
# Authorization headers remembered with the source they authenticate (decoded once, not per call).
MAX_REMEMBERED_HEADERS = 1024


class Rejected(BadInput):
    """A request we refuse, with the status and a message that names the field."""


@dataclass(frozen=True)
class Refusal:
    """The HTTP answer to a `Rejected` request."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


def refusal(exc: BadInput) -> Refusal:
    body: dict[str, Any] = {"success": False, "error": exc.message}
    if exc.field:
        body["field"] = exc.field
    headers: tuple[tuple[str, str], ...] = ()
    if exc.status == 503:
        headers = (("Retry-After", "1"),)
    elif exc.status == 401:
        headers = (("WWW-Authenticate", 'Basic realm="waypost"'),)
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return Refusal(exc.status, encoded, headers)


class IngestMetrics:
    """The Prometheus counters of one ingest process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._accepted = Counter(
            "waypost_ingest_events",
            "Events acknowledged by Kafka, by source and call type",
            ["source", "type"],
            registry=self.registry,
        )
        self._accepted_children: dict[tuple[str, str], Any] = {}
        self._rejected = Counter(
            "waypost_ingest_rejected_requests",
            "Requests refused, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.unrecorded = Counter(
            "waypost_ingest_unrecorded_tracking_events",
            "Opens and clicks answered without their event because publishing failed, by event",
            ["event"],
            registry=self.registry,
        )

    def accepted(self, events: Sequence[EncodedEvent]) -> None:
        if len(events) == 1:
            event = events[0]
            self._accepted_child(event.source, event.call_type).inc()
            return
        tally = Tally((e.source, e.call_type) for e in events)
        for (source, call_type), count in tally.items():
            self._accepted_child(source, call_type).inc(count)

    def _accepted_child(self, source: str, call_type: str) -> Any:
        # `labels()` looks the child up under a lock on every call; sources and types are few.
        key = (source, call_type)
        child = self._accepted_children.get(key)
        if child is None:
            child = self._accepted_children[key] = self._accepted.labels(source, call_type)
        return child

    def rejected(self, status: int) -> None:
        self._rejected.labels(str(status)).inc()


class CallIntake:
    """Turns the body of a tracking call or batch into events the broker acknowledged."""

    def __init__(
        self,
        settings: IngestSettings,
        publisher: EventPublisher,
        clock: Clock,
        metrics: IngestMetrics,
        new_message_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        *,
        quick_path: bool = True,
    ) -> None:
        self.max_event_bytes = settings.max_event_bytes
        self.max_batch_bytes = settings.max_batch_bytes
        self._limits = settings.profile_limits()
        self._write_keys = settings.write_keys()
        self._sources_by_header: dict[str, str] = {}
        self._publisher = publisher
        self._clock = clock
        self._metrics = metrics
        self._new_message_id = new_message_id
        # False: every call is checked by `Call` alone (the tests compare the two ways).
        self._quick_path = quick_path

    async def call(self, call_type: str, body: bytes, authorization: str | None) -> None:
        """One `POST /v1/<call_type>`; raises `Rejected` for what it refuses."""
        read = self._quick_read(body, self.max_event_bytes, authorization)
        if read is not None:
            payload, calls = read
            payload["type"] = call_type
            event = calls.call(payload)
            if event is not None:
                await self.publish([event])
                return
        payload = _read_json(body, self.max_event_bytes)
        source = self._source(authorization, payload.get("writeKey"))
        payload["type"] = call_type  # the route decides the type, whatever the body says
        received_at = self._clock.now()
        call = _parse_call(payload, CallContext(received_at, self._limits))
        await self.publish([self._event(call, source, received_at)])

    async def batch(self, body: bytes, authorization: str | None) -> None:
        """One `POST /v1/batch`: every call is accepted, or none is."""
        read = self._quick_read(body, self.max_batch_bytes, authorization)
        if read is not None:
            payload, calls = read
            events = calls.batch(payload)
            if events is not None:
                await self.publish(events)
                return
        payload = _read_json(body, self.max_batch_bytes)
        source = self._source(authorization, payload.get("writeKey"))
        try:
            parsed = Batch.model_validate(payload)
        except ValidationError as exc:
            raise validation_rejection(exc) from exc
        if parsed.model_extra:
            check_depth(parsed.model_extra)
        shared_context = parsed.context
        received_at = self._clock.now()
        context = CallContext(received_at, self._limits)
        events = []
        for index, item in enumerate(parsed.batch):
            call_type = item.get("type")
            if call_type not in CALL_TYPES:
                raise Rejected(
                    400,
                    f"batch[{index}].type must be one of {', '.join(CALL_TYPES)}",
                    field=f"batch[{index}].type",
                )
            given_context = item.get("context")
            item_context = given_context or {}
            if not isinstance(item_context, dict):
                raise Rejected(
                    400,
                    f"batch[{index}].context must be an object",
                    field=f"batch[{index}].context",
                )
            if shared_context or item_context is not given_context:
                item = {**item, "context": {**shared_context, **item_context}}
            call = _parse_call(item, context, prefix=f"batch[{index}].")
            events.append(self._event(call, source, received_at, field=f"batch[{index}]"))
        await self.publish(events)

    def _quick_read(
        self, body: bytes, limit: int, authorization: str | None
    ) -> tuple[dict[str, Any], quick.QuickCalls] | None:
        """The body's object and its source's calls, for the quick path; None leaves the request
        to the checked path, which answers a refusal in its own order (a malformed body before
        an unknown key)."""
        if not self._quick_path or len(body) > limit:
            return None
        payload = quick.decode(body)
        if payload is None:
            return None
        try:
            source = self._source(authorization, payload.get("writeKey"))
        except Rejected:
            return None
        calls = quick.QuickCalls(
            received_at=self._clock.now(),
            source=source,
            limits=self._limits,
            max_event_bytes=self.max_event_bytes,
            new_message_id=self._new_message_id,
        )
        return payload, calls

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        """Publish and wait for the broker; an outage or a full queue is a 503."""
        try:
            await self._publisher.publish(events)
        except ProducerBusy as exc:
            raise Rejected(503, "ingest is over capacity, retry shortly") from exc
        except DeliveryFailed as exc:
            raise Rejected(503, f"event log unavailable: {exc}") from exc
        self._metrics.accepted(events)

    def _event(
        self, call: Call, source: str, received_at: datetime, field: str | None = None
    ) -> EncodedEvent:
        event = encode_call(
            call,
            message_id=call.message_id or self._new_message_id(),
            received_at=received_at,
            source=source,
        )
        # No field may nest past the limit. The record holds every field that is kept; when it
        # has too few brackets to nest that deep (nearly always), only the rest need a look.
        if not few_containers(event.value) or call.model_extra:
            kept = {"properties": call.properties, "traits": call.traits, "context": call.context}
            check_depth({**kept, **(call.model_extra or {})}, f"{field}." if field else "")
        if len(event.value) > self.max_event_bytes:
            where = field or "the event"
            raise Rejected(
                413,
                f"{where} is {len(event.value)} bytes as written; the limit per event is "
                f"{self.max_event_bytes} bytes",
                field=field,
            )
        return event

    def _source(self, authorization: str | None, body_key: object) -> str:
        if authorization is not None:
            known = self._sources_by_header.get(authorization)
            if known is not None:
                return known
        key = basic_user(authorization) or (body_key if isinstance(body_key, str) else None)
        if key is None:
            raise Rejected(401, "missing write key (HTTP Basic user name or writeKey)")
        source = self._write_keys.get(key)
        if source is None:
            raise Rejected(401, "unknown write key")
        if authorization is not None and basic_user(authorization) == key:
            # Only headers that carry a configured key are remembered, and not without bound.
            if len(self._sources_by_header) >= MAX_REMEMBERED_HEADERS:
                self._sources_by_header.clear()
            self._sources_by_header[authorization] = source
        return source


def _read_json(body: bytes, limit: int) -> dict[str, Any]:
    if len(body) > limit:
        raise Rejected(413, f"request body is {len(body)} bytes; the limit is {limit} bytes")
    # pydantic-core's parser (about three times as fast as the json module's); it refuses lone
    # surrogates, and a refusal names the field where the body went wrong.
    payload = parse_json(body or b"null")
    if not isinstance(payload, dict):
        raise Rejected(400, "body must be a JSON object")
    return payload


def _parse_call(payload: dict[str, Any], context: CallContext, prefix: str = "") -> Call:
    try:
        return Call.model_validate(payload, context=context)
    except ValidationError as exc:
        raise validation_rejection(exc, prefix) from exc


def validation_rejection(exc: ValidationError, prefix: str = "") -> Rejected:
    """A 400 naming the first field the validation refused."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "type" or len(first["loc"]) > 1]
    named = (first.get("ctx") or {}).get("field")
    if not loc and isinstance(named, str):
        loc = [named]
    field = prefix + ".".join(loc) if loc else prefix.rstrip(".") or None
    message = first["msg"].removeprefix("Value error, ")
    return Rejected(400, f"{field}: {message}" if field else message, field=field)


def basic_user(header: str | None) -> str | None:
    """The user name of an HTTP Basic `Authorization` header (Segment's write key)."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        # A header that is not ASCII cannot be base64 (b64decode raises ValueError for it).
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        return None
    user, _sep, _password = decoded.partition(":")
    return user or None
