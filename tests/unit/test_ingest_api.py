"""The Segment-compatible ingest HTTP API, served in-process through httpx's ASGI transport.

A recording publisher stands in for Kafka and a manual clock for time; no server, no network.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.ingest.app import create_app
from services.ingest.domain.calls import EncodedEvent
from services.ingest.settings import IngestSettings
from shared.bodies import MAX_JSON_DEPTH
from shared.clock import ManualClock
from shared.contracts import Event
from shared.kafka import DeliveryFailed, ProducerBusy

NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
SETTINGS = IngestSettings(ingest_write_keys="dev:k1,web:k2", ingest_api_docs=True)


class RecordingPublisher:
    """Acknowledges every event at once and keeps them in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        self.events.extend(Event.model_validate_json(e.value) for e in events)


class RefusingPublisher:
    """Fails every publish with the given exception."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        raise self.error


def basic(key: str) -> dict[str, str]:
    """Segment's auth: the write key as the Basic user name, an empty password."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def client_for(publisher: Any, clock: ManualClock | None = None) -> httpx.AsyncClient:
    ids = (f"generated-{n}" for n in itertools.count(1))
    app = create_app(SETTINGS, publisher, clock or ManualClock(NOW), lambda: next(ids))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest")


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
async def client(
    publisher: RecordingPublisher, clock: ManualClock
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(publisher, clock) as client:
        yield client


MINIMAL_CALLS: dict[str, dict[str, Any]] = {
    "track": {"userId": "user-1", "event": "Registered"},
    "identify": {"userId": "user-1", "traits": {"email": "ada@example.com"}},
    "page": {"anonymousId": "anon-1", "name": "Home"},
    "screen": {"userId": "user-1", "name": "Settings"},
    "alias": {"userId": "user-1", "previousId": "anon-1"},
    "group": {"userId": "user-1", "groupId": "acme"},
}


# --- accepted calls -------------------------------------------------------------------------


@pytest.mark.parametrize("call_type", MINIMAL_CALLS)
async def test_each_call_type_is_accepted_with_basic_auth(
    client: httpx.AsyncClient, publisher: RecordingPublisher, call_type: str
) -> None:
    response = await client.post(
        f"/v1/{call_type}", json=MINIMAL_CALLS[call_type], headers=basic("k1")
    )

    assert response.status_code == 200
    assert response.json() == {"success": True}
    (event,) = publisher.events
    assert (event.type, event.source) == (call_type, "dev")


@pytest.mark.parametrize("call_type", MINIMAL_CALLS)
async def test_each_call_type_is_accepted_with_write_key_in_the_body(
    client: httpx.AsyncClient, publisher: RecordingPublisher, call_type: str
) -> None:
    body = {**MINIMAL_CALLS[call_type], "writeKey": "k2"}

    response = await client.post(f"/v1/{call_type}", json=body)

    assert response.status_code == 200
    assert response.json() == {"success": True}
    (event,) = publisher.events
    assert (event.type, event.source) == (call_type, "web")


async def test_a_track_call_becomes_an_event_with_its_fields(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {"userId": "user-1", "event": "Order Completed", "properties": {"total": 42}}

    await client.post("/v1/track", json=body, headers=basic("k1"))

    (event,) = publisher.events
    assert event.event == "Order Completed"
    assert event.properties == {"total": 42}
    assert event.message_id == "generated-1"
    assert event.timestamp == event.received_at == NOW


async def test_a_given_message_id_is_preserved(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {"userId": "user-1", "event": "Registered", "messageId": "client-abc"}

    await client.post("/v1/track", json=body, headers=basic("k1"))

    assert publisher.events[0].message_id == "client-abc"


async def test_a_numeric_user_id_becomes_a_string(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.post(
        "/v1/track", json={"userId": 12345, "event": "Registered"}, headers=basic("k1")
    )

    assert response.status_code == 200
    assert publisher.events[0].user_id == "12345"


async def test_sent_at_corrects_the_client_clock_skew_of_the_timestamp(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    # The client's clock is 5 minutes behind: it sent "11:55" when the server read 12:00.
    body = {
        "userId": "user-1",
        "event": "Registered",
        "timestamp": "2025-03-03T11:50:00Z",
        "sentAt": "2025-03-03T11:55:00Z",
    }

    await client.post("/v1/track", json=body, headers=basic("k1"))

    assert publisher.events[0].timestamp == datetime(2025, 3, 3, 11, 55, tzinfo=UTC)


async def test_a_skew_over_a_day_is_not_corrected(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {
        "userId": "user-1",
        "event": "Registered",
        "timestamp": "2025-02-01T11:50:00Z",
        "sentAt": "2025-02-01T11:55:00Z",
    }

    await client.post("/v1/track", json=body, headers=basic("k1"))

    assert publisher.events[0].timestamp == datetime(2025, 2, 1, 11, 50, tzinfo=UTC)


async def test_a_timestamp_without_offset_is_read_as_utc(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {"userId": "user-1", "event": "Registered", "timestamp": "2025-03-03T08:00:00"}

    await client.post("/v1/track", json=body, headers=basic("k1"))

    assert publisher.events[0].timestamp == datetime(2025, 3, 3, 8, 0, tzinfo=UTC)


async def test_a_call_with_sent_at_but_no_timestamp_is_dated_when_received(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {"userId": "user-1", "event": "Registered", "sentAt": "2025-03-03T11:00:00Z"}

    await client.post("/v1/track", json=body, headers=basic("k1"))

    assert publisher.events[0].timestamp == NOW


# --- refused calls --------------------------------------------------------------------------


async def test_a_call_without_a_write_key_is_unauthorized(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.post("/v1/track", json=MINIMAL_CALLS["track"])

    assert response.status_code == 401
    assert response.json()["success"] is False
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert publisher.events == []


@pytest.mark.parametrize(
    ("headers", "body_key"),
    [(basic("nope"), None), ({}, "nope")],
    ids=["basic-auth", "body"],
)
async def test_a_call_with_an_unknown_write_key_is_unauthorized(
    client: httpx.AsyncClient, headers: dict[str, str], body_key: str | None
) -> None:
    body = {**MINIMAL_CALLS["track"], **({"writeKey": body_key} if body_key else {})}

    response = await client.post("/v1/track", json=body, headers=headers)

    assert response.status_code == 401
    assert response.json()["error"] == "unknown write key"


async def test_track_without_event_is_a_bad_request_naming_event(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.post("/v1/track", json={"userId": "user-1"}, headers=basic("k1"))

    assert response.status_code == 400
    assert "event is required" in response.json()["error"]
    assert publisher.events == []


async def test_track_without_event_reports_event_as_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", json={"userId": "user-1"}, headers=basic("k1"))

    assert response.json().get("field") == "event"


async def test_a_call_without_user_or_anonymous_id_is_a_bad_request(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/track", json={"event": "Registered"}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["error"] == "userId: userId or anonymousId is required"
    assert response.json()["field"] == "userId"


async def test_an_empty_user_id_is_a_bad_request_naming_user_id(
    client: httpx.AsyncClient,
) -> None:
    body = {"userId": "", "event": "Registered"}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "userId"


async def test_a_bad_timestamp_is_a_bad_request_naming_timestamp(
    client: httpx.AsyncClient,
) -> None:
    body = {"userId": "user-1", "event": "Registered", "timestamp": "yesterday"}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "timestamp"
    assert response.json()["error"].startswith("timestamp: ")


@pytest.mark.parametrize(
    ("call_type", "body", "missing"),
    [
        ("alias", {"userId": "user-1"}, "previousId"),
        ("group", {"userId": "user-1"}, "groupId"),
    ],
)
async def test_alias_and_group_require_their_ids(
    client: httpx.AsyncClient, call_type: str, body: dict[str, Any], missing: str
) -> None:
    response = await client.post(f"/v1/{call_type}", json=body, headers=basic("k1"))

    assert response.status_code == 400
    assert missing in response.json()["error"]


async def test_a_body_that_is_not_json_is_a_bad_request(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", content=b"{not json", headers=basic("k1"))

    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


async def test_a_body_that_is_not_an_object_is_a_bad_request(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", json=["a"], headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["error"] == "body must be a JSON object"


async def test_an_event_over_32_kb_is_too_large(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {**MINIMAL_CALLS["track"], "properties": {"blob": "x" * (32 * 1024)}}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 413
    assert "32768" in response.json()["error"]
    assert publisher.events == []


async def test_a_batch_over_500_kb_is_too_large(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    item = {**MINIMAL_CALLS["track"], "type": "track", "properties": {"blob": "x" * (30 * 1024)}}

    response = await client.post("/v1/batch", json={"batch": [item] * 20}, headers=basic("k1"))

    assert response.status_code == 413
    assert str(500 * 1024) in response.json()["error"]
    assert publisher.events == []


async def test_a_batch_item_over_32_kb_is_too_large_and_named(client: httpx.AsyncClient) -> None:
    small = {**MINIMAL_CALLS["track"], "type": "track"}
    big = {**small, "properties": {"blob": "x" * (33 * 1024)}}

    response = await client.post("/v1/batch", json={"batch": [small, big]}, headers=basic("k1"))

    assert response.status_code == 413
    assert response.json()["field"] == "batch[1]"


@pytest.mark.parametrize(
    "error",
    [ProducerBusy("queue full"), DeliveryFailed("broker down")],
    ids=["busy", "delivery-failed"],
)
async def test_an_unavailable_event_log_is_503_with_retry_after(error: Exception) -> None:
    async with client_for(RefusingPublisher(error)) as client:
        response = await client.post("/v1/track", json=MINIMAL_CALLS["track"], headers=basic("k1"))

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["success"] is False


# --- batches --------------------------------------------------------------------------------


async def test_a_mixed_batch_publishes_every_call_with_distinct_message_ids(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    batch = [{"type": call_type, **body} for call_type, body in MINIMAL_CALLS.items()]

    response = await client.post("/v1/batch", json={"batch": batch}, headers=basic("k1"))

    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert [e.type for e in publisher.events] == list(MINIMAL_CALLS)
    assert len({e.message_id for e in publisher.events}) == len(MINIMAL_CALLS)
    assert {e.source for e in publisher.events} == {"dev"}


async def test_a_batch_shares_one_received_at(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    batch = [{"type": "track", **MINIMAL_CALLS["track"]}] * 3

    await client.post("/v1/batch", json={"batch": batch, "writeKey": "k2"})

    assert {e.received_at for e in publisher.events} == {NOW}
    assert {e.source for e in publisher.events} == {"web"}


async def test_a_batch_context_is_merged_under_each_item_context(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    item = {"type": "track", **MINIMAL_CALLS["track"], "context": {"locale": "fr", "ip": "1.2.3.4"}}
    body = {"batch": [item], "context": {"library": {"name": "sdk"}, "locale": "en"}}

    await client.post("/v1/batch", json=body, headers=basic("k1"))

    assert publisher.events[0].context == {
        "library": {"name": "sdk"},
        "locale": "fr",
        "ip": "1.2.3.4",
    }


async def test_a_bad_batch_item_is_named_by_index_and_nothing_is_published(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    good = {"type": "track", **MINIMAL_CALLS["track"]}
    bad = {"type": "track", "userId": "user-1", "event": "X", "timestamp": "nope"}

    response = await client.post("/v1/batch", json={"batch": [good, bad]}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "batch[1].timestamp"
    assert publisher.events == []


async def test_a_batch_item_missing_its_event_is_named_by_index(
    client: httpx.AsyncClient,
) -> None:
    good = {"type": "track", **MINIMAL_CALLS["track"]}
    bad = {"type": "track", "userId": "user-1"}

    response = await client.post("/v1/batch", json={"batch": [good, bad]}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "batch[1].event"
    assert response.json()["error"] == "batch[1].event: event is required for track calls"


async def test_a_batch_item_with_an_unknown_type_is_named(client: httpx.AsyncClient) -> None:
    body = {"batch": [{"type": "click", "userId": "user-1"}]}

    response = await client.post("/v1/batch", json=body, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "batch[0].type"


async def test_a_batch_without_items_is_a_bad_request(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/batch", json={"batch": []}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "batch"


async def test_a_batch_keeps_the_message_ids_it_was_given(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    batch = [
        {"type": "track", **MINIMAL_CALLS["track"], "messageId": "client-1"},
        {"type": "track", **MINIMAL_CALLS["track"]},
    ]

    await client.post("/v1/batch", json={"batch": batch}, headers=basic("k1"))

    first, second = publisher.events
    assert first.message_id == "client-1"
    assert second.message_id.startswith("generated-")


async def test_a_batch_item_with_a_non_object_context_is_a_bad_request(
    client: httpx.AsyncClient,
) -> None:
    item = {"type": "track", **MINIMAL_CALLS["track"], "context": "mobile"}

    response = await client.post("/v1/batch", json={"batch": [item]}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"].startswith("batch[0]")


# --- service endpoints ----------------------------------------------------------------------


async def test_health_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_the_openapi_document_lists_the_tracking_routes(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/v1/track" in paths
    assert "/v1/batch" in paths
    body_schema = paths["/v1/track"]["post"]["requestBody"]["content"]["application/json"]
    assert "userId" in body_schema["schema"]["properties"]


@pytest.mark.parametrize(
    ("env", "choice", "served"),
    [("production", None, False), ("dev", None, True), ("production", True, True)],
)
async def test_the_api_docs_are_served_only_in_dev_unless_set(
    publisher: RecordingPublisher, env: str, choice: bool | None, served: bool
) -> None:
    settings = IngestSettings(ingest_write_keys="dev:k1", env=env, ingest_api_docs=choice)
    app = create_app(settings, publisher, ManualClock(NOW))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        answers = [(await client.get(path)).status_code for path in DOCS_PATHS]
        track = await client.post("/v1/track", json=MINIMAL_CALLS["track"], headers=basic("k1"))

    assert answers == ([200, 200, 200] if served else [404, 404, 404])
    assert track.status_code == 200


DOCS_PATHS = ("/openapi.json", "/docs", "/redoc")


async def test_the_clock_dates_each_call(
    client: httpx.AsyncClient, publisher: RecordingPublisher, clock: ManualClock
) -> None:
    await client.post("/v1/track", json=MINIMAL_CALLS["track"], headers=basic("k1"))
    clock.advance(timedelta(minutes=3))
    await client.post("/v1/track", json=MINIMAL_CALLS["track"], headers=basic("k1"))

    assert [e.received_at for e in publisher.events] == [NOW, NOW + timedelta(minutes=3)]


@pytest.mark.parametrize(
    "name",
    [
        "Contact Forgotten",
        "Subscribed",
        "Unsubscribed",
        "Segment Entered",
        "Tag Added",
        "Attribute Changed",
        "Audience Selected",
        "Message Delivered",
        "Email Opened",
        "Email Link Clicked",
        "message sent",  # any letter case
        " Unsubscribed ",
    ],
)
async def test_a_write_key_cannot_send_the_events_waypost_emits(
    client: httpx.AsyncClient, publisher: RecordingPublisher, name: str
) -> None:
    body = {"userId": "user-1", "event": name, "properties": {"channel": "all"}}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "event"
    assert "Waypost emits itself" in response.json()["error"]
    assert publisher.events == []


async def test_a_batch_naming_a_system_event_is_refused_whole(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    good = {"type": "track", **MINIMAL_CALLS["track"]}
    forged = {"type": "track", "userId": "user-1", "event": "Message Delivered"}

    response = await client.post("/v1/batch", json={"batch": [good, forged]}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "batch[1].event"
    assert publisher.events == []


async def test_behaviour_that_merely_resembles_a_system_event_is_accepted(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {"userId": "user-1", "event": "Newsletter Subscribed"}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 200
    assert [e.event for e in publisher.events] == ["Newsletter Subscribed"]
    assert publisher.events[0].source == "dev"


def test_a_write_key_may_not_be_named_like_a_waypost_source() -> None:
    with pytest.raises(ValueError, match="reserved for Waypost"):
        IngestSettings(ingest_write_keys="waypost-links:k3").write_keys()


# --- input that must not break anything --------------------------------------------------------


def nested(levels: int) -> object:
    value: object = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value


async def test_properties_nested_to_the_limit_are_accepted(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = {**MINIMAL_CALLS["track"], "properties": nested(MAX_JSON_DEPTH)}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 200
    assert len(publisher.events) == 1


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 199, 250, 1000])
@pytest.mark.parametrize("field", ["properties", "traits", "context"])
async def test_nesting_past_the_limit_is_a_bad_request_naming_the_field(
    client: httpx.AsyncClient, publisher: RecordingPublisher, field: str, levels: int
) -> None:
    value = '{"a":' * levels + "1" + "}" * levels
    body = '{"userId":"user-1","' + field + '":' + value + "}"

    response = await client.post("/v1/identify", content=body.encode(), headers=basic("k1"))

    assert response.status_code == 400
    # A deep trait is also over the trait size limit, which may be named first (traits.a).
    assert response.json()["field"] in (field, f"{field}.a")
    assert publisher.events == []


async def test_a_batch_item_nested_too_deep_is_named_and_nothing_is_published(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    good = {**MINIMAL_CALLS["track"], "type": "track"}
    deep = {**good, "properties": nested(40)}

    response = await client.post("/v1/batch", json={"batch": [good, deep]}, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == "batch[1].properties"
    assert publisher.events == []


async def test_a_gzipped_call_is_accepted(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    body = gzip.compress(
        json.dumps({"batch": [{**MINIMAL_CALLS["track"], "type": "track"}]}).encode()
    )

    response = await client.post(
        "/v1/batch", content=body, headers={**basic("k1"), "Content-Encoding": "gzip"}
    )

    assert response.status_code == 200, response.text
    assert [e.event for e in publisher.events] == ["Registered"]


async def test_a_gzip_bomb_is_too_large_once_decompressed(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    padding = " " * (10 * 1024 * 1024)
    bomb = gzip.compress(('{"userId":"u","event":"E"' + padding + "}").encode())

    response = await client.post(
        "/v1/track", content=bomb, headers={**basic("k1"), "Content-Encoding": "gzip"}
    )

    assert response.status_code == 413
    assert "decompressed" in response.json()["error"]
    assert publisher.events == []


async def test_an_unknown_content_encoding_is_unsupported(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/track",
        content=json.dumps(MINIMAL_CALLS["track"]).encode(),
        headers={**basic("k1"), "Content-Encoding": "br"},
    )

    assert response.status_code == 415
    assert response.json()["field"] == "Content-Encoding"


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    client: httpx.AsyncClient,
) -> None:
    async def endless() -> AsyncIterator[bytes]:
        yield b'{"userId":"u",'
        raise AssertionError("the body was read past its declared length")

    response = await client.post(
        "/v1/track",
        content=endless(),
        headers={**basic("k1"), "Content-Length": str(64 * 1024)},
    )

    assert response.status_code == 413
    assert response.json()["field"] == "Content-Length"


async def test_a_streamed_body_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 1
            yield b" " * 1024

    response = await client.post("/v1/track", content=chunks(), headers=basic("k1"))

    assert response.status_code == 413
    assert sent < 100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timestamp", "1999-12-31T23:59:59Z"),
        ("timestamp", "0001-01-01T00:00:00Z"),
        ("timestamp", (NOW + timedelta(days=1, seconds=1)).isoformat()),
        ("sentAt", "9999-12-31T23:59:59Z"),
        ("originalTimestamp", "1970-01-01T00:00:00Z"),
    ],
)
async def test_a_timestamp_outside_the_window_is_a_bad_request_naming_it(
    client: httpx.AsyncClient, publisher: RecordingPublisher, field: str, value: str
) -> None:
    body = {**MINIMAL_CALLS["track"], field: value}

    response = await client.post("/v1/track", json=body, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert publisher.events == []


async def test_timestamps_at_the_edges_of_the_window_are_accepted(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    for value in ("2000-01-01T00:00:00Z", (NOW + timedelta(days=1)).isoformat()):
        body = {**MINIMAL_CALLS["track"], "timestamp": value}
        response = await client.post("/v1/track", json=body, headers=basic("k1"))
        assert response.status_code == 200, response.text

    assert len(publisher.events) == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rb'{"userId":"u","event":"Viewed \ud800"}', "event"),
        (rb'{"userId":"u","event":"E","properties":{"sku":"\udfff"}}', "properties.sku"),
        (rb'{"userId":"\ud83d","event":"E"}', "userId"),
    ],
)
async def test_a_lone_surrogate_is_a_bad_request_naming_the_field(
    client: httpx.AsyncClient, body: bytes, field: str
) -> None:
    response = await client.post("/v1/track", content=body, headers=basic("k1"))

    assert response.status_code == 400
    assert response.json()["field"] == field


@pytest.mark.parametrize(
    "header",
    [
        b"Basic \xc3\xa9\xc3\xa9",
        b"Basic \xff\xfe",
        "Basic " + base64.b64encode("é:".encode()).decode(),
    ],
)
async def test_a_write_key_that_is_not_ascii_is_unauthorized(
    client: httpx.AsyncClient, header: bytes | str
) -> None:
    raw = header if isinstance(header, bytes) else header.encode()

    response = await client.post(
        "/v1/track",
        content=json.dumps(MINIMAL_CALLS["track"]).encode(),
        headers=[(b"authorization", raw)],
    )

    assert response.status_code == 401


async def test_more_traits_than_a_profile_holds_is_a_bad_request(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    traits = {f"t{n}": n for n in range(257)}

    response = await client.post(
        "/v1/identify", json={"userId": "u", "traits": traits}, headers=basic("k1")
    )

    assert response.status_code == 400
    assert response.json()["field"] == "traits"
    assert publisher.events == []


async def test_a_trait_over_its_size_limit_is_a_bad_request_naming_it(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    traits = {"plan": "pro", "bio": "x" * 1100}

    response = await client.post(
        "/v1/identify", json={"userId": "u", "traits": traits}, headers=basic("k1")
    )

    assert response.status_code == 400
    assert response.json()["field"] == "traits.bio"
    assert publisher.events == []


@pytest.mark.parametrize("route", ["/u/{}", "/o/{}.gif", "/c/{}"])
@pytest.mark.parametrize(
    "token",
    [
        base64.urlsafe_b64encode(b"[" * 3000).rstrip(b"=").decode() + ".abc",
        "e30.abc",
        "a" * 9000 + ".b",
        "%C3%A9.abc",
        "abc.%00",
    ],
    ids=["deep", "empty-claims", "long", "non-ascii", "nul"],
)
async def test_a_malformed_link_token_is_a_bad_request(
    client: httpx.AsyncClient, route: str, token: str
) -> None:
    response = await client.get(route.format(token))

    assert response.status_code == 400
    assert response.json()["field"] == "token"


async def test_a_form_body_over_the_limit_is_refused_as_it_streams(
    client: httpx.AsyncClient,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    response = await client.post("/v1/sms/status/abc.def", content=chunks())

    assert response.status_code == 413
