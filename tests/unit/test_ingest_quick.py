"""The quick path (msgspec) against the checked path (pydantic's `Call`): for any request, valid
or not, ingest publishes the same records or refuses with the same answer either way, and the
calls SDKs send are served by the quick path, not declined.

No server and no broker: a publisher that records what it is handed.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.ingest import make_call
from services.ingest.domain import quick
from services.ingest.domain.calls import Call, EncodedEvent
from services.ingest.intake import CallIntake, IngestMetrics
from services.ingest.settings import IngestSettings
from shared.bodies import BadInput
from shared.clock import ManualClock
from shared.profiles import DEFAULT_LIMITS
from tests.unit.test_ingest_records import _json  # JSON values, NaN and infinities too

NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
SETTINGS = IngestSettings(ingest_write_keys="web:k1")
AUTH = "Basic " + base64.b64encode(b"k1:").decode()


class Recorded:
    def __init__(self) -> None:
        self.events: list[EncodedEvent] = []

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        self.events.extend(events)


def _intake(quick_path: bool) -> tuple[CallIntake, Recorded]:
    publisher = Recorded()
    counter = iter(range(10**9))
    intake = CallIntake(
        SETTINGS,
        publisher,
        ManualClock(NOW),
        IngestMetrics(),
        lambda: f"generated-{next(counter)}",
        quick_path=quick_path,
    )
    return intake, publisher


_GENERATED = re.compile(rb'"messageId":"generated-\d+"')


async def _outcome(
    quick_path: bool, route: str, body: bytes, authorization: str | None
) -> tuple[Any, ...]:
    """What ingest did with the request: the records it published (drawn message ids made
    alike: a declined batch may have drawn some), or its refusal."""
    intake, publisher = _intake(quick_path)
    try:
        if route == "batch":
            await intake.batch(body, authorization)
        else:
            await intake.call(route, body, authorization)
    except BadInput as exc:  # `Rejected`, or `TooDeep` from the parser
        return ("refused", exc.status, exc.message, exc.field)
    return (
        "published",
        [
            (e.key, _GENERATED.sub(b'"messageId":"generated"', e.value), e.source, e.call_type)
            for e in publisher.events
        ],
    )


# --- calls of every kind, valid and not -------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


_objects = st.one_of(
    st.dictionaries(st.text(max_size=6), _json, max_size=4),
    st.just({}),
    st.none(),
    st.just([1]),
    st.just("text"),
    st.sampled_from([_nested(31), _nested(33), _nested(250)]),
)
_traits = st.one_of(
    _objects,
    st.just({f"t{i}": i for i in range(257)}),
    st.just({"big": "x" * 1100}),
    st.just({"fits": "x" * 900}),
)
_ids = st.one_of(
    st.text(min_size=1, max_size=12),
    st.just(""),
    st.just("é" * 256),
    st.just("😀" * 257),
    st.just("x" * 257),
    st.none(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.just(10**300),
)
_names = st.one_of(
    st.sampled_from(["Order Completed", "Product Viewed", "", "x" * 257, "y" * 256]),
    st.sampled_from(["Segment Entered", " unsubscribed ", "MESSAGE SENT"]),
    st.none(),
    st.integers(0, 9),
)
_zones = st.sampled_from(
    [UTC, None, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
)


_ODD_TIMES = [
    "2025-03-03T11:00:00Z",
    "2025-03-03t11:00:00z",
    "2025-03-03 11:00:00Z",
    "2025-03-03T11:00:00.1234567Z",
    "2025-03-03T11:00:00.9999995+01:00",
    "2025-03-03T11:00:00.123456789Z",
    "2025-03-03",
    "2025-03-03T11:00Z",
    "2025-03-03T11:00:00+0100",
    "2025-03-03T11:00:00-00:00",
    "2025-03-03T11:00:00",
    "2025-03-03T11:00:00,5Z",
    "2025-02-30T11:00:00Z",
    "1999-12-31T23:59:59Z",
    "2000-01-01T00:00:00Z",
    "2000-01-01T00:30:00+01:00",
    "2025-03-04T12:00:00Z",
    "2025-03-04T12:00:00.000001Z",
    "2025-03-04T13:00:00+01:00",
    "not a time",
    1_741_000_000,
    1.7e9,
    None,
    True,
]


@st.composite
def _times(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 5))
    if kind == 0:  # plain RFC 3339, in the window or not
        when = draw(st.datetimes(min_value=datetime(1999, 12, 30), max_value=datetime(2025, 3, 5)))
        return when.replace(tzinfo=draw(_zones)).isoformat()
    if kind == 1:  # other spellings of a time, and not times
        return draw(st.sampled_from(_ODD_TIMES))
    if kind == 2:  # numbers: pydantic reads them as Unix times
        return draw(st.sampled_from([1_741_000_000, 1_741_000_000_000, 1.7e9, 0]))
    if kind == 3:
        return None
    # naive: read as UTC
    return draw(
        st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2025, 3, 3))
    ).isoformat()


_valid_time = st.builds(
    lambda when, zone: when.replace(tzinfo=zone).isoformat(),
    st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2025, 3, 3)),
    _zones,
)
_WILD: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["bogus", None, 3, "identify", "alias", "group"]),
    "userId": _ids,
    "anonymousId": _ids,
    "messageId": _ids,
    "event": _names,
    "name": _names,
    "previousId": _ids,
    "groupId": _ids,
    "timestamp": _times(),
    "sentAt": _times(),
    "originalTimestamp": _times(),
    "properties": _objects,
    "traits": _traits,
    "context": _objects,
    "writeKey": st.sampled_from(["k1", "nope", None, 7]),
    "integrations": _objects,
    "channel": st.just("web"),
    "user_id": st.just("snake"),
    "message_id": st.just("m-snake"),
    "deep": st.just(_nested(40)),
    "schemaVersion": st.just(2),
}


@st.composite
def messy_calls(draw: st.DrawFn) -> dict[str, Any]:
    """A whole call, then up to three of its fields given something odd, or dropped."""
    call_type = draw(st.sampled_from(["track", "identify", "page", "screen", "alias", "group"]))
    body: dict[str, Any] = {"type": call_type, "userId": draw(st.text(min_size=1, max_size=9))}
    if draw(st.booleans()):
        body["anonymousId"] = draw(st.text(min_size=1, max_size=9))
    body["event"] = draw(st.sampled_from(["Order Completed", "Signed Up"]))
    if call_type == "alias":
        body["previousId"] = "anon-1"
    if call_type == "group":
        body["groupId"] = "acme"
    for field in ("messageId", "name"):
        if draw(st.booleans()):
            body[field] = draw(st.text(min_size=1, max_size=9))
    for field in ("timestamp", "sentAt", "originalTimestamp"):
        if draw(st.booleans()):
            body[field] = draw(_valid_time)
    for field in ("properties", "traits", "context"):
        if draw(st.booleans()):
            body[field] = draw(st.dictionaries(st.text(max_size=6), _json, max_size=4))
    for field in draw(st.lists(st.sampled_from(sorted(_WILD)), max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            body.pop(field, None)
        else:
            body[field] = draw(_WILD[field])
    return body


_authorizations = st.sampled_from(
    [AUTH, AUTH, AUTH, None, "Basic " + base64.b64encode(b"x:").decode()]
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=messy_calls(),
    route=st.sampled_from(["track", "identify", "page", "screen", "alias", "group"]),
    authorization=_authorizations,
)
async def test_a_call_is_published_or_refused_alike_by_either_path(
    body: dict[str, Any], route: str, authorization: str | None
) -> None:
    raw = json.dumps(body).encode()

    assert await _outcome(True, route, raw, authorization) == await _outcome(
        False, route, raw, authorization
    )


_ODD_IDS = ["", "é" * 256, "😀" * 256, "😀" * 257, "x" * 257, None, 42, -1.5, True, 10**300, [], {}]
_ODD_NAMES = [
    "",
    "x" * 256,
    "x" * 257,
    "Segment Entered",
    " unsubscribed ",
    "MESSAGE SENT",
    None,
    7,
]
_ODD_OBJECTS = [
    {},
    None,
    [1],
    "text",
    _nested(32),
    _nested(33),
    _nested(250),
    {"big": "x" * 33_000},
]
_ODD_VALUES: dict[str, list[Any]] = {
    "type": ["bogus", None, 3, "identify", "alias", "group", "TRACK"],
    "userId": _ODD_IDS,
    "anonymousId": _ODD_IDS,
    "messageId": _ODD_IDS,
    "event": _ODD_NAMES,
    "name": _ODD_NAMES,
    "previousId": _ODD_NAMES,
    "groupId": _ODD_NAMES,
    "timestamp": _ODD_TIMES,
    "sentAt": _ODD_TIMES,
    "originalTimestamp": _ODD_TIMES,
    "properties": _ODD_OBJECTS,
    "traits": [
        *_ODD_OBJECTS,
        {f"t{i}": i for i in range(256)},
        {f"t{i}": i for i in range(257)},
        {"big": "x" * 1100},
        {"fits": "x" * 900},
    ],
    "context": _ODD_OBJECTS,
    "writeKey": ["k1", "nope", None, 7],
    "integrations": _ODD_OBJECTS,
    "user_id": ["snake"],
    "anonymous_id": ["snake"],
    "message_id": ["m-snake"],
    "sent_at": ["2025-03-03T11:00:00Z"],
    "write_key": ["k1", 7],
    "schemaVersion": [2],
}
_WHOLE_CALLS = [
    {"type": "track", "userId": "user-1", "event": "Order Completed"},
    {"type": "identify", "anonymousId": "anon-1", "traits": {"plan": "pro"}},
    {"type": "page", "userId": "user-1", "name": "Home", "timestamp": "2025-03-03T11:00:00Z"},
    {"type": "alias", "userId": "user-1", "previousId": "anon-1"},
    {"type": "group", "userId": "user-1", "groupId": "acme"},
]


@pytest.mark.parametrize("whole", _WHOLE_CALLS, ids=lambda c: str(c["type"]))
@pytest.mark.parametrize("field", sorted(_ODD_VALUES))
async def test_each_odd_value_of_each_field_gets_the_same_answer(
    whole: dict[str, Any], field: str
) -> None:
    """One field at a time, every value the quick path must decline or read as `Call` does, in
    a single call, with `sentAt` beside it, and in a batch with a shared context."""
    dropped = {name: value for name, value in whole.items() if name != field}
    for body in [*({**whole, field: value} for value in _ODD_VALUES[field]), dropped]:
        value = body.get(field, "(dropped)")
        for variant in (body, {**body, "sentAt": "2025-03-03T11:55:00Z"}):
            raw = json.dumps(variant).encode()
            call = await _outcome(True, str(whole["type"]), raw, AUTH)
            assert call == await _outcome(False, str(whole["type"]), raw, AUTH), (field, value)
        batch = json.dumps({"batch": [whole, body], "context": {"ip": "x"}}).encode()
        assert await _outcome(True, "batch", batch, AUTH) == await _outcome(
            False, "batch", batch, AUTH
        ), (field, value)


_ODD_BATCHES: list[Any] = [
    {"batch": []},
    {"batch": None},
    {"batch": {}},
    {"batch": [1]},
    {"batch": [_WHOLE_CALLS[0]] * 10_001},
    {"batch": [_WHOLE_CALLS[0]], "write_key": "k1"},
    {"batch": [_WHOLE_CALLS[0]], "write_key": 7},
    {"batch": [_WHOLE_CALLS[0]], "writeKey": 7},
    {"batch": [_WHOLE_CALLS[0]], "writeKey": None},
    {"batch": [_WHOLE_CALLS[0]], "context": None},
    {"batch": [_WHOLE_CALLS[0]], "context": []},
    {"batch": [_WHOLE_CALLS[0]], "context": _nested(40)},
    {"batch": [_WHOLE_CALLS[0]], "deep": _nested(40)},
    {"batch": [_WHOLE_CALLS[0]], "deep": _nested(20)},
    *(
        {"batch": [{**_WHOLE_CALLS[0], "context": context}], "context": {"ip": "x"}}
        for context in (0, "", [], False, "text", [1], {"ip": "y"}, None)
    ),
    {"batch": [{"userId": "u", "event": "e"}]},
    {"batch": [{**_WHOLE_CALLS[0], "type": "TRACK"}]},
]
_DEEP = "[" * 250 + "]" * 250
_CALL = json.dumps(_WHOLE_CALLS[0])
# Nesting the parser refuses, in a value a later duplicate key of the envelope replaces.
_DUPLICATED_ENVELOPES = [
    '{"batch": ' + _DEEP + ', "batch": [' + _CALL + "]}",
    '{"batch": [' + _CALL + '], "context": ' + _DEEP + ', "context": {}}',
    '{"batch": [' + _CALL + '], "writeKey": ' + _DEEP + ', "writeKey": "k1"}',
]


@pytest.mark.parametrize("raw", _DUPLICATED_ENVELOPES)
async def test_an_envelope_with_a_deep_value_replaced_gets_the_checked_answer(raw: str) -> None:
    refused = await _outcome(True, "batch", raw.encode(), AUTH)

    assert refused == await _outcome(False, "batch", raw.encode(), AUTH)
    assert refused[:2] == ("refused", 400)


@pytest.mark.parametrize("body", _ODD_BATCHES, ids=lambda b: str(sorted(b))[:40])
@pytest.mark.parametrize("authorization", [AUTH, None])
async def test_each_odd_batch_gets_the_same_answer(
    body: dict[str, Any], authorization: str | None
) -> None:
    raw = json.dumps({"writeKey": "k1", **body} if authorization is None else body).encode()

    assert await _outcome(True, "batch", raw, authorization) == await _outcome(
        False, "batch", raw, authorization
    )


@st.composite
def messy_batches(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"batch": draw(st.lists(messy_calls(), min_size=0, max_size=4))}
    if draw(st.integers(0, 6)) == 0:
        body["batch"] = draw(st.sampled_from([None, {}, [1], ["x"]]))
    for field, values in (
        ("context", _objects),
        ("writeKey", st.sampled_from(["k1", "nope", None, 7])),
        ("write_key", st.just("k1")),
        ("sentAt", _times()),
        ("deep", st.just(_nested(40))),
    ):
        if draw(st.integers(0, 3)) == 0:
            body[field] = draw(values)
    for item in body["batch"] if isinstance(body["batch"], list) else ():
        if isinstance(item, dict) and draw(st.integers(0, 3)) == 0:
            item["context"] = draw(st.sampled_from([0, "", [], "text", [1], {"ip": "x"}]))
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=messy_batches(), authorization=_authorizations)
async def test_a_batch_is_published_or_refused_alike_by_either_path(
    body: dict[str, Any], authorization: str | None
) -> None:
    raw = json.dumps(body).encode()

    assert await _outcome(True, "batch", raw, authorization) == await _outcome(
        False, "batch", raw, authorization
    )


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


_WHOLE = b'"userId": "u", "event": "e"'


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"null",
        b'{"type": "track", "userId": "u", "event": "e", "properties": {"x": NaN}}',
        b'{"type": "track", "userId": "u", "event": "e", "properties": {"x": 1e400}}',
        b'{"type": "track", "userId": "u", "event": "e"} trailing',
        b'{"type": "track", "userId": "u", "event": "e", "x": "\\ud800"}',
        b'{"type": "track", "userId": "u", "event": "e", "x": "\xff"}',
        b'{"type": "track", "userId": "u", "event": "e", "p": ' + _deep(250) + b"}",
        b'{"type": "track", "userId": "u", "event": "e", "p": ' + _deep(1500) + b"}",
        b'{"userId": "u", "userId": "v", "event": "e"}',
        # Nesting the parser refuses, in values nothing keeps: the route's `type` replaces the
        # body's, a later duplicate key replaces an earlier one.
        b'{"type": ' + _deep(201) + b", " + _WHOLE + b"}",
        b'{"userId": ' + _deep(250) + b", " + _WHOLE + b"}",
        b'{"properties": ' + _deep(250) + b', "properties": {}, ' + _WHOLE + b"}",
        b'{"type": ' + _deep(250) + b', "type": "track", ' + _WHOLE + b"}",
        # Deeper than the serialisers go: the traits' size check, the record's encoding.
        b'{"traits": {"a": ' + _deep(255) + b"}, " + _WHOLE + b"}",
        b'{"properties": {"a": ' + _deep(985) + b"}, " + _WHOLE + b"}",
    ],
)
@pytest.mark.parametrize("route", ["track", "batch"])
async def test_odd_bodies_get_the_checked_answer(raw: bytes, route: str) -> None:
    if route == "batch":
        raw = b'{"batch": [' + raw + b"]}" if raw else raw

    assert await _outcome(True, route, raw, AUTH) == await _outcome(False, route, raw, AUTH)


async def test_a_body_over_the_limit_is_refused_alike() -> None:
    raw = json.dumps({"type": "track", "userId": "u", "event": "e", "p": "x" * 40_000}).encode()

    refused = await _outcome(True, "track", raw, AUTH)

    assert refused == await _outcome(False, "track", raw, AUTH)
    assert refused[:2] == ("refused", 413)


# --- the calls SDKs send take the quick path ---------------------------------------------------


def _sdk_calls() -> list[dict[str, Any]]:
    rng = random.Random(7)
    calls = [make_call(rng, index) for index in range(20)]
    calls += [
        {  # analytics.js, with the fields Waypost keeps no use for
            "type": "page",
            "anonymousId": "anon-1",
            "name": "Pricing",
            "properties": {"path": "/pricing", "url": "https://shop.example/pricing"},
            "context": {"page": {"path": "/pricing"}, "library": {"name": "analytics.js"}},
            "integrations": {"All": True},
            "messageId": "ajs-1",
            "timestamp": "2025-03-03T11:59:58.123Z",
            "sentAt": "2025-03-03T11:59:59.001Z",
            "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
            "writeKey": "k1",
        },
        {
            "type": "identify",
            "userId": "user-1",
            "traits": {"email": "ada@example.com", "plan": "pro", "age": 36},
            "originalTimestamp": "2025-03-03T11:00:00",
            "channel": "server",
            "version": 2,
        },
        {"type": "alias", "userId": "user-1", "previousId": "anon-1"},
        {"type": "group", "userId": "user-1", "groupId": "acme", "traits": {"name": "Acme"}},
        {"type": "screen", "userId": "user-1", "name": "Home", "context": {"app": {"build": 7}}},
    ]
    return calls


def _quick_calls() -> quick.QuickCalls:
    return quick.QuickCalls(
        received_at=datetime.now(UTC),  # the bench's calls happen now
        source="web",
        limits=DEFAULT_LIMITS,
        max_event_bytes=SETTINGS.max_event_bytes,
        new_message_id=lambda: "generated",
    )


@pytest.mark.parametrize("call", _sdk_calls(), ids=lambda c: str(c.get("type")))
def test_the_calls_sdks_send_are_served_by_the_quick_path(call: dict[str, Any]) -> None:
    payload = quick.decode(json.dumps(call).encode())
    assert payload is not None

    assert _quick_calls().call(payload) is not None


def test_an_sdk_batch_is_served_by_the_quick_path_in_one_piece() -> None:
    payload = quick.decode(json.dumps({"batch": _sdk_calls(), "context": {"device": "x"}}).encode())
    assert payload is not None

    events = _quick_calls().batch(payload)

    assert events is not None
    assert len(events) == len(_sdk_calls())
    assert all(json.loads(e.value)["context"]["device"] == "x" for e in events)


def test_a_batch_with_one_call_to_check_is_declined_whole_with_no_id_drawn() -> None:
    drawn: list[str] = []
    calls = quick.QuickCalls(
        received_at=NOW,
        source="web",
        limits=DEFAULT_LIMITS,
        max_event_bytes=SETTINGS.max_event_bytes,
        new_message_id=lambda: drawn.append("id") or "id",
    )
    numeric = {"type": "track", "userId": 42, "event": "Order Completed"}
    payload = {"batch": [{"type": "track", "userId": "u", "event": "e"}, numeric]}

    assert calls.batch(payload) is None
    assert drawn == []


# --- what the quick path reads as `Call` does --------------------------------------------------


def test_the_quick_path_reads_the_fields_of_call_under_the_same_names() -> None:
    aliases = {field.alias or name for name, field in Call.model_fields.items()}
    python_names = {name for name, field in Call.model_fields.items() if field.alias != name}

    assert aliases == quick._KNOWN
    assert python_names == quick._PYTHON_NAMES
