"""The dispatcher's decisive state, kept where its partition is processed: the message ledger,
frequency-cap counts, consent words and erased contacts in the worker's RocksDB tables
(`shared.streams`), each backed by a compacted changelog written in the batch's Kafka transaction.

Every table is co-partitioned with the send requests (all keyed by contact), and one contact's
records are handled one after another, so a read-modify-write needs no lock and cannot race.
Writes are staged in the batch and become durable together when it commits; a try's `sending`
mark is made durable before its provider call by the try's intent (`Ledger.begin`, `Gate`). The
document store's `messages` collection is a view of the ledger for the admin
(`adapters/ledger_view.py`), written in bulk off the hot path.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic_core import from_json, to_json

from services.dispatcher.domain.policy import ConsentRecord
from shared.channels import CHANNELS
from shared.contracts import SendRequest
from shared.ids import keyed_digest
from shared.streams import Table, focused

LEDGER = "ledger"
CAPS = "caps"
CONSENT = "consent"
FORGOTTEN = "forgotten"
INTENTS = "intents"

# What an erased contact's ledger entries say instead of its key, and why a request for it that
# arrives after the erasure ends `skipped`.
FORGOTTEN_KEY = "forgotten"
FORGOTTEN_REASON = "contact_forgotten"
# The fields an erased contact's entry keeps: what was sent by which journey step, and when.
# Everything else goes: the key, the history, and provider text (a bounce may quote an address).
_KEPT_WHEN_FORGOTTEN = frozenset(
    {
        "state",
        "attempt",
        "channel",
        "template_id",
        "journey_id",
        "journey_version",
        "instance_id",
        "step_id",
        "transactional",
        "try",
        "rev",
    }
)

# After a send, what delivery reports may move the entry to, in order.
_TRACKING_ORDER = ("sent", "delivered", "opened", "clicked")
# States a conclusion may leave: the entry has not reached its final state yet.
_OPEN_STATES = frozenset({"requested", "sending", "retrying"})


def _encode(value: Any) -> bytes:
    """Compact JSON, times as ISO 8601 text (UTC written with "Z"; `datetime.fromisoformat`
    reads it, as it reads the "+00:00" of entries written before). pydantic-core's encoder:
    a ledger entry took 22 µs with the json module and a `default` hook for its times, 4 µs
    with it, and each send writes its entry several times."""
    return to_json(value)


def is_time_field(name: str) -> bool:
    """Entry fields that hold a time (stored as ISO 8601 text)."""
    return name.endswith("_at") or name == "at"


def entry_times(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as read back: its times as datetimes again (history included)."""
    out = {k: datetime.fromisoformat(v) if is_time_field(k) and v else v for k, v in entry.items()}
    history = out.get("history")
    if isinstance(history, list):
        out["history"] = [entry_times(item) for item in history]
    return out


def forgotten_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """An erased contact's ledger entry: its message's facts and times, nothing of the contact
    (the message id stays, so replays of its request stay no-ops)."""
    kept = {k: v for k, v in entry.items() if k in _KEPT_WHEN_FORGOTTEN or is_time_field(k)}
    return {**kept, "contact_key": FORGOTTEN_KEY}


def _requested(request: SendRequest, now: datetime, *, rev: int) -> dict[str, Any]:
    """A new entry for `request`, in state `requested`. `rev` counts the entry's changes: the
    admin's view never takes an older one over a newer one (`ledger_view`)."""
    return {
        "state": "requested",
        "attempt": 1,
        "contact_key": request.contact_key,
        "channel": request.channel,
        "template_id": request.template_id,
        "journey_id": request.journey_id,
        "journey_version": request.journey_version,
        "instance_id": request.instance_id,
        "step_id": request.step_id,
        "transactional": request.transactional,
        "requested_at": request.requested_at,
        "history": [{"state": "requested", "at": now}],
        "rev": rev,
    }


@dataclass(frozen=True)
class Claim:
    new: bool
    state: str
    attempt: int


# What makes a try's `sending` mark durable before its call, given the message id, the
# marked entry's revision and the entry as written: the dispatcher writes an intent to the
# receipts topic (`Dispatcher._durable`).
Gate = Callable[[str, int, bytes], Awaitable[None]]


