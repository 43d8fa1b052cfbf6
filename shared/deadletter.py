"""Poison records go to the dead-letter topic with the reason; outages are waited out.

A record that can never be processed (undecodable, refused by a rule, a bug it alone triggers)
is written to `waypost.dead-letter.v1` and the stream moves on. An outage (a broker or document
store that is down, a producer timeout, a missing topic) is not the record's fault: the work is
retried with backoff for as long as it lasts, the consumer waits on that record, and its offset
is never committed past it. The dead-letter write itself is retried the same way.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from pydantic import ValidationError
from pymongo.errors import (
    ConnectionFailure,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WTimeoutError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from shared.clock import Clock
from shared.contracts import DeadLetter
from shared.kafka import AsyncProducer, DeliveryFailed, ProducerBusy, Record, TopicMismatch
from shared.kafka_connection import KafkaConnection, client_config
from shared.topics import DEAD_LETTER

T = TypeVar("T")

log = structlog.get_logger(__name__)

# Longest pause between two tries during an outage.
OUTAGE_BACKOFF_MAX_SECONDS = 10.0


def is_outage(exc: BaseException) -> bool:
    """Whether a failure belongs to the infrastructure (retry) rather than to the record."""
    if isinstance(exc, DeliveryFailed):
        return not exc.refused
    if isinstance(exc, ProducerBusy | KafkaException | TopicMismatch | TimeoutError | OSError):
        return True
    if isinstance(exc, ConnectionFailure | ExecutionTimeout | WTimeoutError):
        return True
    if isinstance(exc, OperationFailure) and (
        exc.has_error_label("RetryableWriteError")
        or exc.has_error_label("TransientTransactionError")
    ):
        return True
    return isinstance(exc, PyMongoError) and exc.timeout


def _warn_outage(
    what: str, record: Record | None, attempt: int, retry_in: float, failure: BaseException | None
) -> None:
    log.warning(
        "outage.retrying",
        work=what,
        topic=record.topic if record else None,
        partition=record.partition if record else None,
        offset=record.offset if record else None,
        attempt=attempt,
        retry_in=round(retry_in, 2),
        error=f"{type(failure).__name__}: {failure}",
    )


def _log_outage(what: str, record: Record | None) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        _warn_outage(what, record, state.attempt_number, state.upcoming_sleep, failure)

    return before_sleep


async def through_outages(
    work: Callable[[], Awaitable[T]], *, what: str, record: Record | None = None
) -> T:
    """Run `work`, again and again with backoff while it fails for an outage, and return what
    it returns; any other failure is raised at once. There is no give-up: an outage ends, a
    record is never lost."""
    # The first attempt without the retry machinery, which costs more than the work of some
    # records (the dispatcher runs this once per record).
    try:
        return await work()
    except Exception as exc:
        if not is_outage(exc):
            raise
        _warn_outage(what, record, 1, 0.0, exc)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(is_outage),
        wait=wait_random_exponential(multiplier=0.2, max=OUTAGE_BACKOFF_MAX_SECONDS),
        before_sleep=_log_outage(what, record),
        reraise=True,
    ):
        with attempt:
            return await work()
    raise AssertionError("unreachable: the retries end by returning or raising")


class DeadLetters:
    """Writes `DeadLetter` records for one service, and guards the work done per record."""

    def __init__(self, producer: AsyncProducer, service: str, clock: Clock) -> None:
        self._producer = producer
        self._service = service
        self._clock = clock

    def letter(self, record: Record, reason: str) -> tuple[str, str | None, bytes]:
        """The dead-letter record for `record` (logged here; the caller produces it)."""
        letter = DeadLetter(
            service=self._service,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value.decode("utf-8", errors="replace"),
            reason=reason,
            at=self._clock.now(),
        )
        log.warning(
            "dead_letter",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason[:500],
        )
        return DEAD_LETTER.name, record.key, letter.to_wire()

    async def send(self, record: Record, reason: str) -> None:
        """Dead-letter `record`; returns only once the broker acknowledged the letter."""
        topic, key, value = self.letter(record, reason)

        async def write() -> None:
            await self._producer.send(topic, key, value)

        await through_outages(write, what="dead-letter write", record=record)

    async def guard(self, record: Record, work: Callable[[], Awaitable[None]], what: str) -> None:
        """Process one record: outages are retried until they pass; a record that fails for
        any other reason is dead-lettered with it, and the stream goes on."""
        try:
            await through_outages(work, what=what, record=record)
        except Exception as exc:  # noqa: BLE001 - a failure of its own is dead-lettered
            await self.send(record, failure_reason(exc, record, what))


def failure_reason(exc: Exception, record: Record, what: str) -> str:
    """Why a record is dead-lettered: undecodable, refused by a rule, or a failure it alone
    triggers (logged with its traceback, since that is a defect to fix)."""
    if isinstance(exc, ValidationError):
        return f"undecodable: {exc}"
    if isinstance(exc, ValueError):
        return f"refused: {exc}"
    log.exception(f"{what}.record_failed", key=record.key, topic=record.topic)
    return f"{type(exc).__name__}: {exc}"


# --- reading and replaying (the `waypost dead-letters` command) ------------------------------


@dataclass(frozen=True)
class StoredLetter:
    """A dead letter and where it sits in the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


def read_dead_letters(kafka: KafkaConnection | str, *, timeout: float = 30.0) -> list[StoredLetter]:
    """Every letter the topic holds now, oldest first per partition (read to the end once).

    A partition's end is the consumer's end-of-partition event, not its high watermark: the
    dispatcher dead-letters inside its Kafka transactions, and a transaction's commit marker
    takes an offset no record is ever read at (an open transaction's records are not read
    either, until it commits)."""
    consumer = Consumer(
        {
            **client_config(kafka),
            "group.id": "waypost-dead-letter-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = consumer.list_topics(DEAD_LETTER.name, timeout=timeout)
        partitions = [
            TopicPartition(DEAD_LETTER.name, p, OFFSET_BEGINNING)
            for p in sorted(metadata.topics[DEAD_LETTER.name].partitions)
        ]
        ends = {
            tp.partition: consumer.get_watermark_offsets(tp, timeout=timeout)[1]
            for tp in partitions
        }
        consumer.assign([tp for tp in partitions if ends[tp.partition] > 0])
        letters: list[StoredLetter] = []
        left = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{DEAD_LETTER.name} not read to its end in {timeout}s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            partition = int(msg.partition() or 0)
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    left.discard(partition)
                continue
            offset = int(msg.offset() or 0)
            try:
                letter = DeadLetter.model_validate_json(msg.value() or b"")
            except ValidationError:
                log.warning("dead_letter.unreadable", partition=partition, offset=offset)
            else:
                letters.append(StoredLetter(partition, offset, letter))
        return letters
    finally:
        consumer.close()


def replay_dead_letters(kafka: KafkaConnection | str, letters: Iterable[StoredLetter]) -> int:
    """Write each letter's record back to the topic it came from, under its key, in order.

    Consumers are idempotent on message ids, so replaying a letter twice does no harm; a
    record that fails again is dead-lettered again, with its new reason.
    """
    producer = Producer({**client_config(kafka), "enable.idempotence": True, "acks": "all"})
    count = 0
    for stored in letters:
        letter = stored.letter
        producer.produce(
            letter.topic,
            key=letter.key.encode() if letter.key is not None else None,
            value=letter.value.encode(),
        )
        count += 1
    if producer.flush(30) != 0:
        raise TimeoutError("replayed records were not acknowledged by Kafka")
    return count
