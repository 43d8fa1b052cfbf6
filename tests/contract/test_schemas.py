"""The wire contract: JSON schemas of every message model, pinned against committed snapshots.

Each model's schema (validation and serialization modes) is compared with
`tests/contract/schemas/<Model>.json`. Descriptions (docstrings) are left out of the snapshots, so
rewording documentation does not break the contract; names, types, required fields, defaults and
enumerations are pinned. A difference fails the test with a unified diff. After an intended,
compatible change to a model (fields are added, never repurposed), rewrite the snapshots and commit
them together with the change:

    WAYPOST_UPDATE_SCHEMAS=1 .venv/bin/python -m pytest tests/contract

The module also checks that wire models are frozen, that `Event` travels in camelCase and that
every wire model survives a round trip through `to_wire()`.
"""

from __future__ import annotations

import difflib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from shared.cli import load_journey_file
from shared.conditions import condition_from
from shared.contracts import (
    AudienceRequest,
    ChannelTemplate,
    ContactCommand,
    ContactEvent,
    DeadLetter,
    Event,
    JourneyLogRecord,
    ObjectRelation,
    Profile,
    SegmentCount,
    SegmentTimerRequest,
    SendRequest,
    SendRetry,
    TimerFired,
    WebhookCall,
    WebhookResult,
    WireModel,
)
from shared.journeys import JourneyFile, PublishedJourney
from shared.segments import (
    AggregateDefinition,
    PublishedAggregate,
    PublishedSegment,
    SegmentDefinition,
    SegmentFile,
)

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = Path(__file__).parent / "schemas"
UPDATE_VARIABLE = "WAYPOST_UPDATE_SCHEMAS"
T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)

PINNED_MODELS: tuple[type[BaseModel], ...] = (
    Event,
    Profile,
    ContactEvent,
    SendRequest,
    SendRetry,
    TimerFired,
    ContactCommand,
    WebhookCall,
    WebhookResult,
    JourneyLogRecord,
    DeadLetter,
    PublishedJourney,
    JourneyFile,
    SegmentTimerRequest,
    AudienceRequest,
    SegmentCount,
    ObjectRelation,
    PublishedSegment,
    PublishedAggregate,
    SegmentFile,
)


