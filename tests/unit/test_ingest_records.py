"""Ingest's hot path, piece by piece: the record written for a call, the single wait for the
broker's acknowledgements, the worker count, and the direct ASGI path answering exactly as the
FastAPI routes it stands in for.

No server and no broker: the delivery callbacks are called as the producer calls them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaError
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.adapters.publisher import Acknowledgements, KafkaEventPublisher
from services.ingest.app import create_app
from services.ingest.domain.calls import Call, EncodedEvent, encode, encode_call, to_event
from services.ingest.fastpath import TrackingCalls
from services.ingest.intake import Rejected, basic_user, refusal
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import Event
from shared.kafka import DeliveryFailed, ProducerBusy, RenewableProducer

NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
SETTINGS = IngestSettings(ingest_write_keys="dev:k1")

# --- the record of a call ---------------------------------------------------------------------

_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_instant = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2026, 1, 1), timezones=st.just(UTC)
)
_ids = st.text(min_size=1, max_size=20)


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    call_type = draw(st.sampled_from(["track", "identify", "page", "screen", "alias", "group"]))
    body: dict[str, Any] = {"type": call_type}
    user, anonymous = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    if user:
        body["userId"] = draw(_ids | st.integers(min_value=0, max_value=10**9))
    if anonymous:
        body["anonymousId"] = draw(_ids)
    if call_type == "track":
        body["event"] = draw(st.sampled_from(["Order Completed", "Product Viewed", "Signed Up"]))
    if call_type == "alias":
        body["previousId"] = draw(_ids)
    if call_type == "group":
        body["groupId"] = draw(_ids)
    for field in ("messageId", "name"):
        if draw(st.booleans()):
            body[field] = draw(_ids)
    for field in ("timestamp", "sentAt", "originalTimestamp"):
        if draw(st.booleans()):
            body[field] = draw(_instant).isoformat()
    for field in ("properties", "traits", "context"):
        if draw(st.booleans()):
            body[field] = draw(st.dictionaries(st.text(max_size=8), _json, max_size=4))
    return body


def _pairs(value: bytes) -> Any:
    return json.loads(value, object_pairs_hook=list)


@settings(max_examples=150, deadline=None)
@given(body=calls(), received=_instant)
def test_a_call_is_written_as_exactly_the_bytes_of_its_event(
    body: dict[str, Any], received: datetime
) -> None:
    call = Call.model_validate(body)
    event = to_event(call, message_id="generated", received_at=received, source="web")

    record = encode_call(call, message_id="generated", received_at=received, source="web")

    expected = encode(event)
    # The same JSON, fields in the same order (only a float's exponent may be written apart:
    # `1e16` here, `1e+16` by pydantic).
    assert _pairs(record.value) == _pairs(expected.value)
    assert record._replace(value=b"") == expected._replace(value=b"")
    if b"e+" not in expected.value:
        assert record.value == expected.value
    assert record.key == event.contact_key
    assert (record.source, record.call_type) == ("web", event.type)


def test_the_record_is_a_valid_event_with_the_corrected_timestamp() -> None:
    call = Call.model_validate(
        {
            "type": "track",
            "userId": "user-1",
            "event": "Order Completed",
            "timestamp": "2025-03-03T11:50:00Z",
            "sentAt": "2025-03-03T11:55:00Z",
            "properties": {"total": 42.5, "ratio": math.nan},
        }
    )

    record = encode_call(call, message_id="m-1", received_at=NOW, source="web")

    event = Event.model_validate_json(record.value)
    assert event.timestamp == NOW - timedelta(minutes=5)
    assert event.properties == {"total": 42.5, "ratio": None}  # NaN is written as null
    assert event.message_id == "m-1"
    assert record.key == "user-1"


# --- one wait per request ---------------------------------------------------------------------


def _renewable() -> RenewableProducer:
    return RenewableProducer({"bootstrap.servers": NO_BROKER, **QUIET}, "test")


async def test_the_wait_ends_when_every_record_is_acknowledged() -> None:
    acks = Acknowledgements(asyncio.get_running_loop().create_future(), 3, _renewable())

    acks.delivered(None, None)  # the message itself is not read
    acks.delivered(None, None)
    assert not acks.future.done()
    acks.delivered(None, None)

    assert acks.future.done()
    assert acks.future.result() is None


async def test_the_first_failed_record_fails_the_wait_and_later_reports_change_nothing() -> None:
    acks = Acknowledgements(asyncio.get_running_loop().create_future(), 2, _renewable())

    acks.delivered(KafkaError(KafkaError._TRANSPORT, "broker gone"), None)
    acks.delivered(None, None)

    with pytest.raises(DeliveryFailed, match="broker gone"):
        acks.future.result()


async def test_reports_for_a_request_whose_client_left_are_ignored() -> None:
    acks = Acknowledgements(asyncio.get_running_loop().create_future(), 2, _renewable())
    acks.future.cancel()

    acks.delivered(None, None)
    acks.delivered(KafkaError(KafkaError._TRANSPORT, "late failure"), None)

    assert acks.future.cancelled()


# A real producer whose broker is not there: records queue locally, and fail when they time out.
NO_BROKER = "127.0.0.1:1"
QUIET = {"log_level": 0}


def _records(n: int) -> list[EncodedEvent]:
    return [EncodedEvent(f"user-{i}", b"{}", "web", "track") for i in range(n)]


async def test_a_request_that_does_not_fit_the_queue_is_refused_whole() -> None:
    publisher = KafkaEventPublisher(NO_BROKER, extra={**QUIET, "queue.buffering.max.messages": 4})

    with pytest.raises(ProducerBusy):
        await publisher.publish(_records(5))

    assert publisher.close(timeout=0) == 0  # none of its records was queued


async def test_a_record_the_broker_never_acknowledges_fails_the_request() -> None:
    publisher = KafkaEventPublisher(NO_BROKER, extra={**QUIET, "message.timeout.ms": 200})

    with pytest.raises(DeliveryFailed, match="timed out"):
        # The deadline bounds the wait; the delivery report arrives after 200 ms.
        await asyncio.wait_for(publisher.publish(_records(2)), timeout=30)

    assert publisher.close(timeout=0) == 0


async def test_a_publisher_whose_records_only_time_out_gets_a_new_producer() -> None:
    """After twice the message timeout of nothing but timeouts (here twice 100 ms), as after a
    broker restart that left librdkafka without the partition's leader for good."""
    publisher = KafkaEventPublisher(NO_BROKER, extra={**QUIET, "message.timeout.ms": 100})
    first = publisher._renewable.current
    deadline = asyncio.get_running_loop().time() + 30
    while publisher._renewable.current is first:
        assert asyncio.get_running_loop().time() < deadline, "the producer was never replaced"
        with pytest.raises(DeliveryFailed, match="timed out"):
            await asyncio.wait_for(publisher.publish(_records(1)), timeout=30)
    assert publisher.close(timeout=0) == 0


