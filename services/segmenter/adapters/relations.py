"""Object index shell: keeps who-did-what-to-which-object in a RocksDB table and fans object
events out to the related contacts as copies on the events topic.

Records on the object-relations topic are keyed by object, so one agent sees an object's
relations and fan-outs in order, and its table rows live on that record's partition (a table
change goes to the changelog partition of the record being handled).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from services.segmenter.domain.relations import (
    MAX_CONTACTS,
    RelationState,
    add_relation,
    cap,
    fan_out_copy,
    prune,
    related_contacts,
    without,
)
from shared.clock import Clock
from shared.contracts import Event, ObjectRelation
from shared.deadletter import DeadLetters
from shared.durations import parse_duration
from shared.ids import stable_id
from shared.kafka import AsyncProducer, Record
from shared.streams import StreamWorker, focus
from shared.topics import EVENTS, OBJECT_RELATIONS

log = structlog.get_logger(__name__)

# An object's entry is split into rows by a hash of the contact key, so a popular object costs
# a small row rewrite per relation and no row outgrows a Kafka message on the changelog
# (1 MB by default). Fixed once data exists: a different count would orphan the stored rows.
SHARDS = 128
FAN_OUT_BATCH = 1_000


class RelationIndex:
    """The `relations` table (object key and shard -> JSON entry) and the processor of the
    object-relations topic: `related` records are added to the entry, `unrelated` records take
    the contact out of it, `fan_out` records send one copy of the object event per related
    contact to the events topic, keyed by that contact.

    Copies go out in batches, each acknowledged by Kafka before the next. A crash mid-fan-out
    redelivers the record and re-sends the same copies with the same message ids, which the
    segmenter drops as duplicates. Copies never re-enter the index: `relation_records` and
    `fan_out_requests` ignore them.

    Memory: an entry keeps the contacts related within `keep()` (the longest `within` of the
    live triggers), pruned whenever a row is written, and at most `max_contacts` contacts,
    capped per row (`max_contacts / shards` each), dropping the oldest. Rows are only pruned
    when their object sees a relation or a fan-out, so an object nobody touches again keeps its
    last rows (small, and bounded by the cap) until something does.
    """

    def __init__(
        self,
        worker: StreamWorker,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        clock: Clock,
        keep: Callable[[], timedelta],
        *,
        max_contacts: int = MAX_CONTACTS,
        shards: int = SHARDS,
        batch: int = FAN_OUT_BATCH,
    ) -> None:
        self.producer = producer
        self.dead_letters = dead_letters
        self.clock = clock
        self.keep = keep
        self.shards = shards
        self.row_cap = max(1, -(-max_contacts // shards))
        self.batch = batch
        self.relations = worker.table("relations")
        worker.consume([OBJECT_RELATIONS.name], self.process)

    async def process(self, records: list[Record]) -> None:
        """Apply records one at a time, in order (a fan-out waits for its copies' acks)."""
        for record in records:
            focus(record.partition)
            await self.dead_letters.guard(
                record, lambda value=record.value: self.handle(_decode(value)), "relations"
            )

    async def handle(self, relation: ObjectRelation) -> None:
        """Apply one record; runs while the record is handled (its partition in focus)."""
        if relation.kind == "related" and relation.contact_key:
            self.relate(relation.object_key, relation.contact_key, relation.at)
        elif relation.kind == "unrelated" and relation.contact_key:
            self.unrelate(relation.object_key, relation.contact_key)
        elif relation.kind == "fan_out" and relation.event is not None and relation.within:
            await self.fan_out(
                relation.object_key, relation.event, relation.at, parse_duration(relation.within)
            )
        else:
            raise ValueError(f"incomplete {relation.kind} record")

    def relate(self, object_key: str, contact_key: str, at: datetime) -> None:
        row = self._row(object_key, self._shard(contact_key))
        updated = add_relation(self._load(row), contact_key, at)
        self._store(row, self._pruned(object_key, updated))

    def unrelate(self, object_key: str, contact_key: str) -> None:
        row = self._row(object_key, self._shard(contact_key))
        state = self._load(row)
        if state is not None and contact_key in state:
            self._store(row, without(state, contact_key))

    async def fan_out(
        self, object_key: str, origin: Event, at: datetime, within: timedelta
    ) -> None:
        # Read before pruning: an object event older than `keep` still reaches the contacts
        # related within its own window, if they are still stored.
        contacts: list[str] = []
        for shard in range(self.shards):
            row = self._row(object_key, shard)
            state = self._load(row)
            if state is None:
                continue
            contacts.extend(related_contacts(state, at, within))
            kept = self._pruned(object_key, state)
            if kept != state:
                self._store(row, kept)
        contacts.sort()
        for start in range(0, len(contacts), self.batch):
            await self.producer.send_all(
                (EVENTS.name, contact, fan_out_copy(origin, contact, object_key).to_wire())
                for contact in contacts[start : start + self.batch]
            )
        log.info(
            "relations.fanned_out",
            object_key=object_key,
            message_id=origin.message_id,
            contacts=len(contacts),
        )

    def _pruned(self, object_key: str, state: RelationState) -> RelationState | None:
        keep = self.keep()
        # No live trigger known (yet, e.g. while definitions load): forget nothing by age.
        fresh = (
            prune(state, self.clock.now(), keep, max_contacts=None)
            if keep > timedelta(0)
            else state
        )
        if not fresh:
            return None
        kept = cap(fresh, self.row_cap)
        if len(kept) < len(fresh):
            log.warning(
                "relations.capped",
                object_key=object_key,
                cap=self.row_cap * self.shards,
                row_cap=self.row_cap,
                dropped=len(fresh) - len(kept),
            )
        return kept

    def _shard(self, contact_key: str) -> int:
        return int(stable_id(contact_key, length=8), 16) % self.shards

    @staticmethod
    def _row(object_key: str, shard: int) -> bytes:
        return f"{object_key}\x00{shard}".encode()

    def _load(self, row: bytes) -> RelationState | None:
        raw = self.relations.get(row)
        if not raw:
            return None
        state: RelationState = json.loads(raw)
        return state

    def _store(self, row: bytes, state: RelationState | None) -> None:
        if state is not None:
            self.relations[row] = json.dumps(state, separators=(",", ":")).encode()
        elif self.relations.get(row) is not None:
            del self.relations[row]


def _decode(value: bytes) -> ObjectRelation:
    relation = ObjectRelation.model_validate_json(value)
    if relation.kind in ("related", "unrelated") and not relation.contact_key:
        raise ValueError(f"a {relation.kind} record needs contact_key")
    if relation.kind == "fan_out":
        if relation.event is None or relation.within is None:
            raise ValueError("a fan_out record needs event and within")
        parse_duration(relation.within)
    return relation