class Ledger:
    """One entry per message id. The entry's state moves requested → sending → a final state
    (or retrying, and back); `history` lists every move with its time. `gate` makes a try's
    mark durable (`Gate`): `begin` waits for it, so a try is durable as `sending` before its
    provider call."""

    def __init__(self, table: Table, gate: Gate) -> None:
        self._table = table
        self._gate = gate

    def use_gate(self, gate: Gate) -> None:
        self._gate = gate

    def _read(self, message_id: str) -> dict[str, Any] | None:
        raw = self._table.get(message_id.encode())
        return None if raw is None else from_json(raw)

    def _write(self, message_id: str, entry: dict[str, Any]) -> None:
        self._table[message_id.encode()] = _encode(entry)

    async def claim(self, request: SendRequest, now: datetime) -> Claim:
        """Record the entry as `requested`, or report the state a previous delivery left."""
        found = self._read(request.message_id)
        if found is not None:
            return Claim(False, str(found["state"]), int(found.get("attempt", 1)))
        self._write(request.message_id, _requested(request, now, rev=1))
        return Claim(True, "requested", 1)

    async def get(self, message_id: str) -> dict[str, Any] | None:
        found = self._read(message_id)
        return None if found is None else entry_times(found)

    async def begin(self, message_id: str, try_id: str, attempt: int, now: datetime) -> bool:
        """Mark the try `sending` and wait until the mark is durable (`Gate`); False when this
        try began before (a replay: what it came to is the entry's state)."""
        entry = self._read(message_id)
        if entry is None or entry.get("try") == try_id:
            return False
        raw = self._move(message_id, entry, "sending", now, attempt=attempt, **{"try": try_id})
        await self._gate(message_id, int(entry["rev"]), raw)
        return True

    def revision(self, message_id: str) -> int | None:
        """The entry's revision (`rev`), None when there is no entry."""
        found = self._read(message_id)
        return None if found is None else int(found.get("rev", 0))

    def overlay(self, message_id: str, rev: int, raw: bytes) -> bool:
        """Put a marked entry (`raw`, at revision `rev`) from a try's intent over the entry,
        unless the entry already has that revision or a later one: the intent's mark, or
        what came after it, is in the ledger. True when it was put."""
        current = self.revision(message_id)
        if current is not None and current >= rev:
            return False
        self._table[message_id.encode()] = raw
        return True

    async def conclude(self, message_id: str, state: str, now: datetime, **fields: Any) -> bool:
        """Record the outcome once; True for the caller that should carry out what follows."""
        entry = self._read(message_id)
        if entry is None or entry.get("state") not in _OPEN_STATES:
            return False
        self._move(message_id, entry, state, now, **fields)
        return True

    async def retrying(
        self, message_id: str, attempt: int, due_at: datetime, reason: str, now: datetime
    ) -> None:
        """The request waits on a retry topic for attempt `attempt`."""
        entry = self._read(message_id)
        if entry is None:
            return
        self._move(
            message_id, entry, "retrying", now, attempt=attempt, due_at=due_at, reason=reason
        )

    async def track(self, message_id: str, state: str, now: datetime, **fields: Any) -> bool:
        """A delivery report: moves forward only (sent → delivered → opened → clicked)."""
        entry = self._read(message_id)
        if entry is None or entry.get("state") not in _TRACKING_ORDER:
            return False
        if _TRACKING_ORDER.index(str(entry["state"])) >= _TRACKING_ORDER.index(state):
            return False
        self._move(message_id, entry, state, now, **fields)
        return True

    async def undelivered(self, message_id: str, now: datetime, **fields: Any) -> bool:
        """A delivery report that the accepted message never arrived."""
        entry = self._read(message_id)
        if entry is None or entry.get("state") not in ("sent", "delivered"):
            return False
        self._move(message_id, entry, "failed", now, **fields)
        return True

    async def forget(self, contact_key: str) -> None:
        """An erased contact's entries keep their ids (replays stay no-ops), not the key."""
        partition = focused()
        # The key as entries write it: now, and before their encoder changed (the json
        # module's, with non-ASCII characters escaped).
        needles = {to_json(contact_key), json.dumps(contact_key).encode()}
        for key, raw in list(self._table.rows(partition)):
            if not any(needle in raw for needle in needles):
                continue  # most entries: not this contact's, without decoding them
            entry = from_json(raw)
            if entry.get("contact_key") != contact_key:
                continue
            entry = forgotten_entry(entry)
            entry["rev"] = int(entry.get("rev", 0)) + 1
            self._table[key] = _encode(entry)

    async def skip_forgotten(self, request: SendRequest, now: datetime) -> bool:
        """A request or retry of an erased contact ends `skipped`, its entry holding nothing of
        the contact; False when its entry had ended already (nothing to do)."""
        entry = self._read(request.message_id)
        if entry is None:
            entry = _requested(request, now, rev=0)
        elif entry.get("state") not in _OPEN_STATES:
            return False
        self._move(
            request.message_id, forgotten_entry(entry), "skipped", now, reason=FORGOTTEN_REASON
        )
        return True

    def _move(
        self, message_id: str, entry: dict[str, Any], state: str, now: datetime, **fields: Any
    ) -> bytes:
        kept = {k: v for k, v in fields.items() if v is not None}
        entry.update(kept)
        entry["rev"] = int(entry.get("rev", 0)) + 1
        entry["state"] = state
        entry[f"{state}_at"] = now
        history = entry.setdefault("history", [])
        history.append({"state": state, "at": now, **{k: v for k, v in kept.items() if k != "try"}})
        raw = _encode(entry)
        self._table[message_id.encode()] = raw
        return raw