# --- settings, answers, authentication ----------------------------------------------------------


def test_the_worker_count_is_the_setting_or_one_per_available_core() -> None:
    assert IngestSettings(ingest_workers=3).worker_count() == 3
    cores = IngestSettings(ingest_workers=0).worker_count()
    assert cores >= 1
    assert IngestSettings().worker_count() == cores


@pytest.mark.parametrize(
    ("status", "header"),
    [(503, ("Retry-After", "1")), (401, ("WWW-Authenticate", 'Basic realm="waypost"'))],
)
def test_a_refusal_carries_the_header_its_status_calls_for(
    status: int, header: tuple[str, str]
) -> None:
    answer = refusal(Rejected(status, "no", field="x"))

    assert answer.status == status
    assert answer.headers == (header,)
    assert answer.body == b'{"success":false,"error":"no","field":"x"}'


def test_the_write_key_is_the_basic_user_name() -> None:
    def header(credentials: str) -> str:
        return "Basic " + base64.b64encode(credentials.encode()).decode()

    assert basic_user(header("k1:")) == "k1"
    assert basic_user(header("k1:secret")) == "k1"
    assert basic_user(header(":secret")) is None
    assert basic_user("Bearer k1") is None
    assert basic_user("Basic not-base64!") is None
    assert basic_user(None) is None


# --- the direct path answers as the FastAPI routes do ------------------------------------------


class RecordingPublisher:
    def __init__(self) -> None:
        self.records: list[EncodedEvent] = []

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        self.records.extend(events)


def _app(publisher: RecordingPublisher) -> TrackingCalls:
    ids = (f"generated-{n}" for n in itertools.count(1))
    app = create_app(SETTINGS, publisher, ManualClock(NOW), lambda: next(ids))
    assert isinstance(app, TrackingCalls)
    return app


K1 = {"Authorization": "Basic " + base64.b64encode(b"k1:").decode()}
REQUESTS: list[tuple[str, bytes, dict[str, str]]] = [
    ("/v1/track", b'{"userId": "u1", "event": "Signed Up"}', K1),
    ("/v1/identify", b'{"userId": "u1", "traits": {"plan": "pro"}, "writeKey": "k1"}', {}),
    ("/v1/track", b'{"userId": "u1"}', K1),
    ("/v1/track", b'{"userId": "u1", "event": "Signed Up"}', {}),
    ("/v1/track", b'{"userId": "u1", "event": "Signed Up", "writeKey": "nope"}', {}),
    ("/v1/page", b"{not json", K1),
    ("/v1/screen", b"[1, 2]", K1),
    ("/v1/track", b'{"userId": "u1", "event": "Unsubscribed"}', K1),
    ("/v1/batch", b'{"batch": [{"type": "track", "userId": "u1", "event": "A"}]}', K1),
    ("/v1/batch", b'{"batch": [{"type": "track", "userId": "u1"}]}', K1),
    ("/v1/batch", b'{"batch": [{"type": "merge", "userId": "u1"}]}', K1),
    ("/v1/batch", b'{"batch": []}', K1),
    ("/v1/track", b'{"userId": "u1", "event": "' + b"x" * 40_000 + b'"}', K1),
]


@pytest.mark.parametrize(("path", "body", "headers"), REQUESTS)
async def test_the_direct_path_answers_like_the_fastapi_route(
    path: str, body: bytes, headers: dict[str, str]
) -> None:
    direct_publisher, routed_publisher = RecordingPublisher(), RecordingPublisher()
    direct_app, routed_app = _app(direct_publisher), _app(routed_publisher).fallback

    answers = []
    for app in (direct_app, routed_app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
            answers.append(await client.post(path, content=body, headers=headers))
    direct, routed = answers

    assert direct.status_code == routed.status_code
    assert direct.json() == routed.json()
    for name in ("content-type", "retry-after", "www-authenticate"):
        assert direct.headers.get(name) == routed.headers.get(name)
    assert direct_publisher.records == routed_publisher.records


async def test_a_body_over_the_limit_is_refused_while_it_streams_in() -> None:
    publisher = RecordingPublisher()
    app = _app(publisher)
    chunks = [b'{"userId": "u1", "event": "', b"x" * 20_000, b"x" * 20_000, b'"}']
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        chunk = chunks[received - 1]
        return {"type": "http.request", "body": chunk, "more_body": received < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/track",
        "headers": [(b"authorization", K1["Authorization"].encode())],  # no content-length
    }
    await app(scope, receive, send)

    assert sent[0]["status"] == 413
    assert received == 3  # it stopped reading once past 32 KB
    assert publisher.records == []
