"""Segmenter shell: the single writer of every contact's profile, aggregates and memberships.

One agent reads events, contact commands and audience requests, so one contact's changes apply
in order. For each it loads the contact's row, lets `domain.contact` decide, publishes what
changed (contact events, the profile, a segment timer request, relation records), and only then
stores the row: a crash repeats work, which the de-duplication by message id absorbs, and never
loses it.

Re-keying: an event that carries a userId and an anonymousId (or an `alias` call) links them.
The known contact asks the anonymous one to merge (`merge_into`, through Kafka to the anonymous
key's partition); that partition hands its whole row over (`absorb`) and leaves a link, so later
anonymous events are forwarded to the known contact. Each contact still lives on one partition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable

import faust
import structlog
from faust.types import TableT

from services.segmenter.adapters.definitions import LiveDefinitions
from services.segmenter.adapters.members import MemberIndex, membership_row, read_membership
from services.segmenter.domain import contact
from services.segmenter.domain.contact import ContactRow, Outcome
from services.segmenter.domain.relations import (
    fan_out_requests,
    is_fan_out_copy,
    relation_records,
)
from services.segmenter.settings import SegmenterSettings
from shared.clock import Clock
from shared.contracts import (
    AudienceRequest,
    ContactCommand,
    ContactEvent,
    Event,
    Profile,
    SegmentCount,
    SegmentTimerRequest,
)
from shared.deadletter import DeadLetters
from shared.faust_app import record_of
from shared.ids import stable_id
from shared.journeys import AUDIENCE_SELECTED
from shared.kafka import AsyncProducer, DeliveryFailed, ProducerBusy, Record
from shared.profiles import CONTACT_FORGOTTEN, announce
from shared.system_events import forged
from shared.topics import (
    AUDIENCE_REQUESTS,
    CONTACT_COMMANDS,
    CONTACT_EVENTS,
    EVENTS,
    OBJECT_RELATIONS,
    PROFILES,
    SEGMENT_COUNTS,
    SEGMENT_TIMERS,
)

log = structlog.get_logger(__name__)

Records = list[tuple[str, str | None, bytes | None]]
# Audience members are announced in rounds of this many, each acknowledged before the next.
AUDIENCE_ROUND = 1000
_ALIAS = b"alias:"
_FORGOTTEN = b"forgotten:"


class Segmenter:
    """Wires `domain.contact` to Faust: tables `contacts`, `memberships` and `links`."""

    def __init__(
        self,
        app: faust.App,
        settings: SegmenterSettings,
        clock: Clock,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        definitions: LiveDefinitions,
    ) -> None:
        self.app = app
        self.clock = clock
        self.producer = producer
        self.dead_letters = dead_letters
        self.definitions = definitions
        self.partitions = settings.topic_partitions
        self.index = MemberIndex()
        self._ready = False
        self._backfilled = ""

        def table(
            name: str, on_recover: Callable[[], Awaitable[None]] | None = None
        ) -> TableT[bytes, bytes]:
            return app.Table(
                name,
                partitions=settings.topic_partitions,
                key_type=bytes,
                value_type=bytes,
                on_recover=on_recover,
            )

        self.contacts = table("contacts")
        self.memberships = table("memberships", self._recovered)
        # `alias:<anonymous key>` -> the known contact; `forgotten:<sha256>` -> when erased.
        self.links = table("links")
        source = app.topic(
            EVENTS.name,
            CONTACT_COMMANDS.name,
            AUDIENCE_REQUESTS.name,
            key_serializer="raw",
            value_serializer="raw",
        )
        app.agent(source, name="contacts")(self._process)
        app.timer(interval=settings.count_interval_seconds)(self._publish_counts)
        app.timer(interval=settings.backfill_check_seconds)(self._backfill)

    # --- the agent -------------------------------------------------------------------------

    async def _process(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            record = record_of(event)
            await self.dead_letters.guard(
                record, lambda record=record: self.take(record), "segmenter"
            )

    async def take(self, record: Record) -> None:
        """Decode one record of the agent's topics and apply it."""
        if record.topic == CONTACT_COMMANDS.name:
            await self.handle_command(
                ContactCommand.model_validate_json(record.value), record.partition
            )
        elif record.topic == AUDIENCE_REQUESTS.name:
            await self.handle_audience(
                AudienceRequest.model_validate_json(record.value), record.partition
            )
        else:
            incoming = Event.model_validate_json(record.value)
            incoming.contact_key  # noqa: B018 - raises when the event has no contact key
            if forged(incoming):
                raise ValueError(
                    f"event: '{incoming.event}' from source '{incoming.source}' is an event "
                    "only Waypost emits"
                )
            await self.handle(incoming, record.partition)

    async def handle(self, event: Event, partition: int) -> None:
        defs = self.definitions.current()
        now = self.clock.now()
        copy = is_fan_out_copy(event)
        if not copy:
            requests = fan_out_requests(event, defs.object_triggers, now)
            if requests:
                # An event about an object reaches the related contacts, not its poster.
                await self.producer.send_all(
                    (OBJECT_RELATIONS.name, r.object_key, r.to_wire()) for r in requests
                )
                return
        key = event.contact_key
        if self._forgotten(key):
            log.info("segmenter.suppressed_event", message_id=event.message_id)
            return
        target = self.links.get(_ALIAS + key.encode())
        if target is not None and (not event.user_id or (copy and event.user_id == key)):
            # A merged anonymous contact: its events belong to the known contact now.
            forwarded = event.model_copy(update={"user_id": target.decode()})
            await self.producer.send(EVENTS.name, target.decode(), forwarded.to_wire())
            return
        row = self._load(key)
        if copy and row is not None and row.profile.user_id is None:
            event = event.model_copy(update={"user_id": None, "anonymous_id": key})
        outcome = contact.apply(row, event, defs, now)
        if outcome.duplicate:
            log.debug("segmenter.duplicate", message_id=event.message_id)
            return
        extra: Records = []
        if not copy:
            extra.extend(
                (OBJECT_RELATIONS.name, r.object_key, r.to_wire())
                for r in relation_records(event, key, defs.object_triggers, now)
            )
        if outcome.linked is not None:
            merge = ContactCommand(
                command_id=stable_id(event.message_id, "merge", outcome.linked),
                contact_key=outcome.linked,
                kind="merge_into",
                other_key=key,
                reason="identified",
                at=now,
            )
            extra.append((CONTACT_COMMANDS.name, outcome.linked, merge.to_wire()))
        await self._commit(key, partition, row, outcome, extra)

    async def handle_command(self, command: ContactCommand, partition: int) -> None:
        defs = self.definitions.current()
        now = self.clock.now()
        key = command.contact_key
        if self._forgotten(key) and command.kind != "forget":
            return
        if command.kind == "forget":
            await self._forget(key, command, partition)
            return
        if command.kind == "merge_into":
            await self._hand_over(key, command, partition)
            return
        row = self._load(key)
        if command.kind == "absorb":
            if command.state is None or command.other_key is None:
                raise ValueError("absorb needs `state` and `other_key`")
            other = ContactRow.model_validate(command.state)
            outcome = contact.absorb(row, key, other, defs, now, command.command_id)
        elif command.kind == "reevaluate":
            if row is None:
                return
            outcome = contact.reevaluate(row, command.command_id, defs, now)
        else:
            outcome = contact.command(row, command, defs, now)
        if outcome.row is row:
            return
        await self._commit(key, partition, row, outcome, [])

    async def handle_audience(self, request: AudienceRequest, partition: int) -> None:
        """Announce `Audience Selected` to this partition's members of the requested segments."""
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

    # --- writing ---------------------------------------------------------------------------

    async def _commit(
        self,
        key: str,
        partition: int,
        before: ContactRow | None,
        outcome: Outcome,
        extra: Records,
    ) -> None:
        """Publish the outcome, then store the rows (a crash in between repeats, never loses)."""
        row = outcome.row
        assert row is not None
        records: Records = [_contact_event(row.profile, e) for e in outcome.events]
        records.append((PROFILES.name, key, row.profile.to_wire()))
        if outcome.retime:
            request = SegmentTimerRequest(
                contact_key=key, due_at=row.next_tick, requested_at=self.clock.now()
            )
            records.append((SEGMENT_TIMERS.name, key, request.to_wire()))
        records.extend(extra)
        await self.producer.send_all(records)
        self.contacts[key.encode()] = row.model_dump_json().encode()
        self._store_membership(
            key, partition, before.profile.segments if before else (), row, outcome
        )

    def _store_membership(
        self,
        key: str,
        partition: int,
        before: Iterable[str],
        row: ContactRow,
        outcome: Outcome,
    ) -> None:
        value = membership_row(partition, row.evaluated, row.profile.segments)
        if self.memberships.get(key.encode()) != value:
            self.memberships[key.encode()] = value
        self.index.update(key, partition, before, row.profile.segments)

    async def _forget(self, key: str, command: ContactCommand, partition: int) -> None:
        """Erase every row kept for the contact; keep only a hashed suppression record."""
        row = self._load(key)
        now = self.clock.now()
        profile = (
            row.profile
            if row is not None
            else Profile(contact_key=key, first_seen=now, last_seen=now, updated_at=now)
        )
        forgotten = announce(
            profile, CONTACT_FORGOTTEN, {}, stable_id(command.command_id, "forgotten"), now, now
        )
        records: Records = [
            (
                CONTACT_EVENTS.name,
                key,
                ContactEvent(
                    contact_key=key,
                    event=forgotten,
                    profile=Profile(contact_key=key, first_seen=now, last_seen=now, updated_at=now),
                ).to_wire(),
            ),
            (PROFILES.name, key, None),
        ]
        if row is not None and row.next_tick is not None:
            cancel = SegmentTimerRequest(contact_key=key, due_at=None, requested_at=now)
            records.append((SEGMENT_TIMERS.name, key, cancel.to_wire()))
        # Anonymous histories merged into the contact are erased on their own partitions too.
        for other in profile.anonymous_ids:
            again = command.model_copy(
                update={"command_id": stable_id(command.command_id, other), "contact_key": other}
            )
            records.append((CONTACT_COMMANDS.name, other, again.to_wire()))
        await self.producer.send_all(records)
        raw_key = key.encode()
        self.links[_FORGOTTEN + _digest(key)] = now.isoformat().encode()
        for table in (self.contacts, self.memberships):
            if raw_key in table:
                del table[raw_key]
        if _ALIAS + raw_key in self.links:
            del self.links[_ALIAS + raw_key]
        self.index.update(key, partition, profile.segments, ())
        log.info("segmenter.contact_forgotten", reason=command.reason)

    async def _hand_over(self, key: str, command: ContactCommand, partition: int) -> None:
        """This anonymous contact merges into `other_key`: hand the row over, leave a link."""
        target = command.other_key
        if not target or target == key:
            raise ValueError("merge_into needs another contact in `other_key`")
        existing = self.links.get(_ALIAS + key.encode())
        if existing is not None:
            if existing.decode() != target:
                log.warning("segmenter.already_merged", into=existing.decode(), asked=target)
            return
        row = self._load(key)
        now = self.clock.now()
        records: Records = []
        if row is not None:
            absorb = ContactCommand(
                command_id=stable_id(command.command_id, "absorb"),
                contact_key=target,
                kind="absorb",
                other_key=key,
                state=row.model_dump(mode="json"),
                reason=command.reason,
                at=now,
            )
            records.append((CONTACT_COMMANDS.name, target, absorb.to_wire()))
            records.append((PROFILES.name, key, None))
            if row.next_tick is not None:
                cancel = SegmentTimerRequest(contact_key=key, due_at=None, requested_at=now)
                records.append((SEGMENT_TIMERS.name, key, cancel.to_wire()))
        await self.producer.send_all(records)
        self.links[_ALIAS + key.encode()] = target.encode()
        if row is not None:
            del self.contacts[key.encode()]
            if key.encode() in self.memberships:
                del self.memberships[key.encode()]
            self.index.update(key, partition, row.profile.segments, ())
        log.info("segmenter.merged", into=target, had_history=row is not None)

    def _load(self, key: str) -> ContactRow | None:
        raw = self.contacts.get(key.encode())
        return ContactRow.model_validate_json(raw) if raw else None

    def _forgotten(self, key: str) -> bool:
        return self.links.get(_FORGOTTEN + _digest(key)) is not None

    # --- background work -------------------------------------------------------------------

    async def _recovered(self) -> None:
        """After every recovery: recount from the memberships table, republish every count."""
        started = self.clock.now()
        owned = self._owned_partitions()
        rows = self.index.rebuild(self.memberships.items(), owned)
        self.index.announce(self.definitions.current().segment_ids, owned)
        self._ready = True
        self._backfilled = ""
        log.info(
            "segmenter.members_recounted",
            contacts=rows,
            partitions=sorted(owned),
            seconds=round((self.clock.now() - started).total_seconds(), 3),
        )

    def _owned_partitions(self) -> set[int]:
        assignment = self.app.consumer.assignment()
        return {tp.partition for tp in assignment if tp.topic == EVENTS.name}

    async def _publish_counts(self) -> None:
        if not self._ready:
            return
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
            self.index.dirty.update((c.segment_id, c.partition) for c in counts)
            log.warning("segmenter.counts_publish_failed", error=str(exc))

    async def _backfill(self) -> None:
        """A new or changed segment: re-evaluate every contact evaluated against older
        definitions, through the stream (a `reevaluate` command each), without stopping it."""
        defs = self.definitions.current()
        if not self._ready or defs.digest == self._backfilled:
            return
        self._backfilled = defs.digest
        self.index.announce(defs.segment_ids, self._owned_partitions())
        now = self.clock.now()
        stale: Records = []
        sent = 0
        for raw_key, value in list(self.memberships.items()):
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


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).hexdigest().encode()
