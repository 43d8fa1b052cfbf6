"""A contact's timeline as the admin shows it: its recent events, its journey steps and its
messages with their delivery states, merged newest first.

Pure: the stored events, journey-log records and ledger entries come in already read. The
recent events themselves are kept short here (`recent_entry`, `keep_recent`), so the view that
stores them holds a few small facts per event, never whole records."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from shared.contracts import Event

# How many events the view keeps per contact (the newest), and how many properties of each.
RECENT_EVENTS = 50
PROPERTIES_KEPT = 5
_MAX_VALUE_CHARS = 60
# The ledger's states in the order a message moves through them.
_MESSAGE_STATES = (
    "requested",
    "sending",
    "retrying",
    "sent",
    "skipped",
    "failed",
    "delivered",
    "opened",
    "clicked",
)
# Within one instant, the order things happen: the event, then the journey's step, then the
# message the step asked for.
_RANK = {"event": 0, "journey": 1, "message": 2}
# Journey-log records of one decision share a time: the order the engine writes them in.
_LOG_RANK = {
    "not_entered": 0,
    "entered": 1,
    "holdout": 2,
    "step_completed": 3,
    "skipped": 3,
    "waiting": 4,
    "converted": 5,
    "exited": 6,
}


def recent_entry(event: Event) -> dict[str, Any]:
    """What the view keeps of an event: its id, name, call type, time and its first few
    properties (an identify's traits), each value cut short."""
    source = event.properties if event.type != "identify" else event.traits
    kept = {name: _short(source[name]) for name in list(source)[:PROPERTIES_KEPT]}
    return {
        "id": event.message_id,
        "name": event.label,
        "type": event.type,
        "at": event.timestamp,
        "properties": kept,
        "more_properties": max(len(source) - PROPERTIES_KEPT, 0),
    }


def keep_recent(
    stored: Iterable[Mapping[str, Any]],
    arrived: Iterable[Mapping[str, Any]],
    limit: int = RECENT_EVENTS,
) -> list[dict[str, Any]]:
    """The stored events with the ones that arrived, each id once (a replayed record changes
    nothing), oldest first, only the newest `limit`."""
    by_id: dict[str, dict[str, Any]] = {}
    for entry in (*stored, *arrived):
        by_id[str(entry.get("id"))] = dict(entry)
    ordered = sorted(by_id.values(), key=lambda e: (_instant(e.get("at")), str(e.get("id"))))
    return ordered[-limit:]


def contact_timeline(
    events: Iterable[Mapping[str, Any]],
    records: Iterable[Mapping[str, Any]],
    messages: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One line per event, journey-log record and message, newest first. A message stands at
    the time of its latest state and lists every state it reached with its time."""
    lines: list[dict[str, Any]] = []
    for event in events:
        lines.append(
            {
                "kind": "event",
                "at": event.get("at"),
                "name": event.get("name"),
                "type": event.get("type"),
                "properties": dict(event.get("properties") or {}),
                "text": _event_text(event),
            }
        )
    for record in records:
        if record.get("kind") == "forgotten":
            continue
        lines.append(
            {
                "kind": "journey",
                "at": record.get("at"),
                "journey_id": record.get("journey_id"),
                "journey_version": record.get("journey_version"),
                "step_id": record.get("step_id"),
                "log_kind": record.get("kind"),
                "text": record.get("why")
                or " ".join(str(record[k]) for k in ("kind", "reason", "detail") if record.get(k)),
            }
        )
    for message in messages:
        states = [
            {"state": state, "at": message[f"{state}_at"]}
            for state in _MESSAGE_STATES
            if isinstance(message.get(f"{state}_at"), datetime)
        ]
        states.sort(key=lambda s: _instant(s["at"]))
        latest = states[-1]["at"] if states else message.get("requested_at")
        reason = f" ({message['reason']})" if message.get("reason") else ""
        lines.append(
            {
                "kind": "message",
                "at": latest,
                "message_id": message.get("message_id") or message.get("_id"),
                "channel": message.get("channel"),
                "template_id": message.get("template_id"),
                "journey_id": message.get("journey_id"),
                "step_id": message.get("step_id"),
                "state": message.get("state"),
                "states": states,
                "text": f"{message.get('template_id')} on {message.get('channel')}: "
                f"{message.get('state')}{reason}",
            }
        )
    # Stable: lines of one kind at one instant keep the order they were read in.
    lines.sort(
        key=lambda line: (
            _instant(line["at"]),
            _RANK[line["kind"]],
            _LOG_RANK.get(str(line.get("log_kind")), 0),
        ),
        reverse=True,
    )
    return lines


def _event_text(event: Mapping[str, Any]) -> str:
    properties = event.get("properties") or {}
    shown = ", ".join(f"{name} = {value}" for name, value in properties.items())
    more = int(event.get("more_properties") or 0)
    if more:
        shown += f", {more} more"
    return f"{event.get('name')}" + (f" ({shown})" if shown else "")


def _short(value: Any) -> Any:
    """Numbers and booleans as they are; anything else as text of at most 60 characters."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"


def _instant(value: Any) -> float:
    """A time as seconds, for ordering: naive times (as the store gives them back) are UTC."""
    if not isinstance(value, datetime):
        return 0.0
    if value.tzinfo is None:
        return (value - datetime(1970, 1, 1)).total_seconds()
    return value.timestamp()
