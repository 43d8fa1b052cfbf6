"""Segmenter shell: the single writer of every contact's profile, aggregates and memberships.

One processor reads events, contact commands and audience requests, so one contact's changes apply
in order. For each it decodes the record, lets `domain.decide` decide against the contact's rows
as the batch sees them (fan-out, suppression, forwarding, forget, merge, and the change itself),
and hands the commands to the batch: outputs are published, and only then are the rows stored. A
crash repeats work, which the de-duplication by message id absorbs, and never loses it.

Re-keying: an event that carries a userId and an anonymousId (or an `alias` call) links them.
The known contact asks the anonymous one to merge (`merge_into`, through Kafka to the anonymous
key's partition); that partition hands its whole row over (`absorb`) and leaves a link, so later
anonymous events are forwarded to the known contact. Each contact still lives on one partition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, MutableMapping, Sequence
from functools import lru_cache, partial
from typing import Protocol, assert_never

import structlog

from services.segmenter.adapters.definitions import LiveDefinitions
from services.segmenter.adapters.members import MemberIndex, membership_row, read_membership
from services.segmenter.domain.contact import ContactRow
from services.segmenter.domain.decide import (
    Announce,
    Decision,
    DeleteAlias,
    DeleteMembership,
    DeleteRow,
    Forward,
    IndexObject,
    LimitReached,
    LinkAlias,
    Log,
    PublishProfile,
    Report,
    RequestTimer,
    SendCommand,
    StoreMembership,
    StoreRow,
    Suppress,
    UpdateMembers,
    decide,
)
from services.segmenter.domain.definitions import Definitions
from services.segmenter.settings import SegmenterSettings
from shared.batching import Focus, Output, Overlay, no_focus
from shared.clock import Clock
from shared.contracts import (
    AudienceRequest,
    ContactCommand,
    ContactEvent,
    Event,
    Profile,
    SegmentCount,
    wire_json,
)
from shared.deadletter import DeadLetters, failure_reason, through_outages
from shared.decoded import DecodedRows
from shared.ids import keyed_digest, stable_id
from shared.journeys import AUDIENCE_SELECTED
from shared.kafka import AsyncProducer, DeliveryFailed, ProducerBusy, Record
from shared.profiles import DEFAULT_LIMITS, ProfileLimits, announce
from shared.streams import StreamWorker, focus
from shared.topics import (
    AUDIENCE_REQUESTS,
    CONTACT_COMMANDS,
    CONTACT_EVENTS,
    DELIVERY_REPORTS,
    EVENTS,
    OBJECT_RELATIONS,
    PROFILES,
    SEGMENT_COUNTS,
    SEGMENT_TIMERS,
)

log = structlog.get_logger(__name__)

Records = list[Output]
# Audience members are announced in rounds of this many, each acknowledged before the next.
AUDIENCE_ROUND = 1000
_ALIAS = b"alias:"
# `forgotten:<HMAC-SHA256 of the key under the erasure secret>`: kept for good per erased
# contact. Versions before kept `forgotten:<SHA-256 of the key>`, still honoured when read.
_FORGOTTEN = b"forgotten:"
CONTACTS, MEMBERSHIPS, LINKS = "contacts", "memberships", "links"
# Contact rows kept decoded beside their stored bytes (a busy contact's next record skips the
# JSON parse). About 10 KB each in memory.
DECODED_ROWS = 10_000


class DefinitionsSource(Protocol):
    def current(self) -> Definitions: ...


class Contacts:
    """Folds batches of records into the contacts' rows: decode, decide, publish, then store.

    `tables` are the three tables by name (`contacts`, `memberships`, `links`): the worker's
    tables (addressed by the record's partition through `focus`), dicts in tests. A batch is
    folded in offset order against an `Overlay` (a later record of a contact sees the earlier
    one's result); every output is produced without a wait per record, acknowledged once for
    the batch, and only then are the rows stored (and the caller commits). A record that fails
    on its own is dead-lettered and leaves nothing in the batch. A batch whose publish fails
    for a reason other than an outage is folded again one record at a time, so only the record
    at fault is dead-lettered.
    """

    def __init__(
        self,
        tables: Mapping[str, MutableMapping[bytes, bytes]],
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        definitions: DefinitionsSource,
        clock: Clock,
        index: MemberIndex,
        limits: ProfileLimits = DEFAULT_LIMITS,
        *,
        erasure_key: bytes,
        decoded_rows: int = DECODED_ROWS,
    ) -> None:
        self.contacts = tables[CONTACTS]
        self.memberships = tables[MEMBERSHIPS]
        self.links = tables[LINKS]
        self._tables = tables
        self.producer = producer
        self.dead_letters = dead_letters
        self.definitions = definitions
        self.clock = clock
        self.index = index
        self.limits = limits
        self.erasure_key = erasure_key
        # Traits and event names the profile limits left out since the start (see the log).
        self.left_out = 0
        self._batch = Overlay()
        self._focus: Focus = no_focus
        # Profiles encoded in this batch, by identity (held, so an id is not reused meanwhile).
        self._wires: dict[int, tuple[Profile, bytes]] = {}
        self.decoded = DecodedRows(ContactRow.model_validate_json, decoded_rows)
        # Contacts found without an erasure marker, in the order found: every event asks, and a
        # contact's events come in runs. A marker is written only by this shell (`Suppress`,
        # which takes its contact out of here) or restored with a partition (`restored`
        # empties it); none is ever deleted.
        self._unmarked: dict[str, None] = {}

    async def process(self, records: Sequence[Record], focus: Focus | None = None) -> None:
        """Handle `records` (in offset order per partition); returns once their outputs are
        acknowledged and their rows stored. An audience request reads the member index, so
        what precedes it is stored first and it runs alone."""
        self._focus = focus or no_focus
        chunk: list[Record] = []
        for record in records:
            if record.topic == AUDIENCE_REQUESTS.name:
                if chunk:
                    await self._run(chunk)
                    chunk = []
                await self._run([record])
            else:
                chunk.append(record)
        if chunk:
            await self._run(chunk)

    async def _run(self, chunk: list[Record]) -> None:
        batch = self._batch
        for record in chunk:
            self._focus(record.partition)
            try:
                if record.topic == AUDIENCE_REQUESTS.name:
                    await through_outages(
                        partial(self._audience, record),
                        what="segmenter",
                        record=record,
                    )
                else:
                    self.take(record)
            except Exception as exc:  # noqa: BLE001 - a failure of its own is dead-lettered
                batch.discard()
                batch.emit(
                    self.dead_letters.letter(record, failure_reason(exc, record, "segmenter"))
                )
            batch.keep()
        try:
            await through_outages(
                lambda: self.producer.send_all(batch.to_send()), what="segmenter", record=chunk[0]
            )
        except Exception as exc:  # noqa: BLE001 - a failure of its own is dead-lettered
            self._wires.clear()
            batch.abandon()
            if len(chunk) == 1:
                await self.dead_letters.send(chunk[0], failure_reason(exc, chunk[0], "segmenter"))
                return
            for record in chunk:
                await self._run([record])
            return
        self._wires.clear()
        self._store(batch)

    def _store(self, batch: Overlay) -> None:
        for write in batch.writes():
            self._focus(write.partition)
            table = self._tables[write.table]
            if write.value is None:
                table.pop(write.key, None)
            elif isinstance(write.value, ContactRow):
                raw = wire_json(write.value)
                table[write.key] = raw
                self.decoded.remember(write.key, raw, write.value)
            else:
                table[write.key] = write.value
        batch.stored()

    def take(self, record: Record) -> None:
        """Decode one record of the agent's topics, decide it, and hand the commands to the
        batch."""
        incoming: Event | ContactCommand
        if record.topic == CONTACT_COMMANDS.name:
            incoming = ContactCommand.model_validate_json(record.value)
        else:
            incoming = Event.model_validate_json(record.value)
        key = incoming.contact_key  # an event without one is refused here
        decision = decide(
            _View(self, key), incoming, self.definitions.current(), self.clock.now(), self.limits
        )
        self._apply(decision, record.partition)

    def _apply(self, decision: Decision, partition: int) -> None:
        """Queue the decision's outputs and hold its rows in the batch, in the order decided;
        they are stored once every output of the batch is acknowledged."""
        batch = self._batch
        for command in decision.commands:
            match command:
                case Announce(contact_event=announced):
                    wire = announced.to_wire_with(self._profile_wire(announced.profile))
                    batch.emit((CONTACT_EVENTS.name, announced.contact_key, wire))
                case PublishProfile(contact_key=key, profile=profile):
                    # The profiles topic is compacted and read for its newest profile per
                    # contact: a contact's several events in a batch publish one snapshot,
                    # encoded when the batch is sent.
                    snapshot = None if profile is None else partial(self._profile_wire, profile)
                    batch.emit_latest((PROFILES.name, key, snapshot))
                case RequestTimer(request=request):
                    batch.emit((SEGMENT_TIMERS.name, request.contact_key, request.to_wire()))
                case SendCommand(command=sent):
                    batch.emit((CONTACT_COMMANDS.name, sent.contact_key, sent.to_wire()))
                case Forward(contact_key=key, event=forwarded):
                    batch.emit((EVENTS.name, key, forwarded.to_wire()))
                case Report(contact_key=key, event=reported):
                    batch.emit((DELIVERY_REPORTS.name, key, reported.to_wire()))
                case IndexObject(relation=relation):
                    batch.emit((OBJECT_RELATIONS.name, relation.object_key, relation.to_wire()))
                case StoreRow(contact_key=key, row=row):
                    batch.put(CONTACTS, key.encode(), partition, row)
                case DeleteRow(contact_key=key):
                    batch.delete(CONTACTS, key.encode(), partition)
                case StoreMembership(contact_key=key, evaluated=digest, segments=segments):
                    row_value = membership_row(partition, digest, segments)
                    batch.put(MEMBERSHIPS, key.encode(), partition, row_value)
                case DeleteMembership(contact_key=key):
                    batch.delete(MEMBERSHIPS, key.encode(), partition)
                case LinkAlias(contact_key=key, into=target):
                    batch.put(LINKS, _ALIAS + key.encode(), partition, target.encode())
                case DeleteAlias(contact_key=key):
                    batch.delete(LINKS, _ALIAS + key.encode(), partition)
                case Suppress(contact_key=key, at=at):
                    self._unmarked.pop(key, None)
                    marker = forgotten_marker(self.erasure_key, key)
                    batch.put(LINKS, marker, partition, at.isoformat().encode())
                case UpdateMembers(contact_key=key, was=was, now=now):
                    batch.after_store(partial(self.index.update, key, partition, was, now))
                case Log(level=level, event=line, fields=fields):
                    getattr(log, level)(line, **fields)
                case LimitReached(origin=origin, reasons=reasons):
                    self.left_out += len(reasons)
                    log.warning(
                        "segmenter.profile_limit_reached",
                        origin=origin,
                        left_out=list(reasons),
                        left_out_total=self.left_out,
                    )
                case _:
                    assert_never(command)

    def _profile_wire(self, profile: Profile) -> bytes:
        """The profile's bytes, encoded once in a batch for its contact events and the profiles
        topic."""
        known = self._wires.get(id(profile))
        if known is not None and known[0] is profile:
            return known[1]
        wire = profile.to_wire()
        self._wires[id(profile)] = (profile, wire)
        return wire

    async def _audience(self, record: Record) -> None:
        """Announce `Audience Selected` to this partition's members of the requested segments
        (in acknowledged rounds: an audience can be far larger than a batch)."""
        request = AudienceRequest.model_validate_json(record.value)
        partition = record.partition
        members = self.index.members(partition, request.segments)
        now = self.clock.now()
        for start in range(0, len(members), AUDIENCE_ROUND):
            records: Records = []
            for key in members[start : start + AUDIENCE_ROUND]:
                row = self._load(key)
                if row is None:
                    continue
                selected = announce(
                    row.profile,
                    AUDIENCE_SELECTED,
                    {
                        "journey_id": request.journey_id,
                        "run_id": request.run_id,
                        "segments": list(request.segments),
                    },
                    stable_id(request.run_id, key),
                    now,
                    now,
                )
                records.append(_contact_event(row.profile, selected))
            await self.producer.send_all(records)
        log.info(
            "segmenter.audience_selected",
            journey_id=request.journey_id,
            run_id=request.run_id,
            partition=partition,
            members=len(members),
        )

    # --- the batch's view of the tables ----------------------------------------------------

    def _load(self, key: str) -> ContactRow | None:
        raw_key = key.encode()

        def stored() -> ContactRow | None:
            raw = self.contacts.get(raw_key)
            return self.decoded.decode(raw_key, raw) if raw else None

        row: ContactRow | None = self._batch.get(CONTACTS, raw_key, stored)
        return row

    def _link(self, raw_key: bytes) -> bytes | None:
        def stored() -> bytes | None:
            # Most contacts have no link: the read misses, which RocksDB's bloom filter answers.
            return self.links.get(raw_key)

        value: bytes | None = self._batch.get(LINKS, raw_key, stored)
        return value

    def _forgotten(self, key: str) -> bool:
        unmarked = self._unmarked
        if key in unmarked:
            return False
        if self._link(forgotten_marker(self.erasure_key, key)) is not None:
            return True
        if self._link(legacy_forgotten_marker(key)) is not None:
            return True
        if len(unmarked) >= MARKERS_KEPT:
            del unmarked[next(iter(unmarked))]
        unmarked[key] = None
        return False

    def restored(self) -> None:
        """Partitions were assigned and their tables restored: markers another worker wrote
        may be here now."""
        self._unmarked.clear()


class _View:
    """One contact's rows as the batch sees them (`domain.decide.ContactView`), each read only
    when the decision asks (an object event reads none, a forwarded event no row)."""

    def __init__(self, contacts: Contacts, key: str) -> None:
        self._contacts = contacts
        self._key = key

    def row(self) -> ContactRow | None:
        return self._contacts._load(self._key)

    def merged_into(self) -> str | None:
        target = self._contacts._link(_ALIAS + self._key.encode())
        return None if target is None else target.decode()

    def forgotten(self) -> bool:
        return self._contacts._forgotten(self._key)


class Segmenter:
    """Wires `Contacts` to its stream worker: tables `contacts`, `memberships` and `links`, one
    processor taking batches, and the jobs that publish counts and start backfills."""

    def __init__(
        self,
        worker: StreamWorker,
        settings: SegmenterSettings,
        clock: Clock,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        definitions: LiveDefinitions,
    ) -> None:
        self.worker = worker
        self.clock = clock
        self.producer = producer
        self.definitions = definitions
        self.index = MemberIndex()
        self._backfilled = ""
        self.memberships = worker.table(MEMBERSHIPS)
        # `alias:<anonymous key>` -> the known contact; `forgotten:<keyed digest>` -> when erased.
        tables = {
            CONTACTS: worker.table(CONTACTS, primary=True),
            MEMBERSHIPS: self.memberships,
            LINKS: worker.table(LINKS),
        }
        self.contacts = Contacts(
            tables,
            producer,
            dead_letters,
            definitions,
            clock,
            self.index,
            settings.profile_limits(),
            erasure_key=settings.erasure_key(),
        )
        worker.consume([EVENTS.name, CONTACT_COMMANDS.name, AUDIENCE_REQUESTS.name], self._process)
        worker.on_assigned(self._recovered)
        worker.every(settings.count_interval_seconds, self._publish_counts)
        worker.every(settings.backfill_check_seconds, self._backfill)

    async def _process(self, records: list[Record]) -> None:
        await self.contacts.process(records, focus)

    # --- background work -------------------------------------------------------------------

    def _recovered(self, owned: frozenset[int]) -> None:
        """After every change of the assignment: recount from the memberships table, republish
        every count."""
        started = self.clock.now()
        self.contacts.restored()
        rows = self.index.rebuild(self.memberships.rows(), owned)
        self.index.announce(self.definitions.current().segment_ids, owned)
        self._backfilled = ""
        log.info(
            "segmenter.members_recounted",
            contacts=rows,
            partitions=sorted(owned),
            seconds=round((self.clock.now() - started).total_seconds(), 3),
        )

    async def _publish_counts(self) -> None:
        now = self.clock.now()
        counts = [
            SegmentCount(segment_id=segment, partition=partition, members=members, at=now)
            for segment, partition, members in self.index.take_dirty()
        ]
        try:
            await self.producer.send_all(
                (SEGMENT_COUNTS.name, f"{c.segment_id}/{c.partition}", c.to_wire()) for c in counts
            )
        except (DeliveryFailed, ProducerBusy) as exc:
            owned = self.worker.owned()  # a partition that moved meanwhile is the new owner's
            self.index.dirty.update(
                (c.segment_id, c.partition) for c in counts if c.partition in owned
            )
            log.warning("segmenter.counts_publish_failed", error=str(exc))

    async def _backfill(self) -> None:
        """A new or changed segment: re-evaluate every contact evaluated against older
        definitions, through the stream (a `reevaluate` command each), without stopping it."""
        defs = self.definitions.current()
        if defs.digest == self._backfilled:
            return
        self._backfilled = defs.digest
        self.index.announce(defs.segment_ids, self.worker.owned())
        now = self.clock.now()
        stale: Records = []
        sent = 0
        for raw_key, value in list(self.memberships.rows()):
            _partition, digest, _segments = read_membership(value)
            if digest == defs.digest:
                continue
            key = raw_key.decode()
            command = ContactCommand(
                command_id=stable_id(key, "backfill", defs.digest),
                contact_key=key,
                kind="reevaluate",
                reason="backfill",
                at=now,
            )
            stale.append((CONTACT_COMMANDS.name, key, command.to_wire()))
            if len(stale) >= AUDIENCE_ROUND:
                sent += await self._send_round(stale)
        sent += await self._send_round(stale)
        if sent:
            log.info("segmenter.backfill_requested", contacts=sent, definitions=defs.digest)

    async def _send_round(self, records: Records) -> int:
        count = len(records)
        try:
            await self.producer.send_all(records)
        except (DeliveryFailed, ProducerBusy) as exc:
            self._backfilled = ""  # try the whole backfill again at the next check
            log.warning("segmenter.backfill_publish_failed", error=str(exc))
        records.clear()
        return count


def _contact_event(profile: Profile, event: Event) -> tuple[str, str | None, bytes | None]:
    key = profile.contact_key
    return (
        CONTACT_EVENTS.name,
        key,
        ContactEvent(contact_key=key, event=event, profile=profile).to_wire(),
    )


# Every event asks whether its contact was erased: the markers of the contacts seen lately are
# kept rather than digested again (a contact's events come in runs).
MARKERS_KEPT = 65_536


@lru_cache(maxsize=MARKERS_KEPT)
def forgotten_marker(erasure_key: bytes, contact_key: str) -> bytes:
    """The `links` row that says the contact was erased: a keyed digest, so the row names
    nobody to whoever lacks the key (a plain hash of an e-mail address is found by hashing
    guesses)."""
    return _FORGOTTEN + keyed_digest(erasure_key, "forgotten", contact_key).hex().encode()


@lru_cache(maxsize=MARKERS_KEPT)
def legacy_forgotten_marker(contact_key: str) -> bytes:
    """The row versions before the keyed digest wrote (a plain SHA-256 of the key)."""
    return _FORGOTTEN + hashlib.sha256(contact_key.encode()).hexdigest().encode()
