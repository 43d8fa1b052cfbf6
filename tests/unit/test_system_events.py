"""Only Waypost's own sources may emit the events Waypost emits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.contracts import Event
from shared.system_events import SYSTEM_EVENTS, forged, is_system_event, is_waypost_source

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _event(name: str, source: str | None) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="u1",
        message_id="m1",
        timestamp=NOW,
        received_at=NOW,
        source=source,
    )


@pytest.mark.parametrize("source", ["waypost", "waypost-dispatcher", "waypost-links"])
def test_system_events_from_waypost_are_genuine(source: str) -> None:
    assert all(not forged(_event(name, source)) for name in SYSTEM_EVENTS)


@pytest.mark.parametrize("source", [None, "dev", "web", "waypostish", "waypost_links"])
def test_system_events_from_anywhere_else_are_forged(source: str | None) -> None:
    assert all(forged(_event(name, source)) for name in SYSTEM_EVENTS)


def test_behaviour_is_never_forged() -> None:
    assert not forged(_event("Order Completed", "web"))
    assert not forged(_event("Newsletter Subscribed", None))


def test_names_match_in_any_case_and_sources_exactly() -> None:
    assert is_system_event("segment entered")
    assert not is_system_event("Segment Entered Twice")
    assert not is_system_event(None)
    assert is_waypost_source("waypost-sms")
    assert not is_waypost_source("Waypost")
