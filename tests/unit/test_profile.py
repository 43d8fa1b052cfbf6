"""Profile folding: `apply_event` builds and updates a contact's profile and announces changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.contracts import Event, EventType, Profile
from shared.profiles import announce, apply_event
from shared.system_events import WAYPOST_SOURCE

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


def event(
    message_id: str,
    *,
    type: EventType = "track",
    name: str | None = "Viewed Product",
    at: datetime = T0,
    user_id: str | None = "user-1",
    anonymous_id: str | None = None,
    traits: dict[str, Any] | None = None,
) -> Event:
    return Event(
        type=type,
        event=name if type == "track" else None,
        user_id=user_id,
        anonymous_id=anonymous_id,
        message_id=message_id,
        timestamp=at,
        received_at=at,
        traits=traits or {},
    )


def fold(*events: Event, profile: Profile | None = None) -> Profile:
    for each in events:
        profile = apply_event(profile, each, NOW).profile
    assert profile is not None
    return profile


def test_identify_on_an_unknown_contact_creates_a_profile_from_its_traits() -> None:
    identify = event("m-1", type="identify", traits={"email": "ada@example.com", "plan": "pro"})

    applied = apply_event(None, identify, NOW)

    profile = applied.profile
    assert profile.contact_key == "user-1"
    assert profile.user_id == "user-1"
    assert profile.traits == {"email": "ada@example.com", "plan": "pro"}
    assert (profile.first_seen, profile.last_seen, profile.updated_at) == (T0, T0, NOW)
    assert profile.event_counts == {"identify": 1}
    # Message ids are the segmenter's row's to remember, not the profile's.
    assert profile.recent_message_ids == ()


def test_anonymous_contact_is_keyed_by_its_anonymous_id() -> None:
    profile = fold(event("m-1", user_id=None, anonymous_id="anon-7"))

    assert profile.contact_key == "anon-7"
    assert profile.user_id is None
    assert profile.anonymous_ids == ("anon-7",)


def test_later_traits_merge_over_earlier_ones() -> None:
    profile = fold(
        event("m-1", type="identify", traits={"email": "old@example.com", "plan": "free"}),
        event("m-2", type="identify", traits={"plan": "pro", "first_name": "Ada"}),
    )

    assert profile.traits == {"email": "old@example.com", "plan": "pro", "first_name": "Ada"}


def test_group_traits_do_not_become_contact_traits() -> None:
    profile = fold(
        event("m-1", type="identify", traits={"name": "Ada"}),
        event("m-2", type="group", traits={"name": "Acme Inc"}),
    )

    assert profile.traits == {"name": "Ada"}


def test_events_are_counted_by_label() -> None:
    profile = fold(
        event("m-1", name="Viewed Product"),
        event("m-2", name="Viewed Product"),
        event("m-3", name="Order Completed"),
        event("m-4", type="page"),
        event("m-5", type="identify"),
    )

    assert profile.event_counts == {
        "Viewed Product": 2,
        "Order Completed": 1,
        "page": 1,
        "identify": 1,
    }


def test_first_and_last_seen_span_out_of_order_timestamps() -> None:
    middle, earliest, latest = T0, T0 - timedelta(days=2), T0 + timedelta(hours=5)

    profile = fold(event("m-1", at=middle), event("m-2", at=latest), event("m-3", at=earliest))

    assert profile.first_seen == earliest
    assert profile.last_seen == latest


def test_a_late_old_event_does_not_move_last_seen_back() -> None:
    profile = fold(event("m-1", at=T0), event("m-2", at=T0 - timedelta(hours=1)))

    assert profile.last_seen == T0


def test_the_fold_leaves_de_duplication_to_its_caller() -> None:
    """A repeated message id folds again (the segmenter and the simulator drop repeats before
    they fold: `tests/unit/test_segmenter_contact.py`, `test_engine_properties.py`)."""
    once = fold(event("m-1"))
    twice = fold(event("m-1"), profile=once)

    assert twice.event_counts == {"Viewed Product": 2}


def test_user_id_is_kept_when_a_later_event_has_none() -> None:
    profile = fold(event("m-1"), event("m-2", user_id=None, anonymous_id="anon-7"))

    assert profile.user_id == "user-1"
    assert profile.anonymous_ids == ("anon-7",)


def test_an_anonymous_id_is_remembered_once() -> None:
    profile = fold(
        event("m-1", anonymous_id="anon-7"),
        event("m-2", anonymous_id="anon-7"),
        event("m-3", anonymous_id="anon-8"),
    )

    assert profile.anonymous_ids == ("anon-7", "anon-8")


# --- attribute changes announced -------------------------------------------------------------


def test_an_identify_that_changes_a_trait_announces_it_once_per_changed_trait() -> None:
    before = fold(event("m-1", type="identify", traits={"stage": "trial", "plan": "pro"}))

    applied = apply_event(
        before, event("m-2", type="identify", traits={"stage": "education", "plan": "pro"}), NOW
    )

    (announced,) = applied.announcements
    assert announced.label == "Attribute Changed"
    assert announced.properties == {"attribute": "stage", "value": "education", "previous": "trial"}
    assert announced.contact_key == "user-1"
    assert announced.source == "waypost"


def test_the_same_identify_replayed_announces_the_same_ids() -> None:
    change = event("m-9", type="identify", traits={"stage": "education"})

    first = apply_event(None, change, NOW).announcements
    again = apply_event(None, change, NOW).announcements

    assert [e.message_id for e in first] == [e.message_id for e in again]


def test_an_event_without_trait_changes_announces_nothing() -> None:
    before = fold(event("m-1", type="identify", traits={"stage": "trial"}))

    assert apply_event(before, event("m-2"), NOW).announcements == ()
    assert apply_event(before, event("m-3", traits={"stage": "trial"}), NOW).announcements == ()


@pytest.mark.parametrize("user_id", ["ada", None])
def test_an_announcement_is_the_event_validation_would_make(user_id: str | None) -> None:
    """`announce` copies a template rather than validating: the result must not differ."""
    at = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
    now = at + timedelta(seconds=3)
    profile = Profile(
        contact_key=user_id or "anon-1", user_id=user_id, first_seen=at, last_seen=at, updated_at=at
    )
    properties = {"segment": "buyers", "value": 1.5, "nested": {"a": [1, None]}}

    made = announce(profile, "Segment Entered", properties, "m-1", at, now)
    validated = Event(
        type="track",
        event="Segment Entered",
        user_id=user_id,
        anonymous_id=None if user_id else "anon-1",
        message_id="m-1",
        timestamp=at,
        received_at=now,
        properties=properties,
        source=WAYPOST_SOURCE,
    )

    assert made == validated
    assert made.model_fields_set - {"traits", "context"} == validated.model_fields_set
    assert made.to_wire() == validated.to_wire()
    other = announce(profile, "Segment Left", properties, "m-2", at, now)
    for field in ("properties", "traits", "context"):
        # Nothing shared: an edit of one announcement's dicts reaches no other.
        assert getattr(made, field) is not getattr(other, field)
    assert made.properties is not properties
    assert Event.model_validate_json(made.to_wire()) == validated