def _without_descriptions(node: Any) -> Any:
    """The schema minus prose: `description` keywords go, a field named "description" stays."""
    if isinstance(node, dict):
        return {
            key: _without_descriptions(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [_without_descriptions(item) for item in node]
    return node


def _schema_text(model: type[BaseModel]) -> str:
    schema = {
        "validation": model.model_json_schema(mode="validation"),
        "serialization": model.model_json_schema(mode="serialization"),
    }
    return json.dumps(_without_descriptions(schema), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("model", PINNED_MODELS, ids=lambda m: m.__name__)
def test_json_schema_matches_the_committed_snapshot(model: type[BaseModel]) -> None:
    snapshot = SNAPSHOTS / f"{model.__name__}.json"
    current = _schema_text(model)
    if os.environ.get(UPDATE_VARIABLE) == "1":
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(current)
        return
    hint = f"if the change is intended, run `{UPDATE_VARIABLE}=1 pytest tests/contract` and commit"
    if not snapshot.exists():
        pytest.fail(f"no schema snapshot {snapshot.relative_to(ROOT)}; {hint}", pytrace=False)
    pinned = snapshot.read_text()
    if current != pinned:
        diff = "".join(
            difflib.unified_diff(
                pinned.splitlines(keepends=True),
                current.splitlines(keepends=True),
                fromfile=str(snapshot.relative_to(ROOT)),
                tofile=f"{model.__name__} (current code)",
            )
        )
        pytest.fail(f"the wire schema of {model.__name__} changed; {hint}\n{diff}", pytrace=False)


def test_every_snapshot_belongs_to_a_pinned_model() -> None:
    pinned = {f"{model.__name__}.json" for model in PINNED_MODELS}

    assert {path.name for path in SNAPSHOTS.glob("*.json")} <= pinned


# --- one valid instance of each model -------------------------------------------------------


def _event() -> Event:
    return Event(
        type="track",
        event="Registered",
        user_id="user-1",
        anonymous_id="anon-1",
        message_id="msg-1",
        timestamp=T0,
        received_at=T0,
        sent_at=T0,
        properties={"plan": "pro"},
        source="web",
    )


def _profile() -> Profile:
    return Profile(
        contact_key="user-1",
        user_id="user-1",
        anonymous_ids=("anon-1",),
        traits={"first_name": "Ada"},
        first_seen=T0,
        last_seen=T0,
        event_counts={"Registered": 1},
        recent_message_ids=("msg-1",),
        updated_at=T0,
    )


def _samples() -> dict[str, BaseModel]:
    journey_file = load_journey_file(ROOT / "examples" / "journeys" / "s02-welcome.yaml")
    aggregate = AggregateDefinition(
        id="views_7d", event="Product Viewed", window="7d", where=None, function="count"
    )
    segment = SegmentDefinition(
        id="high-intent",
        condition=condition_from({"field": "aggregates.views_7d", "op": "gte", "value": 2}),
    )
    samples: list[BaseModel] = [
        _event(),
        _profile(),
        ContactEvent(
            contact_key="user-1",
            event=_event(),
            announcements=(
                _event().model_copy(
                    update={
                        "event": "Segment Entered",
                        "message_id": "msg-2",
                        "properties": {"segment": "high-intent"},
                        "source": "waypost-segmenter",
                    }
                ),
            ),
            profile=_profile(),
        ),
        SendRequest(
            message_id="send-1",
            contact_key="user-1",
            channel="email",
            template_id="welcome",
            journey_id="welcome",
            journey_version=1,
            instance_id="inst-1",
            step_id="welcome-email",
            requested_at=T0,
            profile=_profile(),
            context={"trigger": {"event": "Registered"}},
        ),
        SendRetry(
            request=SendRequest(
                message_id="send-1",
                contact_key="user-1",
                channel="sms",
                template_id="reminder",
                journey_id="welcome",
                journey_version=1,
                instance_id="inst-1",
                step_id="reminder",
                requested_at=T0,
                profile=_profile(),
                fallbacks=(ChannelTemplate(channel="email", template_id="reminder-email"),),
            ),
            attempt=2,
            due_at=T0,
            reason="sms 503",
        ),
        TimerFired(
            contact_key="user-1", timer_id="t-1", instance_id="inst-1", due_at=T0, fired_at=T0
        ),
        ContactCommand(
            command_id="c-1",
            contact_key="user-1",
            kind="add_tag",
            tag="first order",
            journey_id="welcome",
            instance_id="inst-1",
            step_id="tag",
            at=T0,
        ),
        WebhookCall(
            call_id="w-1",
            contact_key="user-1",
            instance_id="inst-1",
            step_id="notify",
            method="POST",
            url="http://127.0.0.1:9/hook",
            body={"contact": "user-1"},
            timeout_seconds=5.0,
            retries=2,
        ),
        WebhookResult(
            call_id="w-1",
            contact_key="user-1",
            instance_id="inst-1",
            ok=True,
            status=200,
            body={"score": 7},
            at=T0,
        ),
        JourneyLogRecord(
            record_id="r-1",
            kind="exited",
            journey_id="welcome",
            journey_version=1,
            instance_id="inst-1",
            contact_key="user-1",
            step_id="done",
            reason="exit_step",
            at=T0,
        ),
        DeadLetter(
            service="segmenter",
            topic="waypost.events.v1",
            partition=0,
            offset=7,
            key="user-1",
            value="{}",
            reason="not json",
            at=T0,
        ),
        PublishedJourney(journey=journey_file.journey, published_at=T0),
        journey_file,
        SegmentTimerRequest(contact_key="user-1", due_at=T0, requested_at=T0),
        AudienceRequest(
            journey_id="announcement",
            journey_version=1,
            run_id="run-1",
            segments=("a", "b"),
            run_at=T0,
            requested_at=T0,
        ),
        SegmentCount(segment_id="high-intent", partition=3, members=42, at=T0),
        ObjectRelation(
            kind="related",
            object_key="Product Viewed|product_id|sku-1",
            contact_key="user-1",
            at=T0,
        ),
        PublishedSegment(segment=segment, published_at=T0),
        PublishedAggregate(aggregate=aggregate, published_at=T0),
        SegmentFile(aggregates=(aggregate,), segments=(segment,)),
    ]
    return {type(sample).__name__: sample for sample in samples}


SAMPLES = _samples()
WIRE_SAMPLES = {name: s for name, s in SAMPLES.items() if isinstance(s, WireModel)}


def test_there_is_a_sample_of_every_pinned_model() -> None:
    assert set(SAMPLES) == {model.__name__ for model in PINNED_MODELS}


@pytest.mark.parametrize("name", SAMPLES)
def test_every_model_is_frozen(name: str) -> None:
    sample = SAMPLES[name]
    field = next(iter(type(sample).model_fields))

    with pytest.raises(ValidationError, match="frozen"):
        setattr(sample, field, getattr(sample, field))


@pytest.mark.parametrize("name", WIRE_SAMPLES)
def test_every_wire_model_round_trips_through_to_wire(name: str) -> None:
    sample = WIRE_SAMPLES[name]

    assert type(sample).model_validate_json(sample.to_wire()) == _as_published(sample)


def _as_published(sample: Any) -> Any:
    """The sample as its consumers see it: profiles travel without the segmenter's recent ids."""
    if isinstance(sample, Profile):
        return sample.model_copy(update={"recent_message_ids": ()})
    if isinstance(sample, ContactEvent):
        return sample.model_copy(update={"profile": _as_published(sample.profile)})
    return sample


@pytest.mark.parametrize("name", WIRE_SAMPLES)
def test_wire_models_ignore_fields_added_by_newer_producers(name: str) -> None:
    sample = WIRE_SAMPLES[name]
    payload: dict[str, Any] = {**json.loads(sample.to_wire()), "added_in_a_later_release": 1}

    assert type(sample).model_validate(payload) == _as_published(sample)


# --- Event on the wire ----------------------------------------------------------------------


def test_event_travels_with_camel_case_keys() -> None:
    wire = json.loads(_event().to_wire())

    assert wire["userId"] == "user-1"
    assert wire["messageId"] == "msg-1"
    assert wire["anonymousId"] == "anon-1"
    assert wire["receivedAt"] == "2025-03-03T09:00:00Z"
    assert wire["schemaVersion"] == 1
    assert not {"user_id", "message_id", "received_at"} & set(wire)


def test_event_on_the_wire_leaves_out_empty_optional_fields() -> None:
    event = Event(type="page", user_id="user-1", message_id="m", timestamp=T0, received_at=T0)

    wire = json.loads(event.to_wire())

    assert not {"anonymousId", "event", "name", "sentAt", "source"} & set(wire)


def test_event_round_trips_through_to_wire() -> None:
    event = _event()

    assert Event.model_validate_json(event.to_wire()) == event


def test_event_also_accepts_snake_case_field_names() -> None:
    event = Event.model_validate(
        {
            "type": "identify",
            "user_id": "user-1",
            "message_id": "m",
            "timestamp": T0,
            "received_at": T0,
        }
    )

    assert (event.user_id, event.message_id) == ("user-1", "m")


def test_internal_wire_models_travel_in_snake_case() -> None:
    wire = json.loads(_profile().to_wire())

    assert {"contact_key", "first_seen"} <= set(wire)


def test_a_contact_event_written_before_announcements_existed_decodes_as_one_event() -> None:
    profile = _profile()
    older = json.loads(
        ContactEvent(contact_key="user-1", event=_event(), profile=profile).to_wire()
    )
    del older["announcements"]

    decoded = ContactEvent.model_validate(older)

    assert decoded.events == (_event(),)
    assert list(decoded.each()) == [decoded]


def test_recent_message_ids_stay_in_the_segmenters_row() -> None:
    """Rows the segmenter wrote before it kept the digests of message ids in the row itself
    hold them in the profile; published profiles and contact events leave them out (the model
    keeps the field, so older rows and records still decode)."""
    profile = _profile()
    assert profile.recent_message_ids
    assert "recent_message_ids" not in json.loads(profile.to_wire())
    event = ContactEvent(contact_key=profile.contact_key, event=_event(), profile=profile)
    assert "recent_message_ids" not in json.loads(event.to_wire())["profile"]
    assert "recent_message_ids" in json.loads(profile.model_dump_json())


def test_an_event_without_a_timezone_is_refused() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Event(
            type="track",
            event="X",
            user_id="u",
            message_id="m",
            timestamp=datetime(2025, 3, 3, 9, 0),  # naive on purpose
            received_at=T0,
        )


def test_a_cancelling_segment_timer_request_round_trips() -> None:
    cancel = SegmentTimerRequest(contact_key="user-1", due_at=None, requested_at=T0)
    assert b"due_at" not in cancel.to_wire()
    assert SegmentTimerRequest.model_validate_json(cancel.to_wire()) == cancel