class Caps:
    """Provider-accepted sends per contact and channel, for frequency caps."""

    def __init__(self, table: Table) -> None:
        self._table = table

    @staticmethod
    def _key(contact_key: str, channel: str) -> bytes:
        return f"{channel}|{contact_key}".encode()

    async def sends(self, contact_key: str, channel: str) -> list[datetime]:
        raw = self._table.get(self._key(contact_key, channel))
        return [datetime.fromisoformat(at) for at in from_json(raw)] if raw else []

    async def count(
        self,
        contact_key: str,
        channel: str,
        at: datetime,
        keep: Callable[[list[datetime]], list[datetime]],
    ) -> None:
        """Count one accepted send at `at`; `keep` drops the sends no cap can count any more."""
        sends = await self.sends(contact_key, channel)
        self._table[self._key(contact_key, channel)] = _encode(keep([*sends, at]))

    async def forget(self, contact_key: str) -> None:
        _delete(self._table, (self._key(contact_key, channel) for channel in CHANNELS))


class Consent:
    """(Un)subscribes the dispatcher saw in the delivery reports: fresher than a request's
    profile. The newest word per channel is kept (an older, late event changes nothing)."""

    def __init__(self, table: Table) -> None:
        self._table = table

    @staticmethod
    def _key(contact_key: str, channel: str) -> bytes:
        return f"{channel}|{contact_key}".encode()

    async def get(self, contact_key: str, channel: str) -> ConsentRecord | None:
        raw = self._table.get(self._key(contact_key, channel))
        if raw is None:
            return None
        word = from_json(raw)
        return ConsentRecord(bool(word["given"]), datetime.fromisoformat(word["at"]))

    async def record(self, contact_key: str, channel: str, given: bool, at: datetime) -> None:
        current = await self.get(contact_key, channel)
        if current is not None and current.at >= at:
            return
        self._table[self._key(contact_key, channel)] = _encode({"given": given, "at": at})

    async def forget(self, contact_key: str) -> None:
        _delete(self._table, (self._key(contact_key, channel) for channel in CHANNELS))


class ForgottenContacts:
    """Contacts erased on this partition, by an HMAC-SHA256 of the key under the suppression
    secret (the table keeps no key): a send request or retry of theirs that was still queued
    when the erasure came, or that comes later, is never delivered."""

    def __init__(self, table: Table, secret: bytes) -> None:
        self._table = table
        self._secret = secret

    def _key(self, contact_key: str) -> bytes:
        return keyed_digest(self._secret, FORGOTTEN, contact_key).hex().encode()

    async def record(self, contact_key: str, at: datetime) -> None:
        self._table[self._key(contact_key)] = _encode({"at": at})

    async def includes(self, contact_key: str) -> bool:
        return self._table.get(self._key(contact_key)) is not None


class IntentsFrom:
    """Per partition, the offset of the receipts topic from which a worker that takes the
    partition reads the intents of tries (`Dispatcher._durable`): every intent before it is of
    a try whose mark is in the ledger. Written with each batch's commit."""

    _KEY = b"from"

    def __init__(self, table: Table) -> None:
        self._table = table

    def get(self) -> int | None:
        """The focused partition's offset; None before any batch of this form committed."""
        raw = self._table.get(self._KEY)
        return None if raw is None else int(from_json(raw))

    def put(self, offset: int) -> None:
        if self.get() != offset:
            self._table[self._KEY] = _encode(offset)


def _delete(table: Table, keys: Iterable[bytes]) -> None:
    for key in keys:
        table.pop(key, None)
