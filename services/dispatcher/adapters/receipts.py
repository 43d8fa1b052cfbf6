"""Call receipts: what each provider call answered, written down the moment it answers.

A try's outcome reaches the ledger when the batch commits, so a worker killed in between leaves
the try `sending`: it may have arrived, and the new owner of the partition would conclude it
`unknown` (marketing) or send it again (transactional). A receipt closes most of that gap. As
soon as a call answers, its outcome goes to `waypost.send-receipts.v1`, outside the batch's
transaction (a fact about the provider, true whatever becomes of the batch), to the partition of
the request it answers. A worker that finds a try left `sending` by another reads that partition
from a little before the try was marked (`CallReceipts.find`) and concludes the try with its
receipt, when there is one. Only a call still on the wire, or answered in the last few
milliseconds before the kill, stays open (and a try whose mark was made durable as the worker
died, before its call went out).

The same topic carries each try's intent, written before its call (`CallReceipts.intend`):
the ledger entry as marked `sending`, acknowledged by the broker before the call goes out,
while the mark itself commits with the batch. A worker that takes a partition reads the
intents from where the last commit said (`CallReceipts.intents`) and puts every mark the
ledger lacks back in it (`Dispatcher`), so a try that went out is never taken for one that
did not.

Receipts hold message ids, try ids and the provider's answer, with the address replaced where
the answer quotes it (the dispatcher writes them so); intents hold the ledger entry as the
ledger writes it (no address, no content). The topic keeps both for a day
(`shared.topics.SEND_RECEIPTS`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from services.dispatcher.domain.outcomes import Outcome, Receipt
from shared.kafka import AsyncProducer
from shared.kafka_connection import KafkaConnection, client_config
from shared.topics import SEND_RECEIPTS

log = structlog.get_logger(__name__)

# How long before a try's mark its receipts are read from: the marking worker's clock may run
# ahead of the record timestamps its producer wrote.
LOOKBACK = timedelta(seconds=60)
# Receipts kept per partition between lookups (a few hundred bytes each); beyond this the next
# lookup reads again from its own start.
KEPT = 100_000
# How long a read of a partition may go without a record before it counts as an outage.
READ_TIMEOUT_SECONDS = 30.0
# A partition whose leader is moving, or not yet known to this client (a topic just made), is
# asked again after this pause, within the lookup's time.
PASSING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)
PASSING_PAUSE_SECONDS = 0.1

T = TypeVar("T")


def encode(message_id: str, try_id: str, outcome: Outcome, route: str | None = None) -> bytes:
    fields: dict[str, Any] = {"message_id": message_id, "try": try_id, "kind": outcome.kind}
    if route is not None:
        fields["route"] = route
    for name in ("reason", "provider_id", "code", "retry_after"):
        value = getattr(outcome, name)
        if value is not None:
            fields[name] = value
    for flag in ("address_invalid", "withdrew_consent"):
        if getattr(outcome, flag):
            fields[flag] = True
    return json.dumps(fields, separators=(",", ":")).encode()


def encode_intent(message_id: str, rev: int, entry: bytes) -> bytes:
    """An intent: the marked entry (`entry`, JSON as the ledger wrote it) at revision `rev`."""
    head = json.dumps({"intent": message_id, "rev": rev}, separators=(",", ":")).encode()
    return head[:-1] + b',"entry":' + entry + b"}"


def decode_intent(value: bytes) -> tuple[str, int, bytes] | None:
    """(message id, revision, entry as JSON) of an intent; None for a record that is not one
    (a receipt)."""
    try:
        fields = json.loads(value)
        if not isinstance(fields, dict) or "intent" not in fields:
            return None
        entry = json.dumps(fields["entry"], separators=(",", ":")).encode()
        return str(fields["intent"]), int(fields["rev"]), entry
    except (ValueError, KeyError, TypeError):
        return None


def decode(value: bytes) -> tuple[str, str, Receipt] | None:
    """(message id, try id, receipt) of a receipt; None for a value that is not one (skipped:
    a receipt only ever narrows what is unknown, so one that cannot be read loses nothing)."""
    try:
        fields = json.loads(value)
        outcome = Outcome(
            kind=fields["kind"],
            reason=fields.get("reason"),
            provider_id=fields.get("provider_id"),
            code=fields.get("code"),
            retry_after=fields.get("retry_after"),
            address_invalid=bool(fields.get("address_invalid")),
            withdrew_consent=bool(fields.get("withdrew_consent")),
        )
        route = fields.get("route")
        receipt = Receipt(outcome, route if isinstance(route, str) else None)
        return str(fields["message_id"]), str(fields["try"]), receipt
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class _Read:
    """What one partition's receipts were read: those written from `since_ms` (record time)
    on, that is the offsets from `first_offset` up to the one before `next_offset`, by message
    id: (try id, receipt) of its latest receipt."""

    since_ms: int
    first_offset: int
    next_offset: int
    receipts: dict[str, tuple[str, Receipt]] = field(default_factory=dict)
    # By route: the Message-ID and record time (ms) of the newest email receipt read that says
    # the server accepted it (`CallReceipts.accepted`).
    accepted: dict[str, tuple[str, int]] = field(default_factory=dict)


class CallReceipts:
    """Writes a receipt per answered call, and finds the receipt of a try another worker left
    `sending`."""

    def __init__(
        self,
        kafka: KafkaConnection | str,
        producer: AsyncProducer,
        topic: str = SEND_RECEIPTS.name,
    ) -> None:
        self._kafka = kafka
        self._producer = producer
        self._topic = topic
        self._reads: dict[int, _Read] = {}
        self._reading = asyncio.Lock()  # one lookup reads at a time, with one consumer
        self._consumer: Consumer | None = None
        self._consumer_lock = threading.Lock()

    def record(
        self,
        partition: int,
        message_id: str,
        try_id: str,
        outcome: Outcome,
        route: str | None = None,
    ) -> None:
        """Write the receipt of an answered call (with the email `route` it went by); nothing
        waits for it. One that cannot be written is logged and lost: the try's outcome still
        commits with the batch."""
        if outcome.kind == "unknown":
            return  # says nothing the ledger's `sending` does not
        try:
            written = self._producer.produce(
                self._topic, message_id, encode(message_id, try_id, outcome, route), partition
            )
        except Exception as exc:  # noqa: BLE001 - a full queue, a refusal: it goes unwritten
            log.warning("dispatcher.receipt_unwritten", message_id=message_id, error=str(exc))
            return
        written.add_done_callback(_log_if_unwritten(message_id))

    async def intend(self, partition: int, message_id: str, rev: int, entry: bytes) -> int:
        """Write a try's intent (its entry as marked `sending`, at revision `rev`) to
        `partition` and wait for the broker's acknowledgement; the intent's offset. A failure
        raises: the try must not be called."""
        value = encode_intent(message_id, rev, entry)
        reached = await self._producer.send_to_partitions(
            [(self._topic, partition, message_id.encode(), value)]
        )
        return reached[(self._topic, partition)]

    async def intents(
        self, partition: int, start: int | None
    ) -> tuple[dict[str, tuple[int, bytes]], int]:
        """The intents of `partition` from offset `start` (None: its oldest record) to its
        end now, by message id (the latest: revision and entry), and the end read to. A read
        that fails raises (`KafkaException`, `TimeoutError`): an outage, retried by the
        caller."""
        async with self._reading:
            return await asyncio.to_thread(self._read_intents, partition, start)

    async def find(
        self, partition: int, message_id: str, try_id: str, marked_at: datetime
    ) -> Receipt | None:
        """The receipt of try `try_id` of `message_id` (marked `sending` at `marked_at`) in
        `partition`, read to its end now; None when it has none. A read that
        fails raises (`KafkaException`, `TimeoutError`): an outage, retried by the caller."""
        since_ms = int((marked_at - LOOKBACK).timestamp() * 1000)
        async with self._reading:
            kept = self._reads.get(partition)
            if kept is not None and len(kept.receipts) > KEPT:
                kept = None
            read = await asyncio.to_thread(self._read, partition, since_ms, kept)
            self._reads[partition] = read
        found = read.receipts.get(message_id)
        if found is None or found[0] != try_id:
            return None
        return found[1]

    def accepted(self, partition: int, route: str) -> tuple[str, datetime] | None:
        """The Message-ID of the newest email receipt of `route` that says the server accepted
        it, among those `find` read of `partition`, with when it was written (after the
        server's answer); None when there is none."""
        read = self._reads.get(partition)
        found = None if read is None else read.accepted.get(route)
        if found is None:
            return None
        provider_id, ms = found
        return provider_id, datetime.fromtimestamp(ms / 1000, UTC)

    def forget(self, partitions: frozenset[int]) -> None:
        """Drop what was read of partitions no longer owned (read afresh should they return)."""
        for partition in list(self._reads):
            if partition not in partitions:
                del self._reads[partition]

    def close(self) -> None:
        with self._consumer_lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None

    # --- in a thread ---------------------------------------------------------------------------

    def _read(self, partition: int, since_ms: int, kept: _Read | None) -> _Read:
        """`kept` read on to the partition's end, and back to `since_ms` when it started
        later (a try marked before the others asked about); a new read when None."""
        with self._consumer_lock:
            consumer = self._open()
            deadline = time.monotonic() + READ_TIMEOUT_SECONDS
            low, high = self._watermarks(consumer, partition, deadline)
            if kept is not None and kept.next_offset < low:
                kept = None  # read so long ago that the retention took what came next
            if kept is None or since_ms < kept.since_ms:
                at = _again_while_passing(
                    lambda: _offset_at(consumer, self._topic, partition, since_ms), deadline
                )
                # No record at or after that time: none to read up to the end seen now.
                start = at if at >= 0 else high
                if kept is None:
                    kept = self._reads[partition] = _Read(since_ms, start, start)
                elif start < kept.first_offset:
                    # Older receipts never replace a newer one of the same message.
                    older: dict[str, tuple[str, Receipt]] = {}
                    self._read_to(
                        consumer, partition, start, kept.first_offset, older, kept.accepted
                    )
                    for message_id, receipt in older.items():
                        kept.receipts.setdefault(message_id, receipt)
                    kept.first_offset = start
                kept.since_ms = since_ms
            if kept.next_offset < high:
                self._read_to(
                    consumer,
                    partition,
                    kept.next_offset,
                    high,
                    kept.receipts,
                    kept.accepted,
                    kept,
                )
            return kept

    def _read_intents(
        self, partition: int, start: int | None
    ) -> tuple[dict[str, tuple[int, bytes]], int]:
        found: dict[str, tuple[int, bytes]] = {}
        with self._consumer_lock:
            consumer = self._open()
            low, high = self._watermarks(
                consumer, partition, time.monotonic() + READ_TIMEOUT_SECONDS
            )
            if start is not None and start < low:
                # Left unread for longer than the topic keeps records (`SEND_RECEIPTS`): the
                # intents of tries whose marks never committed may be gone with them.
                log.error(
                    "dispatcher.intents_expired",
                    partition=partition,
                    start=start,
                    oldest=low,
                )
            offset = low if start is None else max(start, low)
            for _at, value, _ms in self._values(consumer, partition, offset, high):
                intent = decode_intent(value)
                if intent is not None:
                    message_id, rev, entry = intent
                    found[message_id] = (rev, entry)
        return found, high

    def _watermarks(self, consumer: Consumer, partition: int, deadline: float) -> tuple[int, int]:
        """The partition's oldest offset kept and its end, asked again while its leader is
        passing (up to `deadline`, monotonic seconds)."""
        where = TopicPartition(self._topic, partition)
        low, high = _again_while_passing(
            lambda: consumer.get_watermark_offsets(where, timeout=READ_TIMEOUT_SECONDS), deadline
        )
        return int(low), int(high)

    def _open(self) -> Consumer:
        """The lookups' consumer (under `_consumer_lock`)."""
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **client_config(self._kafka),
                    "group.id": "waypost-dispatcher-receipts",  # never joined or committed
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    # An offset gone with the retention: from the oldest one kept.
                    "auto.offset.reset": "earliest",
                }
            )
        return self._consumer

    def _read_to(
        self,
        consumer: Consumer,
        partition: int,
        offset: int,
        end: int,
        into: dict[str, tuple[str, Receipt]],
        accepted: dict[str, tuple[str, int]],
        progress: _Read | None = None,
    ) -> None:
        """Read the partition from `offset` up to `end` (or its end, should it come first)
        into `into`, later receipts over earlier ones, and into `accepted` each route's newest
        accepted email by record time; the offset after the last one read is kept in
        `progress` as it goes (a read that fails midway resumes there)."""
        for at, value, ms in self._values(consumer, partition, offset, end):
            if progress is not None:
                progress.next_offset = at + 1
            receipt = decode(value)
            if receipt is not None:
                message_id, try_id, found = receipt
                into[message_id] = (try_id, found)
                outcome = found.outcome
                if found.route and outcome.kind == "sent" and outcome.provider_id:
                    newest = accepted.get(found.route)
                    if newest is None or newest[1] <= ms:
                        accepted[found.route] = (outcome.provider_id, ms)

    def _values(
        self, consumer: Consumer, partition: int, offset: int, end: int
    ) -> Iterator[tuple[int, bytes, int]]:
        """(offset, value, record time in ms) of the partition's records from `offset` up to
        `end` (or its end, should it come first). A read that makes no progress for
        `READ_TIMEOUT_SECONDS` raises `TimeoutError`."""
        consumer.assign([TopicPartition(self._topic, partition, offset)])
        deadline = time.monotonic() + READ_TIMEOUT_SECONDS
        try:
            while offset < end:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self._topic} [{partition}] not read to {end} within "
                        f"{READ_TIMEOUT_SECONDS:g} s (at {offset})"
                    )
                for message in consumer.consume(1000, timeout=1.0):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return  # the end came first (records gone)
                        raise KafkaException(error)
                    at = int(message.offset() or 0)
                    if at >= end:
                        return
                    offset = at + 1
                    deadline = time.monotonic() + READ_TIMEOUT_SECONDS
                    value = message.value()
                    if value is not None:
                        yield at, value, int(message.timestamp()[1])
        finally:
            consumer.unassign()


def _offset_at(consumer: Consumer, topic: str, partition: int, since_ms: int) -> int:
    """The first offset of the partition at or after `since_ms` (record time), -1 when none."""
    at = consumer.offsets_for_times(
        [TopicPartition(topic, partition, since_ms)], timeout=READ_TIMEOUT_SECONDS
    )[0]
    if at.error is not None:
        raise KafkaException(at.error)
    return int(at.offset)


def _again_while_passing(call: Callable[[], T], deadline: float) -> T:
    """`call`, asked again while the broker answers with a passing error (`PASSING`) and
    `deadline` (monotonic seconds) is not past; any other error is raised at once."""
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            passing = isinstance(error, KafkaError) and error.code() in PASSING
            if not passing or time.monotonic() > deadline:
                raise
        time.sleep(PASSING_PAUSE_SECONDS)


def _log_if_unwritten(message_id: str) -> Callable[[asyncio.Future[None]], None]:
    def done(written: asyncio.Future[None]) -> None:
        if written.cancelled():
            return
        error = written.exception()
        if error is not None:
            log.warning("dispatcher.receipt_unwritten", message_id=message_id, error=str(error))

    return done
