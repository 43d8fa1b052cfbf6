"""The catalog's index of journeys by the event labels their triggers can match.

An event is held only against the journeys its label names (`Catalog.open_for_entry(label)`),
so the index must leave out no journey whose trigger could answer anything but "no, and
nothing to say" (`trigger_verdict` → (False, None)) for an event of that label.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.cli import load_journey_file
from shared.contracts import Event, Profile
from shared.journey_engine.catalog import Catalog, trigger_labels
from shared.journey_engine.engine import trigger_verdict
from shared.journeys import (
    AttributeChangedTrigger,
    AudienceTrigger,
    Journey,
    PublishedJourney,
    SegmentTrigger,
    TagAddedTrigger,
)
from shared.system_events import (
    ATTRIBUTE_CHANGED,
    AUDIENCE_SELECTED,
    SEGMENT_LEFT,
    TAG_ADDED,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _examples() -> list[Journey]:
    return [load_journey_file(path).journey for path in sorted(EXAMPLES.glob("*.yaml"))]


def _with_trigger(base: Journey, name: str, trigger: Any) -> Journey:
    return base.model_copy(update={"id": name, "trigger": trigger})


def _journeys() -> list[Journey]:
    """Every example, and a journey of each trigger kind the examples may not have."""
    examples = _examples()
    base = examples[0]
    extra = [
        _with_trigger(base, "zz-left", SegmentTrigger(type="segment", segment="vip", on="left")),
        _with_trigger(base, "zz-entered", SegmentTrigger(type="segment", segment="vip")),
        _with_trigger(base, "zz-tag", TagAddedTrigger(type="tag_added", tag="lead")),
        _with_trigger(
            base,
            "zz-attr",
            AttributeChangedTrigger(type="attribute_changed", attribute="plan", to="pro"),
        ),
        _with_trigger(
            base,
            "zz-ongoing",
            AudienceTrigger(
                type="audience",
                segments=("vip",),
                mode="ongoing",
                start_at=NOW - timedelta(days=1),
            ),
        ),
        _with_trigger(
            base,
            "zz-static",
            AudienceTrigger(type="audience", segments=("vip",), start_at=NOW - timedelta(days=1)),
        ),
    ]
    return [*examples, *extra]


JOURNEYS = _journeys()


LABELS = sorted(
    {label for journey in JOURNEYS for label in trigger_labels(journey.trigger)}
    | {"Page Viewed", "Unheard Of", SEGMENT_LEFT, TAG_ADDED, ATTRIBUTE_CHANGED, AUDIENCE_SELECTED}
)
CALLS = ("identify", "page", "screen", "group", "alias")


def _events(journey: Journey) -> list[Event]:
    """An event of every label some trigger names, and of others, each with the properties
    `journey`'s trigger reads (its segment, tag, attribute, journey id) set to match it."""
    trigger = journey.trigger
    segments = getattr(trigger, "segments", None) or (getattr(trigger, "segment", "vip"),)
    properties = {
        "segment": segments[0],
        "tag": getattr(trigger, "tag", "lead"),
        "attribute": getattr(trigger, "attribute", "plan"),
        "value": "pro",
        "journey_id": journey.id,
        "run_id": "r1",
    }
    tracked = [
        Event(
            type="track",
            event=label,
            user_id="ada",
            message_id=f"m-{n}",
            timestamp=NOW,
            received_at=NOW,
            properties=properties,
        )
        for n, label in enumerate(LABELS)
    ]
    calls = [
        Event(type=call, user_id="ada", message_id=f"m-{call}", timestamp=NOW, received_at=NOW)
        for call in CALLS
    ]
    return [*tracked, *calls]


@pytest.mark.parametrize("journey", JOURNEYS, ids=lambda j: j.id)
def test_a_trigger_says_nothing_of_an_event_whose_label_it_does_not_name(journey: Journey) -> None:
    profile = Profile(
        contact_key="ada",
        traits={"email": "ada@example.com", "plan": "pro"},
        first_seen=NOW,
        last_seen=NOW,
        updated_at=NOW,
    )
    named = trigger_labels(journey.trigger)
    spoken = 0
    for event in _events(journey):
        verdict = trigger_verdict(journey, event, profile, NOW)
        if event.label not in named:
            assert verdict == (False, None), (journey.id, event.label, verdict)
        elif verdict != (False, None):
            spoken += 1
    # The trigger does answer (enters, or says why not) an event of a label it names.
    assert spoken > 0, journey.id


def test_the_index_keeps_the_catalog_order_and_leaves_out_only_unnamed_labels() -> None:
    catalog = Catalog.of(
        PublishedJourney(journey=j, status="active", published_at=NOW) for j in JOURNEYS
    )
    everyone = catalog.open_for_entry()
    assert [j.id for j in everyone] == sorted(j.id for j in JOURNEYS)
    for label in [*LABELS, *CALLS]:
        expected = [j for j in everyone if label in trigger_labels(j.trigger)]
        assert catalog.open_for_entry(label) == expected, label
    assert catalog.open_for_entry("Unheard Of") == []


def test_paused_journeys_are_in_no_label_of_the_index() -> None:
    paused = JOURNEYS[0]
    catalog = Catalog.of([PublishedJourney(journey=paused, status="paused", published_at=NOW)])
    for label in trigger_labels(paused.trigger):
        assert catalog.open_for_entry(label) == []
