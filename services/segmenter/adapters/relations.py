"""Object index shell: keeps who-did-what-to-which-object in a RocksDB table and fans object
events out to the related contacts as copies on the events topic.

Records on the object-relations topic are keyed by object, so one agent sees an object's
relations and fan-outs in order, and its table rows live on that record's partition (a table
change goes to the changelog partition of the record being handled).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec
import structlog

from services.segmenter.domain.relations import (
    MAX_CONTACTS,
    RelationState,
    add_relation,
    cap,
    fan_out_copy,
    has_expired,
    prune,
    prune_request,
    related_contacts,
    without,
)
from shared.clock import Clock
from shared.contracts import Event, ObjectRelation
from shared.deadletter import DeadLetters
from shared.decoded import DecodedRows
from shared.durations import parse_duration
from shared.ids import stable_id
from shared.kafka import AsyncProducer, DeliveryFailed, ProducerBusy, Record
from shared.streams import StreamWorker, focus
from shared.topics import EVENTS, OBJECT_RELATIONS

log = structlog.get_logger(__name__)

# An object's entry is split into rows by a hash of the contact key, so a popular object costs
# a small row rewrite per relation and no row outgrows a Kafka message on the changelog
# (1 MB by default). Fixed once data exists: a different count would orphan the stored rows.
SHARDS = 128
FAN_OUT_BATCH = 1_000
# The sweep reads this many rows at a time (a row of a popular object holds thousands of
# contacts), and looks this often whether it is due.
SWEEP_SLICE = 100
SWEEP_LOOK_SECONDS = 60.0
# Rows kept decoded beside their stored bytes: a relation rewrites its row, and the next
# relation to the same row (a popular object's) skips the parse. Only rows of up to
# `DECODED_ROW_BYTES` (about 400 contacts with keys of 20-odd characters, some 60 KB decoded)
# are kept, so the cache stays under about 160 MB however popular the objects (a row holds up
# to `max_contacts / shards` contacts).
DECODED_ROWS = 2_048
DECODED_ROW_BYTES = 16_384
# A row is JSON: contact key -> epoch milliseconds. msgspec reads and writes it in a fraction of
# the json module's time (about 8 and 4 µs against 19 and 29 for a row of 100 contacts); rows
# the json module wrote read the same.
_ROW = msgspec.json.Decoder(dict[str, int])
_ENCODE = msgspec.json.Encoder().encode


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
    capped per row (`max_contacts / shards` each), dropping the oldest. An object nobody touches
    again is pruned by the sweep: at the start, after every change of the assignment and every
    `sweep_seconds`, the owned partitions' rows are read in slices, and each object holding a
    relation older than `keep()` gets a `prune` record on its own key, which this processor
    handles like any record (so the pruning reaches the changelog in order with the object's
    other records, and a relation recorded meanwhile is kept). With no live trigger (`keep()`
    is zero) nothing is pruned by age, by the sweep or a write.
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
        sweep_seconds: float | None = None,
    ) -> None:
        self.worker = worker
        self.producer = producer
        self.dead_letters = dead_letters
        self.clock = clock
        self.keep = keep
        self.shards = shards
        self.row_cap = max(1, -(-max_contacts // shards))
        self.batch = batch
        self.relations = worker.table("relations")
        self.decoded = DecodedRows(_ROW.decode, DECODED_ROWS)
        worker.consume([OBJECT_RELATIONS.name], self.process)
        self.sweep_every = None if sweep_seconds is None else timedelta(seconds=sweep_seconds)
        # When the next sweep is due (None: at the next look, after a start or a rebalance).
        self._next_sweep: datetime | None = None
        if sweep_seconds is not None:
            worker.on_assigned(self._swept_soon)
            worker.every(min(SWEEP_LOOK_SECONDS, sweep_seconds), self.sweep_if_due)

    async def process(self, records: list[Record]) -> None:
        """Apply records one at a time, in order (a fan-out waits for its copies' acks)."""
        for record in records:
            focus(record.partition)
            await self.dead_letters.guard(
                record, functools.partial(self._handle_value, record.value), "relations"
            )

    async def _handle_value(self, value: bytes) -> None:
        await self.handle(_decode(value))

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
        elif relation.kind == "prune":
            self.prune(relation.object_key)
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

    def prune(self, object_key: str) -> None:
        """Prune every row of the object as a write would (asked by the sweep)."""
        for shard in range(self.shards):
            row = self._row(object_key, shard)
            state = self._load(row)
            if state is None:
                continue
            kept = self._pruned(object_key, state)
            if kept != state:
                self._store(row, kept)

    # --- the sweep -----------------------------------------------------------------------------

    def _swept_soon(self, _owned: frozenset[int]) -> None:
        self._next_sweep = None

    async def sweep_if_due(self) -> None:
        now = self.clock.now()
        if self.sweep_every is None or (self._next_sweep is not None and now < self._next_sweep):
            return
        self._next_sweep = now + self.sweep_every
        try:
            await self.sweep()
        except (DeliveryFailed, ProducerBusy) as exc:
            self._next_sweep = None  # the whole sweep again at the next look
            log.warning("relations.sweep_publish_failed", error=str(exc))

    async def sweep(self) -> int:
        """Ask for a `prune` of every object of the owned partitions that holds a relation older
        than `keep()`; the number of objects asked for. Reads a slice of rows at a time and lets
        the worker's batches run in between."""
        keep = self.keep()
        if keep <= timedelta(0):
            return 0  # no live trigger (or definitions not read yet): nothing ages out
        now = self.clock.now()
        rows = 0
        pending: list[str] = []
        last: str | None = None
        sent = 0
        for partition in sorted(self.worker.owned()):
            start: bytes | None = None
            while found := self.relations.rows_from(partition, start, SWEEP_SLICE):
                rows += len(found)
                for key, value in found:
                    object_key = key.rpartition(b"\x00")[0].decode()
                    if object_key == last:
                        continue  # an object's rows sit next to each other: asked for once
                    if has_expired(_ROW.decode(value), now, keep):
                        pending.append(object_key)
                        last = object_key
                if len(pending) >= self.batch:
                    sent += await self._ask_prune(pending, now)
                    pending = []
                start = found[-1][0] + b"\x00"  # the first key after the last one read
                await asyncio.sleep(0)
        sent += await self._ask_prune(pending, now)
        log.info(
            "relations.swept",
            rows=rows,
            objects_to_prune=sent,
            keep_seconds=keep.total_seconds(),
            seconds=round((self.clock.now() - now).total_seconds(), 3),
        )
        return sent

    async def _ask_prune(self, objects: list[str], now: datetime) -> int:
        if objects:
            await self.producer.send_all(
                (OBJECT_RELATIONS.name, key, prune_request(key, now).to_wire()) for key in objects
            )
        return len(objects)

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
        if len(raw) > DECODED_ROW_BYTES:
            return _ROW.decode(raw)
        # Shared with the cache: the domain's functions return new entries, never change one.
        return self.decoded.decode(row, raw)

    def _store(self, row: bytes, state: RelationState | None) -> None:
        if state is not None:
            raw = _ENCODE(state)
            self.relations[row] = raw
            if len(raw) > DECODED_ROW_BYTES:
                self.decoded.forget(row)
            else:
                self.decoded.remember(row, raw, state)
        else:
            self.decoded.forget(row)
            if self.relations.get(row) is not None:
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
