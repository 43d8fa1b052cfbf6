"""The segmenter shell folds batches: any batch boundaries give what one record at a time gives,
and a crash between producing, acknowledging, storing and committing loses nothing and, after
the restart, repeats only outputs with the ids they had (which consumers de-duplicate).

Dicts stand in for the worker's tables and a list for Kafka; the clock is fixed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.segmenter.adapters.members import MemberIndex
from services.segmenter.app import (
    CONTACTS,
    LINKS,
    MEMBERSHIPS,
    Contacts,
    forgotten_marker,
    legacy_forgotten_marker,
)
from services.segmenter.domain.definitions import Definitions
from shared.batching import Overlay
from shared.clock import ManualClock
from shared.conditions import condition_from
from shared.contracts import ContactCommand, Event
from shared.deadletter import DeadLetters
from shared.kafka import Record
from shared.segments import AggregateDefinition, SegmentDefinition
from shared.topics import CONTACT_COMMANDS, DEAD_LETTER, DELIVERY_REPORTS, EVENTS, PROFILES

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
KEYS = ("ada", "bob", "cy")
ERASURE_KEY = b"test-erasure-secret-of-32-bytes!"
DEFINITIONS = Definitions.of(
    [
        AggregateDefinition.model_validate(
            {"id": "views", "event": "Product Viewed", "window": "1d"}
        )
    ],
    [
        SegmentDefinition(
            id="browsers",
            condition=condition_from({"field": "aggregates.views", "op": "gte", "value": 2}),
        ),
        SegmentDefinition(id="vips", condition=condition_from({"tag": "vip"})),
    ],
)

Output = tuple[str, str | None, bytes | None]


class Crash(BaseException):
    """The worker dies here, as a SIGKILL would: nothing in the shell may catch it."""


class Log:
    """Kafka as seen by the shell: what it produced, acknowledged at once unless told to crash
    after producing."""

    def __init__(self) -> None:
        self.records: list[Output] = []
        self.crash_after_produce = False

    async def send_all(self, records: Iterable[Output]) -> None:
        self.records.extend(records)
        if self.crash_after_produce:
            self.crash_after_produce = False
            raise Crash("after produce")

    async def send(self, topic: str, key: str | None, value: bytes) -> None:
        self.records.append((topic, key, value))


class Tables(dict[bytes, bytes]):
    """A table whose next write can crash the worker (before anything is stored)."""

    crash_on_write = False

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._crash_if_told()
        super().__setitem__(key, value)

    def pop(self, key: bytes, default: Any = None) -> Any:
        self._crash_if_told()
        return super().pop(key, default)

    @staticmethod
    def _crash_if_told() -> None:
        if Tables.crash_on_write:
            Tables.crash_on_write = False
            raise Crash("before the rows are stored")


class Fixed:
    def current(self) -> Definitions:
        return DEFINITIONS


def shell(
    tables: dict[str, MutableMapping[bytes, bytes]], log: Log, decoded_rows: int = 100
) -> Contacts:
    clock = ManualClock(NOW)
    return Contacts(
        tables,
        log,  # type: ignore[arg-type]
        DeadLetters(log, "segmenter", clock),  # type: ignore[arg-type]
        Fixed(),
        clock,
        MemberIndex(),
        erasure_key=ERASURE_KEY,
        decoded_rows=decoded_rows,
    )


def fresh_tables() -> dict[str, MutableMapping[bytes, bytes]]:
    return {CONTACTS: Tables(), MEMBERSHIPS: Tables(), LINKS: Tables()}


def event(n: int, key: str, kind: str, message: int) -> Record:
    fields: dict[str, Any] = {"userId": key, "messageId": f"m-{message}"}
    at = NOW - timedelta(minutes=n)
    if kind == "identify":
        fields |= {
            "type": "identify",
            "traits": {"plan": f"p{n % 3}"},
            "anonymousId": f"anon-{key}",
        }
    elif kind == "poison":
        return Record(EVENTS.name, 0, n, key, b'{"type": "track"')
    else:
        fields |= {"type": "track", "event": "Product Viewed", "properties": {"sku": f"s{n}"}}
    value = Event.model_validate({**fields, "timestamp": at, "receivedAt": at}).to_wire()
    return Record(EVENTS.name, 0, n, key, value)


def command(n: int, key: str, kind: str) -> Record:
    spec: dict[str, Any] = {"command_id": f"c-{n}", "contact_key": key, "at": NOW}
    if kind == "tag":
        spec |= {"kind": "add_tag", "tag": "vip"}
    else:
        spec |= {"kind": "forget", "reason": "asked"}
    return Record(CONTACT_COMMANDS.name, 0, n, key, ContactCommand(**spec).to_wire())


STEP = st.tuples(
    st.sampled_from(KEYS),
    st.sampled_from(["view", "view", "view", "identify", "tag", "forget", "poison"]),
    st.integers(0, 12),  # message ids repeat: duplicates are absorbed
)


def records_of(steps: list[tuple[str, str, int]]) -> list[Record]:
    out = []
    for n, (key, kind, message) in enumerate(steps):
        out.append(
            command(n, key, kind) if kind in ("tag", "forget") else event(n, key, kind, message)
        )
    return out


def split(records: list[Record], cuts: list[int]) -> list[list[Record]]:
    bounds = sorted({c % (len(records) + 1) for c in cuts} | {0, len(records)})
    return [records[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def run(
    batches: list[list[Record]], decoded_rows: int = 100
) -> tuple[dict[str, dict[bytes, bytes]], list[Output]]:
    tables, log = fresh_tables(), Log()
    contacts = shell(tables, log, decoded_rows)
    for batch in batches:
        asyncio.run(contacts.process(batch))
    return {name: dict(t) for name, t in tables.items()}, log.records


def without_letter_times(outputs: list[Output]) -> list[Output]:
    """Dead letters carry the time they were written; everything else is deterministic."""
    return [(t, k, v if t != DEAD_LETTER.name else b"letter") for t, k, v in outputs]


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=24), cuts=st.lists(st.integers(0, 30)))
def test_any_batch_boundaries_give_what_one_record_at_a_time_gives(
    steps: list[tuple[str, str, int]], cuts: list[int]
) -> None:
    records = records_of(steps)
    one_by_one = run([[r] for r in records])
    batched = run(split(records, cuts))
    assert batched[0] == one_by_one[0]
    assert without_letter_times(streamed(batched[1])) == without_letter_times(
        streamed(one_by_one[1])
    )
    # The compacted profiles topic ends the same, from no snapshot the records did not give.
    assert compacted(batched[1]) == compacted(one_by_one[1])
    assert {o for o in batched[1] if o[0] == PROFILES.name} <= set(one_by_one[1])


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=24), cuts=st.lists(st.integers(0, 30)))
def test_rows_kept_decoded_give_what_decoding_every_read_gives(
    steps: list[tuple[str, str, int]], cuts: list[int]
) -> None:
    batches = split(records_of(steps), cuts)
    assert run(batches, decoded_rows=100) == run(batches, decoded_rows=0)


def test_a_row_rewritten_under_the_kept_one_is_read_as_stored() -> None:
    """Another writer (a restore after the partition came back, say) replaced the stored row:
    the next record folds into what is stored, not into the row kept decoded."""
    tables, log = fresh_tables(), Log()
    contacts = shell(tables, log)
    asyncio.run(contacts.process([event(1, "ada", "view", 1)]))
    elsewhere = {name: Tables(table) for name, table in tables.items()}
    asyncio.run(shell(elsewhere, Log()).process([command(2, "ada", "tag")]))
    tables[CONTACTS][b"ada"] = elsewhere[CONTACTS][b"ada"]
    asyncio.run(contacts.process([event(3, "ada", "view", 3)]))
    row = json.loads(tables[CONTACTS][b"ada"])
    assert row["profile"]["tags"] == ["vip"]
    assert "vips" in row["profile"]["segments"]


def streamed(outputs: list[Output]) -> list[Output]:
    """The outputs every record makes, in order: all but the profile snapshots."""
    return [output for output in outputs if output[0] != PROFILES.name]


def compacted(outputs: list[Output]) -> dict[str | None, bytes | None]:
    """What a reader of the compacted profiles topic ends with: the last snapshot per key."""
    return {key: value for topic, key, value in outputs if topic == PROFILES.name}


def test_a_contact_s_events_in_one_batch_publish_one_profile_snapshot_its_newest() -> None:
    records = [event(n, "ada", "view", n) for n in range(3)] + [event(3, "bob", "view", 3)]
    _tables, one_by_one = run([[r] for r in records])
    _tables, batched = run([records])
    profiles = [(k, v) for t, k, v in batched if t == PROFILES.name]
    assert [k for k, _v in profiles] == ["ada", "bob"]
    assert profiles == list(compacted(one_by_one).items())
    assert len([o for o in one_by_one if o[0] == PROFILES.name]) == 4
    # The rest is what the records make one at a time.
    assert streamed(batched) == streamed(one_by_one)


@pytest.mark.parametrize("where", ["produced", "acknowledged", "stored"])
@settings(max_examples=20, deadline=None)
@given(
    steps=st.lists(STEP, min_size=2, max_size=20),
    cuts=st.lists(st.integers(0, 30)),
    at=st.integers(0, 30),
)
@example(steps=[("ada", "view", 0), ("ada", "view", 1), ("ada", "forget", 0)], cuts=[1], at=1)
def test_a_crash_between_the_steps_of_a_batch_loses_nothing(
    where: str, steps: list[tuple[str, str, int]], cuts: list[int], at: int
) -> None:
    records = records_of(steps)
    batches = split(records, cuts)
    expected_tables, expected_outputs = run(batches)
    crashed = at % len(batches)
    tables, log = fresh_tables(), Log()
    committed = 0  # batches whose offsets were committed
    contacts = shell(tables, log)
    for index, batch in enumerate(batches):
        if index == crashed:
            log.crash_after_produce = where == "produced"
            Tables.crash_on_write = where == "acknowledged"
            with contextlib.suppress(Crash):
                asyncio.run(contacts.process(batch))
            Tables.crash_on_write = False
            # ("stored": the batch ran to its end and the worker died before the commit.)
            # The restarted worker: tables as stored, redelivery from the last commit.
            contacts = shell(tables, log)
            for again in batches[committed : index + 1]:
                asyncio.run(contacts.process(again))
        else:
            asyncio.run(contacts.process(batch))
        committed = index + 1
    assert {name: dict(t) for name, t in tables.items()} == expected_tables
    assert {identity(o) for o in log.records} == {identity(o) for o in expected_outputs}


def identity(output: Output) -> tuple[str, str | None, str]:
    """What a consumer de-duplicates an output by: its event's message id or its command's id
    (a replay may describe a forgotten contact with less, under the same id); the whole value
    for state records (profiles, segment timers)."""
    topic, key, value = output
    if topic == DEAD_LETTER.name or value is None:
        return topic, key, "" if value is None else "letter"
    body = json.loads(value)
    if topic == DELIVERY_REPORTS.name:  # the accepted event itself
        return topic, key, str(body["messageId"])
    found = body.get("event", {}).get("messageId") or body.get("command_id")
    return topic, key, str(found) if found else value.decode()


# --- the forgotten marker ----------------------------------------------------------------------


def test_a_forgotten_contact_leaves_a_marker_keyed_by_the_erasure_secret_only() -> None:
    tables, _outputs = run([[event(0, "ada", "view", 0), command(1, "ada", "forget")]])

    plain = hashlib.sha256(b"ada").hexdigest().encode()
    assert list(tables[LINKS]) == [forgotten_marker(ERASURE_KEY, "ada")]
    # Nothing in the row is the key's plain hash, which anyone could compute from a guess.
    assert all(plain not in k and plain not in v for k, v in tables[LINKS].items())
    assert legacy_forgotten_marker("ada") == b"forgotten:" + plain
    assert forgotten_marker(b"another-secret-of-32-bytes-long!", "ada") not in tables[LINKS]


def test_later_events_of_a_forgotten_contact_are_dropped() -> None:
    tables, log = fresh_tables(), Log()
    contacts = shell(tables, log)
    asyncio.run(contacts.process([event(0, "ada", "view", 0), command(1, "ada", "forget")]))
    published = len(log.records)

    asyncio.run(contacts.process([event(2, "ada", "identify", 5)]))

    assert b"ada" not in tables[CONTACTS]
    assert len(log.records) == published


def test_a_contact_forgotten_mid_batch_drops_its_later_events_of_the_batch() -> None:
    """The contact's first event finds no marker (and that is remembered); the marker its
    forget writes counts for the events after it, in the batch and in later ones."""
    tables, log = fresh_tables(), Log()
    contacts = shell(tables, log)
    asyncio.run(
        contacts.process(
            [event(0, "ada", "view", 0), command(1, "ada", "forget"), event(2, "ada", "view", 2)]
        )
    )
    published = len(log.records)
    asyncio.run(contacts.process([event(3, "ada", "view", 3)]))

    assert b"ada" not in tables[CONTACTS]
    assert len(log.records) == published
    # The first event's outputs carry its message id; the suppressed ones' appear nowhere.
    assert any(b'"m-0"' in (value or b"") for _topic, _key, value in log.records)
    assert not any(
        b'"m-2"' in (value or b"") or b'"m-3"' in (value or b"")
        for _topic, _key, value in log.records
    )


def test_a_marker_restored_with_a_partition_is_honoured_for_a_contact_seen_before() -> None:
    """Another worker forgot the contact; its marker arrives with the partition's restored
    table, after this worker had already found the contact unmarked."""
    tables, log = fresh_tables(), Log()
    contacts = shell(tables, log)
    asyncio.run(contacts.process([event(0, "ada", "view", 0)]))
    tables[LINKS][forgotten_marker(ERASURE_KEY, "ada")] = NOW.isoformat().encode()
    contacts.restored()
    published = len(log.records)

    asyncio.run(contacts.process([event(1, "ada", "view", 1), event(2, "bob", "view", 2)]))

    assert {key for _topic, key, _value in log.records[published:]} == {"bob"}


def test_a_marker_written_before_the_keyed_digest_is_still_honoured() -> None:
    tables, log = fresh_tables(), Log()
    tables[LINKS][legacy_forgotten_marker("ada")] = NOW.isoformat().encode()
    contacts = shell(tables, log)

    asyncio.run(contacts.process([event(0, "ada", "view", 0), event(1, "bob", "view", 1)]))

    assert list(tables[CONTACTS]) == [b"bob"]
    assert {key for _topic, key, _value in log.records} == {"bob"}


def test_a_superseded_profile_snapshot_is_never_encoded_and_the_newest_once() -> None:
    calls: list[str] = []

    def snapshot(name: str) -> Any:
        def encode() -> bytes:
            calls.append(name)
            return name.encode()

        return encode

    batch = Overlay()
    for name in ("first", "second", "third"):
        batch.emit_latest((PROFILES.name, "ada", snapshot(name)))
        batch.keep()
    batch.emit_latest((PROFILES.name, "bob", b"ready"))
    batch.keep()

    sent = batch.to_send()

    assert sent == [(PROFILES.name, "ada", b"third"), (PROFILES.name, "bob", b"ready")]
    assert batch.to_send() == sent  # sent again after an outage: nothing encoded twice
    assert calls == ["third"]


class Flaky(Log):
    """Kafka refusing the batch's first send: an outage (retried) or a failure of its own (the
    batch is abandoned and each record run alone)."""

    def __init__(self, failure: Exception) -> None:
        super().__init__()
        self.failure: Exception | None = failure

    async def send_all(self, records: Iterable[Output]) -> None:
        records = list(records)  # the snapshots are worked out before the send fails
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        await super().send_all(records)


@pytest.mark.parametrize("failure", [TimeoutError("broker away"), ValueError("refused")])
def test_a_batch_sent_again_publishes_the_snapshots_one_record_at_a_time_gives(
    failure: Exception,
) -> None:
    records = [
        event(1, "ada", "identify", 1),
        event(2, "ada", "view", 2),
        event(3, "bob", "view", 3),
        event(4, "ada", "view", 4),
    ]
    one_tables, one_by_one = run([[r] for r in records])
    tables, log = fresh_tables(), Flaky(failure)
    contacts = shell(tables, log)

    asyncio.run(contacts.process(records))

    assert {name: dict(table) for name, table in tables.items()} == {
        name: dict(table) for name, table in one_tables.items()
    }
    assert compacted(log.records) == compacted(one_by_one)
    assert contacts._wires == {}  # no encoding outlives its batch
