"""Profile limits: a profile keeps at most so many traits, each so large, and counts at most so
many distinct event names; what would pass them is left out with a reason, never a failure. An
event nested deeper than ingest allows is refused (and so dead-lettered), not stored."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.segmenter.domain import contact
from services.segmenter.domain.decide import LimitReached, SendCommand, StoreRow, decide
from services.segmenter.domain.definitions import Definitions
from shared.bodies import MAX_JSON_DEPTH
from shared.contracts import ContactCommand, Event
from shared.profiles import (
    ProfileLimits,
    apply_command,
    apply_event,
    capped_traits,
    merged_counts,
    trait_size,
)
from shared.settings import CommonSettings

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
LIMITS = ProfileLimits(max_traits=3, max_trait_bytes=32, max_event_names=2, max_anonymous_ids=2)
DEFS = Definitions.of([], [])


def event(message_id: str, name: str = "Viewed", **fields: Any) -> Event:
    return Event.model_validate(
        {
            "type": "track",
            "event": name,
            "userId": "ada",
            "messageId": message_id,
            "timestamp": NOW,
            "receivedAt": NOW,
            **fields,
        }
    )


class Rows:
    def __init__(self, row: contact.ContactRow | None = None) -> None:
        self._row = row

    def row(self) -> contact.ContactRow | None:
        return self._row

    def merged_into(self) -> str | None:
        return None

    def forgotten(self) -> bool:
        return False


def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def test_a_trait_size_is_its_name_and_its_value_as_json() -> None:
    assert trait_size("plan", "pro") == len("plan") + len('"pro"')
    assert trait_size("é", [1, 2]) == 2 + len("[1,2]")


def test_traits_within_the_limits_are_merged_as_they_are() -> None:
    merged, dropped = capped_traits({"a": 1}, {"b": 2, "a": 3}, LIMITS)

    assert merged == {"a": 3, "b": 2}
    assert dropped == ()


def test_new_traits_past_the_count_are_left_out_and_existing_ones_still_change() -> None:
    merged, dropped = capped_traits({"a": 1, "b": 2, "c": 3}, {"a": 9, "d": 4}, LIMITS)

    assert merged == {"a": 9, "b": 2, "c": 3}
    assert len(dropped) == 1
    assert "trait 'd'" in dropped[0]


def test_an_oversized_trait_is_left_out_and_the_rest_kept() -> None:
    merged, dropped = capped_traits({}, {"bio": "x" * 40, "plan": "pro"}, LIMITS)

    assert merged == {"plan": "pro"}
    assert "trait 'bio'" in dropped[0]


def test_event_names_past_the_limit_are_not_counted_but_the_event_is_accepted() -> None:
    profile = None
    for number, name in enumerate(["A", "B", "C", "A"]):
        applied = apply_event(profile, event(f"m-{number}", name), NOW, LIMITS)
        profile = applied.profile

    assert profile is not None
    assert profile.event_counts == {"A": 2, "B": 1}


def test_an_identify_past_the_trait_limit_announces_only_what_it_kept() -> None:
    identify = event("m-1", traits={"a": 1, "b": 2, "c": 3, "d": 4})

    applied = apply_event(None, identify, NOW, LIMITS)

    assert applied.profile.traits == {"a": 1, "b": 2, "c": 3}
    assert [e.properties["attribute"] for e in applied.announcements] == ["a", "b", "c"]
    assert len(applied.dropped) == 1


def test_a_journey_attribute_past_the_limit_changes_nothing_and_says_why() -> None:
    profile = apply_event(None, event("m-1", traits={"a": 1, "b": 2, "c": 3}), NOW, LIMITS).profile
    command = ContactCommand(
        command_id="c-1", contact_key="ada", kind="set_attribute", attribute="d", value=4, at=NOW
    )

    changed = apply_command(profile, command, NOW, LIMITS)

    assert changed.profile == profile
    assert changed.events == ()
    assert "trait 'd'" in changed.dropped[0]


def test_merged_counts_add_up_and_new_names_stop_at_the_limit() -> None:
    merged, dropped = merged_counts({"A": 1, "B": 1}, {"A": 2, "C": 5}, LIMITS)

    assert merged == {"A": 3, "B": 1}
    assert "1 event names" in dropped[0]


def test_absorbing_an_anonymous_history_keeps_the_profile_within_the_limits() -> None:
    known = contact.apply(None, event("m-1", traits={"a": 1, "b": 2}), DEFS, NOW, LIMITS).row
    anonymous_event = event("m-2", name="Other", userId=None, anonymousId="an-1")
    anonymous_event = anonymous_event.model_copy(update={"traits": {"x": 1, "y": 2}})
    anonymous = contact.apply(None, anonymous_event, DEFS, NOW, LIMITS).row
    assert known is not None
    assert anonymous is not None

    outcome = contact.absorb(known, "ada", anonymous, DEFS, NOW, "c-a", LIMITS)

    assert outcome.row is not None
    assert outcome.row.profile.traits == {"a": 1, "b": 2, "x": 1}
    assert outcome.dropped


def test_the_decision_reports_what_the_limits_left_out() -> None:
    identify = event("m-1", traits={"a": 1, "b": 2, "c": 3, "d": 4})

    commands = decide(Rows(), identify, DEFS, NOW, LIMITS).commands

    reached = [c for c in commands if isinstance(c, LimitReached)]
    assert len(reached) == 1
    assert reached[0].origin == "m-1"
    assert any(isinstance(c, StoreRow) for c in commands)


def test_a_journey_attribute_left_out_is_reported_without_a_change() -> None:
    row = contact.apply(None, event("m-1", traits={"a": 1, "b": 2, "c": 3}), DEFS, NOW, LIMITS).row
    command = ContactCommand(
        command_id="c-1", contact_key="ada", kind="set_attribute", attribute="d", value=4, at=NOW
    )

    commands = decide(Rows(row), command, DEFS, NOW, LIMITS).commands

    assert [type(c) for c in commands] == [LimitReached]


# --- anonymous ids ------------------------------------------------------------------------------


def identify(message_id: str, anonymous_id: str, **fields: Any) -> Event:
    return event(message_id, type="identify", anonymousId=anonymous_id, **fields)


def merges(commands: tuple[Any, ...]) -> list[str]:
    return [
        c.command.contact_key
        for c in commands
        if isinstance(c, SendCommand) and c.command.kind == "merge_into"
    ]


def test_new_anonymous_ids_past_the_limit_are_not_linked_and_say_why() -> None:
    profile = None
    dropped: list[str] = []
    for number in range(4):
        applied = apply_event(profile, identify(f"m-{number}", f"an-{number}"), NOW, LIMITS)
        profile, dropped = applied.profile, [*dropped, *applied.dropped]

    assert profile is not None
    assert profile.anonymous_ids == ("an-0", "an-1")
    assert dropped == ["anonymous id not linked: the profile already links 2 anonymous ids"] * 2
    assert all("an-" not in reason for reason in dropped)  # no contact key in the log


def test_an_identify_past_the_limit_asks_no_merge_and_reports_it() -> None:
    row = None
    asked: list[str] = []
    reached: list[LimitReached] = []
    for number in range(3):
        commands = decide(
            Rows(row), identify(f"m-{number}", f"an-{number}"), DEFS, NOW, LIMITS
        ).commands
        row = next(c.row for c in commands if isinstance(c, StoreRow))
        asked += merges(commands)
        reached += [c for c in commands if isinstance(c, LimitReached)]

    assert row is not None
    assert asked == ["an-0", "an-1"]  # the third stays a contact of its own
    assert row.profile.anonymous_ids == ("an-0", "an-1")
    assert [(r.origin, r.reasons) for r in reached] == [
        ("m-2", ("anonymous id not linked: the profile already links 2 anonymous ids",))
    ]
    # An id already linked still is: the same anonymous id again changes nothing.
    again = decide(Rows(row), identify("m-3", "an-0"), DEFS, NOW, LIMITS).commands
    assert not [c for c in again if isinstance(c, LimitReached)]


def test_an_alias_past_the_limit_asks_no_merge() -> None:
    row = contact.apply(None, identify("m-1", "an-1"), DEFS, NOW, LIMITS).row
    row = contact.apply(row, identify("m-2", "an-2"), DEFS, NOW, LIMITS).row
    alias = event("m-3", type="alias", previousId="an-9")

    outcome = contact.apply(row, alias, DEFS, NOW, LIMITS)

    assert outcome.linked is None
    assert outcome.row is not None
    assert outcome.row.profile.anonymous_ids == ("an-1", "an-2")
    assert outcome.dropped


def test_absorbing_keeps_the_merged_id_and_caps_the_ids_it_brought() -> None:
    known = contact.apply(None, identify("m-1", "an-1"), DEFS, NOW, LIMITS).row
    assert known is not None
    anonymous = contact.apply(
        None, event("m-2", userId=None, anonymousId="an-1"), DEFS, NOW, LIMITS
    ).row
    assert anonymous is not None
    brought = anonymous.profile.model_copy(update={"anonymous_ids": ("an-1", "an-7", "an-8")})
    anonymous = anonymous.model_copy(update={"profile": brought})

    outcome = contact.absorb(known, "ada", anonymous, DEFS, NOW, "c-a", LIMITS)

    assert outcome.row is not None
    assert outcome.row.profile.anonymous_ids == ("an-1", "an-7")
    assert outcome.dropped == (
        "1 anonymous ids of the merged contact not linked: the profile already links 2 "
        "anonymous ids",
    )


def test_the_anonymous_id_limit_is_a_setting_like_the_others() -> None:
    assert CommonSettings().profile_limits().max_anonymous_ids == 64
    limits = CommonSettings(profile_max_anonymous_ids=5).profile_limits()
    assert limits == ProfileLimits(max_anonymous_ids=5)


# --- nesting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["properties", "traits", "context"])
def test_an_event_nested_past_the_limit_is_refused_for_the_dead_letter_topic(field: str) -> None:
    deep = event("m-1", **{field: {"x": nested(MAX_JSON_DEPTH)}})

    with pytest.raises(ValueError, match=f"{field} is nested deeper than {MAX_JSON_DEPTH}"):
        decide(Rows(), deep, DEFS, NOW)


def test_an_event_nested_to_the_limit_is_stored_and_its_row_reads_back() -> None:
    deep = event("m-1", properties={"x": nested(MAX_JSON_DEPTH - 1)}, traits={"t": nested(31)})

    commands = decide(Rows(), deep, DEFS, NOW).commands

    stored = next(c for c in commands if isinstance(c, StoreRow))
    raw = stored.row.model_dump_json()
    assert contact.ContactRow.model_validate_json(raw) == stored.row


def test_a_command_value_nested_past_the_limit_is_refused() -> None:
    command = ContactCommand(
        command_id="c-1",
        contact_key="ada",
        kind="set_attribute",
        attribute="deep",
        value=nested(MAX_JSON_DEPTH + 1),
        at=NOW,
    )

    with pytest.raises(ValueError, match="value is nested deeper"):
        decide(Rows(), command, DEFS, NOW)
