"""The common tracking call, checked and encoded without pydantic's model (pure).

Nearly every call ingest receives is a well-formed SDK call: string ids, RFC 3339 timestamps,
objects for properties, traits and context. For those, converting the parsed body into msgspec
`QuickCall` structs and checking them with `Call`'s own whole-call rules (`broken_rule`) costs
about half of what pydantic's model costs (docs/ingest-performance.md). Everything else (numeric
ids, a number for a time, a rule broken, a field nested too deep, a body that is not a JSON
object) is declined with `None`, and the caller checks that request again with `Call`, from its
bytes: the answers and their messages stay pydantic's, and so do the odd inputs `Call` accepts.

The rule this module keeps: when it returns events, they are the very records `Call` and
`encode_call` would have written (tests/unit/test_ingest_quick.py compares the two on generated
calls, valid and not).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from pydantic_core import from_json

from services.ingest.domain.calls import (
    MAX_BATCH_CALLS,
    CallContext,
    EncodedEvent,
    broken_rule,
    encode_call,
)
from shared.bodies import MAX_JSON_DEPTH, STRINGS_CACHED, few_containers, too_deep
from shared.contracts import EventType
from shared.profiles import ProfileLimits

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Name = Annotated[str, msgspec.Meta(max_length=256)]


class QuickCall(msgspec.Struct, rename="camel"):
    """A call's fields as `Call` reads them, for calls with string ids and string timestamps."""

    type: EventType
    user_id: Id | None = None
    anonymous_id: Id | None = None
    message_id: Id | None = None
    timestamp: datetime | None = None
    sent_at: datetime | None = None
    original_timestamp: datetime | None = None
    event: Name | None = None
    name: Name | None = None
    previous_id: Name | None = None
    group_id: Name | None = None
    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    context: dict[str, Any] = {}
    write_key: str | None = None


_FIELDS = msgspec.structs.fields(QuickCall)
# The names a call may carry its fields under. `Call` also reads each field under its Python
# name (`user_id` for `userId`); a call that uses one is declined.
_KNOWN = frozenset(field.encode_name for field in _FIELDS)
_PYTHON_NAMES = frozenset(field.name for field in _FIELDS) - _KNOWN
_TIMES = ("timestamp", "sentAt", "originalTimestamp")
# pydantic cuts a fraction of a second past microseconds short, msgspec rounds it.
_LONG_FRACTION = re.compile(r"\.\d{7}")
_BATCH_FIELDS = frozenset({"batch", "writeKey", "context"})


class _Declined(Exception):
    """This call is for `Call` to check."""


def decode(body: bytes) -> dict[str, Any] | None:
    """The body's JSON object, or None when it is not one (for `parse_json` to refuse, with its
    message). The parser is pydantic-core's, as the checked path's: what it refuses (nesting
    past 200 levels, even in a value a later duplicate key or the route's `type` replaces; a
    lone surrogate) and what it reads (NaN, `1e400` as infinity) are the same on both paths.
    """
    try:
        payload = from_json(body, cache_strings=STRINGS_CACHED)
    except ValueError:
        return None
    return payload if type(payload) is dict else None


class QuickCalls:
    """Checks and encodes calls received at one moment, for one source."""

    def __init__(
        self,
        *,
        received_at: datetime,
        source: str,
        limits: ProfileLimits,
        max_event_bytes: int,
        new_message_id: Callable[[], str],
    ) -> None:
        self._received_at = received_at
        self._context = CallContext(received_at, limits)
        self._source = source
        self._max_event_bytes = max_event_bytes
        self._new_message_id = new_message_id

    def call(self, payload: dict[str, Any]) -> EncodedEvent | None:
        """The record of one call (`type` set by the route), or None."""
        try:
            return self._encoded(self._checked(payload))
        except (_Declined, ValueError, RecursionError):  # whatever went wrong, `Call` answers
            return None

    def batch(self, payload: dict[str, Any]) -> list[EncodedEvent] | None:
        """The records of a `POST /v1/batch` body, or None: every call passes, or `Call` checks
        them all. A batch one of whose calls breaks a rule is declined before any message id is
        drawn; one whose record is too large or too deep, once some may have been (unused)."""
        try:
            items = _batch_items(payload)
            calls = [self._checked(item) for item in items]
            return [self._encoded(call) for call in calls]
        except (_Declined, ValueError, RecursionError):
            return None

    def _checked(self, payload: dict[str, Any]) -> tuple[QuickCall, dict[str, Any] | None]:
        extras: dict[str, Any] | None = None
        if not _KNOWN.issuperset(payload):
            names = payload.keys() - _KNOWN
            if not _PYTHON_NAMES.isdisjoint(names):
                raise _Declined
            extras = {name: payload[name] for name in names}
        for name in _TIMES:
            value = payload.get(name)
            if value is not None and (type(value) is not str or _LONG_FRACTION.search(value)):
                raise _Declined  # a number for a time, or a fraction past microseconds
        try:
            call = msgspec.convert(payload, QuickCall)
        except msgspec.ValidationError:
            raise _Declined from None
        for name in ("timestamp", "sent_at", "original_timestamp"):
            value = getattr(call, name)
            if value is not None and value.tzinfo is None:
                setattr(call, name, value.replace(tzinfo=UTC))  # as `Call` reads it
        if broken_rule(call, self._context) is not None:
            raise _Declined
        return call, extras

    def _encoded(self, checked: tuple[QuickCall, dict[str, Any] | None]) -> EncodedEvent:
        call, extras = checked
        event = encode_call(
            call,
            message_id=call.message_id or self._new_message_id(),
            received_at=self._received_at,
            source=self._source,
        )
        if not few_containers(event.value) or extras:
            kept = {"properties": call.properties, "traits": call.traits, "context": call.context}
            if too_deep({**kept, **(extras or {})}, MAX_JSON_DEPTH) is not None:
                raise _Declined
        if len(event.value) > self._max_event_bytes:
            raise _Declined
        return event


def _batch_items(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch's calls, each with the batch's context under its own (as `CallIntake.batch`
    merges them), or `_Declined`."""
    items = payload.get("batch")
    if type(items) is not list or not 1 <= len(items) <= MAX_BATCH_CALLS:
        raise _Declined
    write_key = payload.get("writeKey")
    if write_key is not None and type(write_key) is not str:
        raise _Declined
    shared_context = payload.get("context", {})
    if type(shared_context) is not dict:
        raise _Declined
    if not _BATCH_FIELDS.issuperset(payload):
        extras = {name: payload[name] for name in payload.keys() - _BATCH_FIELDS}
        if "write_key" in extras or too_deep(extras, MAX_JSON_DEPTH) is not None:
            raise _Declined
    merged = []
    for item in items:
        if type(item) is not dict:  # its `type` is checked with the rest of its fields
            raise _Declined
        given_context = item.get("context")
        item_context = given_context or {}
        if type(item_context) is not dict:
            raise _Declined
        if shared_context or item_context is not given_context:
            item = {**item, "context": {**shared_context, **item_context}}
        merged.append(item)
    return merged
