"""Kafka helpers on confluent-kafka: an awaitable idempotent producer, a consumer loop, topic admin.

Every service uses these; the stream workers (segmenter, orchestrator) through `shared.streams`.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn, Protocol

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from shared.kafka_connection import KafkaConnection, as_connection, client_config
from shared.membership import (
    END_OFFSETS_TIMEOUT_SECONDS,
    PROGRESS_CHECK_SECONDS,
    STALL_SECONDS,
    CheckBeside,
    Membership,
    Progress,
    Watermarks,
)
from shared.offsets import OffsetTracker
from shared.settings import CommonSettings
from shared.topics import ALL_TOPICS, Topic

log = structlog.get_logger(__name__)


class ProducerBusy(Exception):
    """The local produce queue is full: callers should shed load (HTTP 503 + Retry-After)."""


class TransactionDoomed(BaseException):
    """A record of the open transaction was not delivered (the broker away past the record's
    timeout, say): the transaction can only be aborted, and whatever the batch produced into it
    is lost. A BaseException, so that no record handler or outage retry takes it for a record's
    own failure: the worker aborts the batch and reads it again."""


class ProducerWedged(TransactionDoomed):
    """A transactional call blocked past its own timeout and the margin after it: librdkafka
    2.16 can wait forever for a group coordinator that went away (confluentinc/librdkafka
    #5456, #5511). The producer is replaced (`AsyncProducer.renew`); whether the open
    transaction committed is unknown until the new producer's `init_transactions` has
    completed or aborted it, so the worker reads its state and offsets again from the broker."""


class DeliveryFailed(Exception):
    """The broker did not acknowledge a record.

    `refused` says the record itself was refused (too large, invalid): sending it again cannot
    help. Anything else (a timeout, a broker that is down) is an outage to wait out.
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


# Broker answers about the record itself, not about the broker's health.
_REFUSED_RECORD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError._BAD_MSG,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
    }
)


# How long a view waits before it reads again after its consumer failed.
VIEW_RETRY_SECONDS = 1.0
# How long closing a consumer may take before its owner goes on without it.
CLOSE_SECONDS = 30.0
# How often a consumer sends again the commits that failed (`ConsumerLoop._commit_again`).
COMMIT_AGAIN_SECONDS = 1.0
# How long `send_all` waits for room in a full local queue before it calls the producer busy.
QUEUE_FULL_WAIT_SECONDS = 30.0


def fatal_error(exc: BaseException) -> bool:
    """Whether `exc` is librdkafka's fatal error: its producer can do nothing more (for a
    transactional one: it was fenced). A call made after the error raises it with only the
    code `_FATAL` ("Unable to produce message: Local: Fatal error"), not flagged fatal."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(error, KafkaError) and (error.fatal() or error.code() == KafkaError._FATAL)


def no_transaction_open(exc: BaseException) -> bool:
    """Whether `exc` says the producer has no transaction to end: librdkafka's `_STATE` in its
    `Ready` state ("Operation not valid in state Ready"), as after another step of the same
    batch aborted it. A `_STATE` of another state (a commit under way, say) is not this."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return (
        isinstance(error, KafkaError)
        and error.code() == KafkaError._STATE
        and str(error.str()).rstrip(". ").endswith("in state Ready")
    )


class Reported(Protocol):
    """What a delivery report says of its record (a confluent-kafka `Message`)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...


class RenewableProducer:
    """A librdkafka producer, replaced by a new one after a fatal error, or once every record
    it is given has timed out for a while (`undelivered`: stalled).

    librdkafka reports some failures of an idempotent producer as fatal (its sequence numbers
    can no longer be reconciled with the broker's, say after the broker restarted): that
    instance never sends again. confluent-kafka raises a fatal error from the `poll` that
    serves it (it never reaches an `error_cb`), and from every call made afterwards; either is
    handed to `noticed`. The replacement starts a new producer id; what the old one still held
    is purged, which fails it back to its senders, whose outage retries send it again
    (consumers de-duplicate). A transactional producer is not replaced: its owner must
    register a new one and fence the old (`init_transactions`), so its fatal error is raised.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        name: str,
        *,
        stalled_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = dict(config)
        self._name = name
        self._failed = threading.Event()
        # Partitions whose delivery reports only time out, and since when (a delivery to the
        # partition ends its streak); for how long before the producer is taken for stalled.
        # Delivery reports come from a poll thread or the loop: the lock keeps the streaks and
        # a renewal apart.
        timeout_s = float(self._config.get("message.timeout.ms", 300_000)) / 1000
        self._stalled_after = stalled_after if stalled_after is not None else 2 * timeout_s
        self._clock = clock
        self._streaks = threading.Lock()
        self.timing_out: dict[tuple[str | None, int | None], float] = {}
        self._stalled = False
        # Counts the replacements: a delivery callback made for an older producer (it captured
        # an older generation) says nothing of the current one.
        self.generation = 0
        # Replaced after a fatal error or a fence: polled until their reports are served
        # (`poll_retired`), then let go.
        self._retired: list[Producer] = []
        # Replaced while a call of theirs still blocks a thread: kept, never touched again.
        self._wedged: list[Producer] = []
        self.current = Producer(self._config)

    @property
    def transactional(self) -> bool:
        return "transactional.id" in self._config

    def noticed(self, exc: KafkaException) -> None:
        """A call or a poll raised `exc`: remember when it says the producer failed for good."""
        if fatal_error(exc):
            if not self._failed.is_set():
                log.error("kafka.producer_failed", producer=self._name, error=str(exc))
            self._failed.set()

    def undelivered(self, err: KafkaError, msg: Reported, generation: int) -> None:
        """A delivery report failed with `err`. A partition whose records time out for longer
        than `stalled_after` (twice the message timeout by default), with none delivered to it
        meanwhile (`delivered` ends the streak), marks the producer stalled: librdkafka can
        keep a partition's leader unknown after the broker came back ("new leader-1 not found
        in cache") and then times out every record it is given for that partition, for good.
        A new producer asks the broker afresh; the old one is purged like a failed one. During
        a real outage this replaces the producer once per `stalled_after`, which costs a
        reconnection. A transactional producer is left to its owner (its timeouts doom the
        transaction, which starts over). `generation`: the `generation` the record's callback
        was made in; an older one's report is the replaced producer's."""
        if err.code() != KafkaError._MSG_TIMED_OUT or self.transactional:
            return
        with self._streaks:
            if generation != self.generation:
                return
            now = self._clock()
            since = self.timing_out.setdefault((msg.topic(), msg.partition()), now)
            if now - since >= self._stalled_after:
                self._stalled = True

    def delivered(self, msg: Reported, generation: int) -> None:
        """A record was delivered: its partition is not stalled (see `undelivered`). Called
        only while some partition times out (`timing_out`)."""
        with self._streaks:
            if generation == self.generation:
                self.timing_out.pop((msg.topic(), msg.partition()), None)

    def reported(self, err: KafkaError | None, msg: Reported, generation: int) -> None:
        """A delivery report, for the stall check: `undelivered` for a failure, `delivered` for
        a delivery while some partition times out (nothing to do otherwise)."""
        if err is not None:
            self.undelivered(err, msg, generation)
        elif self.timing_out:
            self.delivered(msg, generation)

    def usable(self) -> Producer:
        """The producer to send with: a new one if the current one failed for good or stalled
        (`undelivered`)."""
        if (self._failed.is_set() or self._stalled) and not self.transactional:
            with self._streaks:
                old, self.current = self.current, Producer(self._config)
                reason = "failed" if self._failed.is_set() else "stalled"
                self._failed.clear()
                self._stalled = False
                self.timing_out.clear()
                self.generation += 1
            old.purge()
            self._retired.append(old)
            log.warning("kafka.producer_renewed", producer=self._name, reason=reason)
        return self.current

    def replace_wedged(self, reason: str) -> None:
        """A new producer in place of one whose call never returned (`reason` "wedged",
        `ProducerWedged`: kept, never touched again, since a thread may still be inside it) or
        that was fenced (its calls return at once: purged, and let go once its reports are
        served, so that every fence does not keep a librdkafka instance for good)."""
        old = self.current
        if reason == "fenced":
            old.purge()
            self._retired.append(old)
        else:
            self._wedged.append(old)
        self.current = Producer(self._config)
        self._failed.clear()
        log.warning("kafka.producer_renewed", producer=self._name, reason=reason)

    @property
    def retiring(self) -> bool:
        """Whether a replaced producer still has reports to serve."""
        return bool(self._retired)

    def poll_retired(self) -> None:
        """Serve the delivery reports of replaced producers (each fails what it held). An error
        a replaced producer raises is its own, already dealt with: it never marks the current
        one failed."""
        for old in list(self._retired):
            try:
                old.poll(0)
            except KafkaException as exc:
                log.info("kafka.retired_producer_error", producer=self._name, error=str(exc))
            if len(old) == 0:
                self._retired.remove(old)


def serve_reports(renewable: RenewableProducer, timeout: float) -> None:
    """Serve the delivery reports due (waiting up to `timeout` seconds for one), the replaced
    producers' too. Nothing raised here escapes: every pending send waits on the reports this
    serves, and after a fatal error they are what fails the records the producer held
    (purged), so their senders learn of it."""
    try:
        renewable.current.poll(timeout)
        renewable.poll_retired()
    except KafkaException as exc:  # a fatal error is raised once, by the poll serving it
        renewable.noticed(exc)
        if not fatal_error(exc):
            log.error("kafka.poll_failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a delivery callback failed; serve the rest
        log.error("kafka.poll_failed", error=f"{type(exc).__name__}: {exc}")


# How often delivery reports are served on the event loop while records are in flight: the
# most it adds to an acknowledgement (the loop's timers have about a millisecond's resolution).
LOOP_POLL_SECONDS = 0.001


class LoopPoller:
    """Serves a producer's delivery reports on the event loop's own thread: `poll(0)` every
    `LOOP_POLL_SECONDS` while records are queued, in flight or reported but not yet served,
    and not at all otherwise (`soon` after each record queued starts it).

    confluent-kafka calls into Python once per delivery report and takes the GIL for each call.
    From a poll thread of its own, each of those calls waits for a busy event loop to let go of
    the GIL (up to the interpreter's switch interval), and those waits, not the broker, were
    most of an acknowledgement's time (docs/ingest-performance.md, docs/delivery.md)."""

    def __init__(self, renewable: RenewableProducer) -> None:
        self._renewable = renewable
        self._timer: asyncio.TimerHandle | None = None

    def soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None:
            self._timer = loop.call_later(LOOP_POLL_SECONDS, self._serve, loop)

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        serve_reports(self._renewable, 0)
        if len(self._renewable.current) > 0 or self._renewable.retiring:
            self.soon(loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class AsyncProducer:
    """An idempotent, acks=all producer whose `send` returns once the broker acknowledged.

    Its delivery reports are served by a poll thread of its own, or, with `serve_on_loop`, on
    the event loop's thread (`LoopPoller`): for a producer whose senders each wait for their
    own few records while the loop is busy with other work, where a report's hand-off from a
    poll thread is most of the wait. Such a producer is used from one event loop only."""

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        client_id: str,
        extra: Mapping[str, Any] | None = None,
        serve_on_loop: bool = False,
    ):
        config: dict[str, Any] = {
            **client_config(kafka),
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "queue.buffering.max.messages": 100_000,
            "message.timeout.ms": 30_000,
        }
        config.update(extra or {})
        self._renewable = RenewableProducer(config, client_id)
        self._stopping = threading.Event()
        self._loop_poller = LoopPoller(self._renewable) if serve_on_loop else None
        self._poller: threading.Thread | None = None
        if self._loop_poller is None:
            self._poller = threading.Thread(
                target=self._poll, name=f"{client_id}-poll", daemon=True
            )
            self._poller.start()

    @property
    def _producer(self) -> Producer:
        return self._renewable.current

    def _poll(self) -> None:
        """The poll thread: serve delivery reports until closed (`serve_reports`)."""
        while not self._stopping.is_set():
            serve_reports(self._renewable, 0.05)

    def produce(
        self, topic: str, key: str | None, value: bytes | None, partition: int | None = None
    ) -> asyncio.Future[None]:
        """Queue one record (to `partition`, else by key); the future resolves on the broker's
        acknowledgement."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        reported, generation = self._renewable.reported, self._renewable.generation

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            reported(err, msg, generation)
            _settle_on(loop, future, err)

        try:
            self._enqueue(loop, topic, _encoded(key), value, partition, on_delivery)
        except BufferError as exc:
            raise ProducerBusy(str(exc)) from exc
        return future

    async def send(self, topic: str, key: str | None, value: bytes | None) -> None:
        delivered = self.produce(topic, key, value)
        await self._delivery(delivered)

    async def _delivery(self, delivered: Awaitable[None]) -> None:
        """Wait for acknowledgements; inside a transaction a failure dooms the transaction."""
        try:
            await delivered
        except DeliveryFailed as exc:
            if self._renewable.transactional:
                raise TransactionDoomed(str(exc)) from exc
            raise

    async def send_all(self, records: Iterable[tuple[str, str | None, bytes | None]]) -> None:
        """Queue every record (a None value is a tombstone), then wait for all acknowledgements.

        One wait for the whole lot: the delivery reports are counted where they are served (the
        poll thread, or the loop itself) and the event loop is woken once, when the last one
        arrives (a failure is raised then). A full local queue is waited out while the broker
        acknowledges, not failed at once.
        """
        await self._send(((topic, None, _encoded(key), value) for topic, key, value in records))

    async def send_to_partitions(
        self, records: Iterable[tuple[str, int, bytes, bytes | None]]
    ) -> dict[tuple[str, int], int]:
        """Like `send_all`, for records addressed to a partition each (topic, partition, key,
        value): returns the highest offset acknowledged per topic partition."""
        offsets: dict[tuple[str, int], int] = {}
        await self._send(records, offsets)
        return offsets

    async def _send(
        self,
        records: Iterable[tuple[str, int | None, bytes | None, bytes | None]],
        offsets: dict[tuple[str, int], int] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        tally = _Tally()

        reported, generation = self._renewable.reported, self._renewable.generation

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            reported(err, msg, generation)
            if offsets is not None and err is None:
                where = (str(msg.topic()), int(msg.partition() or 0))
                offsets[where] = max(offsets.get(where, -1), int(msg.offset() or 0))
            if tally.report(err):
                _settle_on(loop, finished, tally.error)

        produced = 0
        for topic, partition, key, value in records:
            try:
                self._enqueue(loop, topic, key, value, partition, on_delivery)
            except BufferError:
                # The local queue is full: wait for room (the common case needs no coroutine).
                await self._enqueue_waiting(loop, topic, key, value, partition, on_delivery)
            produced += 1
        if tally.expect(produced):
            _settle(finished, tally.error)
        await self._delivery(finished)

    def _enqueue(
        self,
        loop: asyncio.AbstractEventLoop,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        """Queue one record. `loop` is the caller's running loop, passed in: asking asyncio for
        it costs a system call (the process id is checked) on every record."""
        producer = self._renewable.usable()
        try:
            if partition is None:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            else:
                producer.produce(
                    topic, value=value, key=key, partition=partition, on_delivery=on_delivery
                )
            if self._loop_poller is not None:
                self._loop_poller.soon(loop)
        except KafkaException as exc:
            self._renewable.noticed(exc)
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() in _REFUSED_RECORD:
                # Refused before it was queued (too large, say): the record's fault, not an
                # outage, so it is never retried as one.
                raise DeliveryFailed(str(error), refused=True) from exc
            doomed = isinstance(error, KafkaError) and (
                error.txn_requires_abort() or error.code() == KafkaError._STATE
            )
            if self._renewable.transactional and (doomed or fatal_error(exc)):
                # The open transaction failed before, or the producer was fenced: nothing more
                # can join it, and no outage retry would help.
                raise TransactionDoomed(str(error)) from exc
            raise

    async def _enqueue_waiting(
        self,
        loop: asyncio.AbstractEventLoop,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        """Queue one record, waiting (up to QUEUE_FULL_WAIT_SECONDS) while the queue is full."""
        deadline: float | None = None
        while True:
            try:
                self._enqueue(loop, topic, key, value, partition, on_delivery)
                return
            except BufferError as exc:
                now = time.monotonic()
                deadline = deadline or now + QUEUE_FULL_WAIT_SECONDS
                if now > deadline:
                    raise ProducerBusy(str(exc)) from exc
                await asyncio.sleep(0.005)

    async def broadcast(self, topic: str, key: str | None, value: bytes, partitions: int) -> None:
        """The same record to every partition of the topic (a request each worker must see)."""
        await asyncio.gather(*(self.produce(topic, key, value, p) for p in range(partitions)))

    # --- transactions (a producer built with a `transactional.id`) ---------------------------

    async def init_transactions(self) -> None:
        """Register the transactional id; aborts what a predecessor with the same id left open.
        Asked again while the broker does not answer."""
        producer = self._bound()
        await _transactional(
            lambda: producer().init_transactions(TRANSACTION_CALL_SECONDS), what="init"
        )

    def begin_transaction(self) -> None:
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            _doomed_if_fatal(exc)
            raise

    async def commit_transaction(self, offsets: list[TopicPartition], group: Any) -> None:
        """Commit what was produced since `begin_transaction`, with the consumer group's
        `offsets`: atomically, and only while `group` (the consumer's group metadata: its
        generation) is still current. Raises `TransactionAborted` when the transaction had to be
        aborted (the group moved on: this worker is a zombie; or the broker refused it)."""

        # Two calls, each retried on its own: a call that timed out is resumed by calling it
        # again, and any other transactional call made meanwhile conflicts with it.
        producer = self._bound()
        try:
            if offsets:
                await _transactional(
                    lambda: producer().send_offsets_to_transaction(
                        offsets, group, TRANSACTION_CALL_SECONDS
                    ),
                    what="commit_offsets",
                )
            await _transactional(
                lambda: producer().commit_transaction(TRANSACTION_CALL_SECONDS),
                what="commit",
            )
        except KafkaException as exc:
            await self._refused(exc, producer)

    async def prove_offsets(self, offsets: list[TopicPartition], group: Any) -> None:
        """Add `offsets` to the open transaction: the group coordinator accepts them only from
        the member `group` names, in its current generation. Raises `TransactionAborted` (the
        transaction aborted) when it does not: this worker is no longer the owner."""
        producer = self._bound()
        try:
            await _transactional(
                lambda: producer().send_offsets_to_transaction(
                    offsets, group, TRANSACTION_CALL_SECONDS
                ),
                what="prove_offsets",
            )
        except KafkaException as exc:
            await self._refused(exc, producer)

    async def abort_transaction(self, producer: Callable[[], Producer] | None = None) -> None:
        """Abort the open transaction: the current producer's, or that of `producer` (a call's
        binding, `_bound`), which raises `TransactionDoomed` once it was replaced."""
        bound = producer or self._bound()
        await _transactional(
            lambda: bound().abort_transaction(TRANSACTION_CALL_SECONDS), what="abort"
        )

    def _bound(self) -> Callable[[], Producer]:
        """The producer a transactional call starts on, for each of its attempts. A call retried
        (an outage) while its producer was replaced (wedged, fenced: `renew`) belonged to a
        transaction that is gone: the attempt raises `TransactionDoomed` rather than reach the
        new producer, which has no transaction open (or, later, another batch's)."""
        producer = self._producer

        def same() -> Producer:
            if self._producer is not producer:
                raise TransactionDoomed("the producer was replaced while the call was retried")
            return producer

        return same

    async def _refused(self, exc: KafkaException, producer: Callable[[], Producer]) -> NoReturn:
        """What a failed commit or proof of offsets raises: `TransactionDoomed` for the
        producer's fatal error, `TransactionAborted` (aborted here) for an error that requires
        the transaction's abort, else `exc` itself. The abort goes to the call's own producer
        (`producer`): a proof left running past a wedged batch must not abort the transaction a
        new producer opened since."""
        _doomed_if_fatal(exc)
        error = exc.args[0] if exc.args else None
        if not (isinstance(error, KafkaError) and error.txn_requires_abort()):
            raise exc
        try:
            await self.abort_transaction(producer)
        except KafkaException as failed:
            _doomed_if_fatal(failed)
            raise failed from exc
        moved_on = error.code() in _GROUP_MOVED_ON
        raise TransactionAborted(str(error), moved_on=moved_on) from exc

    def renew(self, reason: str) -> None:
        """Replace a wedged or fenced transactional producer (`reason`) with a new one of the
        same transactional id: `init_transactions` must be awaited next, which fences the old
        one and settles the transaction it left open."""
        self._renewable.replace_wedged(reason)

    def close(self, timeout: float = 10.0) -> None:
        if self._loop_poller is not None:
            self._loop_poller.stop()
        self._producer.flush(timeout)
        self._stopping.set()
        if self._poller is not None:
            self._poller.join(timeout=1)


# How long one transactional call (init, send offsets, commit, abort) may block its thread.
TRANSACTION_CALL_SECONDS = 30.0


def _doomed_if_fatal(exc: KafkaException) -> None:
    """A transactional call that meets the producer's fatal error (fenced: another producer
    took its transactional id, or the coordinator bumped its epoch past a transaction's
    timeout) raises `TransactionDoomed`: no outage retry can help, and the worker must start
    over with a new producer (`StreamWorker`), whichever task of the batch met it."""
    if fatal_error(exc):
        raise TransactionDoomed(f"producer failed for good (fenced): {exc}") from exc


class TransactionAborted(Exception):
    """A transaction was aborted instead of committed: nothing it produced is visible, and the
    offsets it carried were not committed. `moved_on`: the group coordinator refused the
    offsets because the worker is no longer the member, or not in the generation, that owns
    them (another worker handles its partitions now); any other refusal (a rebalance under way,
    a coordinator away past the call's timeout, a record not delivered) says nothing of who
    owns them."""

    def __init__(self, message: str, *, moved_on: bool = False) -> None:
        super().__init__(message)
        self.moved_on = moved_on


# The group coordinator's answers that mean this member no longer owns what it committed for.
_GROUP_MOVED_ON = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.FENCED_INSTANCE_ID,
    }
)


# How long past its own timeout a transactional call may block before its producer is taken
# for wedged (`ProducerWedged`), counted in the process's running time (`_running_wait`).
WEDGED_AFTER_SECONDS = TRANSACTION_CALL_SECONDS + 30.0
# Running time is counted in steps of this length; a step that took more than twice as long
# counts as two steps.
RUNNING_STEP_SECONDS = 1.0


async def _running_wait(
    done: asyncio.Future[None],
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait for `done` for `seconds` of the process's running time, else `TimeoutError`.

    A process that was stopped (SIGSTOP, a frozen VM) wakes with every deadline of the wall
    clock gone, while a call it was waiting for had no time to run: the wait goes by steps, and
    a step that took far longer than asked counts as two steps, not as the time it took. So a
    call gets its own timeout of running time after a resume, and ends as the broker says
    (fenced, say) rather than being taken for wedged."""
    step = RUNNING_STEP_SECONDS
    counted = 0.0
    while counted < seconds:
        wait = min(step, seconds - counted)
        began = clock()
        try:
            await asyncio.wait_for(asyncio.shield(done), wait)
            return
        except TimeoutError:
            counted += min(clock() - began, 2 * wait)
    raise TimeoutError


async def _blocking(
    call: Callable[[], None],
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    name: str = "call",
) -> None:
    """Run `call` on a thread of its own; `ProducerWedged` when it has not returned after
    `deadline` seconds of running time. A call that never returns keeps only its own thread,
    not one of the event loop's executor threads that every other blocking call shares."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(finish, exc)
        else:
            loop.call_soon_threadsafe(finish, None)

    threading.Thread(target=run, name=f"kafka-transactional-{name}", daemon=True).start()
    try:
        await _running_wait(done, deadline, clock=clock)
    except BaseException as exc:
        if done.done() and not isinstance(exc, asyncio.CancelledError):
            # What the call raised; or the call ended just as the wait ran out (its answer came
            # while the timed-out wait was being cancelled): its own outcome stands.
            return done.result()
        # Given up on (wedged) or its caller cancelled, the call may still end on its thread,
        # long after. Its outcome is nobody's to handle now: it is logged when it comes, not
        # left for asyncio to report as an exception never retrieved.
        done.add_done_callback(partial(_abandoned_call_ended, name))
        if isinstance(exc, TimeoutError):
            raise ProducerWedged(
                f"a transactional call blocked for more than {deadline:.0f} s"
            ) from None
        raise


def _abandoned_call_ended(name: str, done: asyncio.Future[None]) -> None:
    error = None if done.cancelled() else done.exception()
    log.info(
        "kafka.abandoned_call_ended",
        what=name,
        outcome="returned" if error is None else "raised",
        error=None if error is None else str(error),
    )


async def _transactional(
    call: Callable[[], None], deadline: float | None = None, *, what: str = "call"
) -> None:
    """Run a blocking transactional call on its own thread, again while the error is
    retriable; `ProducerWedged` when one attempt blocks past `deadline`, or when attempts that
    each ran out their own timeout add up to `WEDGED_AFTER_SECONDS`: after a broker restart,
    librdkafka can keep a request to the transaction coordinator queued on a connection it
    never makes again, and time the call out every `TRANSACTION_CALL_SECONDS` for ever."""
    timed_out = 0.0
    while True:
        began = time.monotonic()
        try:
            await _blocking(call, WEDGED_AFTER_SECONDS if deadline is None else deadline, name=what)
            return
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.retriable():
                if error.code() in _STILL_BLOCKED:
                    # At most the call's own timeout: a stopped process does not count. An
                    # earlier call still in progress (its caller gone, its thread blocked in
                    # librdkafka) counts the time waited on it.
                    waited = time.monotonic() - began
                    if error.code() == KafkaError._PREV_IN_PROGRESS:
                        waited += RETRY_PAUSE_SECONDS
                    timed_out += min(waited, TRANSACTION_CALL_SECONDS)
                    if timed_out >= WEDGED_AFTER_SECONDS:
                        raise ProducerWedged(
                            f"transactional calls timed out or waited on an earlier one for "
                            f"{timed_out:.0f} s in a row"
                        ) from exc
                log.warning(
                    "kafka.transaction_retry",
                    error=str(error),
                    what=what,
                )
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
                continue
            raise


# Between two attempts of a transactional call that failed retriably.
RETRY_PAUSE_SECONDS = 0.2
# Retriable answers that mean the producer's transactional state is held up: the call timed
# out, or an earlier call of the same API is still blocked on its own thread.
_STILL_BLOCKED = frozenset({KafkaError._TIMED_OUT, KafkaError._PREV_IN_PROGRESS})


class _Tally:
    """Delivery reports of one `send_all`, counted on the poll thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reported = 0
        self._expected: int | None = None
        self.error: KafkaError | None = None

    def report(self, err: KafkaError | None) -> bool:
        """Count one report; True when it was the last one expected."""
        with self._lock:
            self._reported += 1
            if err is not None and self.error is None:
                self.error = err
            return self._reported == self._expected

    def expect(self, produced: int) -> bool:
        """Every record is queued; True when all their reports are already in."""
        with self._lock:
            self._expected = produced
            return self._reported == produced


def _encoded(key: str | None) -> bytes | None:
    return key.encode() if key is not None else None


def _settle_on(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], err: KafkaError | None
) -> None:
    """Hand a delivery report to its sender's loop. A loop that has closed has nobody waiting:
    a worker whose reports are served on its loop flushes its producer after the loop ended
    (`close`), and the reports that flush serves must not fail it."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(_settle, future, err)
    except RuntimeError:  # closed between the check and the call (a poll thread's report)
        return


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryFailed(str(err), refused=err.code() in _REFUSED_RECORD))


def admin_client(
    kafka: KafkaConnection | str,
    *,
    quiet: bool = False,
    on_error: Callable[[KafkaError], None] | None = None,
) -> AdminClient:
    config: dict[str, Any] = client_config(kafka)
    if quiet:
        config["log_level"] = 0  # readiness polling: refused connections are expected
    if on_error is not None:
        config["error_cb"] = on_error  # served by `poll`
    return AdminClient(config)


class KafkaAuthenticationFailed(Exception):
    """The cluster refused the client's credentials: waiting will not help, the settings must
    change."""


def wait_for_broker(kafka: KafkaConnection | str, timeout: float = 60.0) -> None:
    """Block until a metadata request succeeds (readiness, not a sleep). Credentials the cluster
    refuses raise `KafkaAuthenticationFailed` at once rather than waiting out `timeout`."""
    deadline = time.monotonic() + timeout
    refusals: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        if error.code() == KafkaError._AUTHENTICATION:
            refusals.append(error)

    admin = admin_client(kafka, quiet=True, on_error=on_error)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            metadata = admin.list_topics(timeout=2)
            if metadata.brokers:
                return
        except KafkaException as exc:
            last = exc
        admin.poll(0)
        if refusals:
            raise KafkaAuthenticationFailed(
                f"Kafka at {as_connection(kafka)} refused the credentials: {refusals[0].str()}"
            )
        time.sleep(0.2)
    raise TimeoutError(f"Kafka at {as_connection(kafka)} not ready after {timeout}s: {last}")


class TopicMismatch(Exception):
    """An existing topic has another partition count than the settings ask for."""


def ensure_topics(
    kafka: KafkaConnection | str,
    partitions: int,
    replication: int = 1,
    topics: Iterable[Topic] = ALL_TOPICS,
    *,
    timeout: float = 60.0,
) -> list[str]:
    """Create missing topics from the registry and return once the broker's metadata lists
    every one with its partitions; returns the names created. Idempotent.

    A consumer that starts before a new topic shows up in metadata sees it as missing (and a
    table's changelog write fails), so creation alone is not enough: we wait for metadata.
    """
    admin = admin_client(kafka)
    expected = {t.name: 1 if t.single_partition else partitions for t in topics}
    existing = admin.list_topics(timeout=10).topics
    wanted = [
        NewTopic(
            topic.name,
            num_partitions=expected[topic.name],
            replication_factor=replication,
            config=topic.config(),
        )
        for topic in topics
        if topic.name not in existing
    ]
    created = []
    if wanted:
        for name, future in admin.create_topics(wanted, operation_timeout=30).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    deadline = time.monotonic() + timeout
    while True:
        listed = admin.list_topics(timeout=10).topics
        missing = [
            name
            for name in expected
            if name not in listed or listed[name].error is not None or not listed[name].partitions
        ]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not in the broker's metadata after {timeout}s: {missing}")
        time.sleep(0.1)
    wrong = {
        name: len(listed[name].partitions)
        for name, count in expected.items()
        # Contact-keyed topics and table changelogs are co-partitioned: counts must agree
        # (scaling out changes `WAYPOST_TOPIC_PARTITIONS` and the topics together).
        if len(listed[name].partitions) != count
    }
    if wrong:
        raise TopicMismatch(
            "; ".join(
                f"{name} has {n} partitions, {expected[name]} expected" for name, n in wrong.items()
            )
        )
    _align_configs(admin, [t for t in topics if t.name in existing])
    return created


def _align_configs(admin: AdminClient, topics: list[Topic]) -> None:
    """Set the registry's retention and compaction settings on topics that existed already (a
    topic made by an older version, or by hand). A client without the right to change topic
    settings only warns: the topics work, with the cluster's settings."""
    if not topics:
        return
    resources = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            topic.name,
            incremental_configs=[
                ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
                for name, value in topic.config().items()
            ],
        )
        for topic in topics
    ]
    for resource, future in admin.incremental_alter_configs(resources).items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            log.warning("kafka.topic_config_unchanged", topic=resource.name, error=str(exc))


def prepare_topics(settings: CommonSettings, extra: Iterable[Topic] = ()) -> list[str]:
    """What a service does before it reads or writes a record: wait for the broker, then make
    sure every registry topic (and `extra`, such as its tables' changelogs) is there."""
    wait_for_broker(settings.kafka())
    return ensure_topics(
        settings.kafka(),
        settings.topic_partitions,
        settings.topic_replication,
        [*ALL_TOPICS, *extra],
    )


def topic_record_count(kafka: KafkaConnection | str, topic: str) -> int:
    """Records currently retained in a topic (sum of high minus low watermarks)."""
    consumer = Consumer({**client_config(kafka), "group.id": "waypost-watermarks"})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        total = 0
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += max(0, high - low)
        return total
    finally:
        consumer.close()


@dataclass(frozen=True)
class Record:
    """A consumed record, decoupled from the client library."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes


_REBALANCES = itertools.count(1)


class ConsumerLoop:
    """A consumer-group member read from asyncio; offsets are committed only when told.

    Commits never block: a commit that waits for a group coordinator (the broker just came
    back) would stall the event loop, starve every other consumer of the process of its polls,
    and get them all thrown out of their groups. Commits are sent asynchronously; their results
    arrive with the next poll. A commit that failed is sent again (`_commit_again`) while this
    member still holds the partition: a rebalance refuses commits of the generation it ends,
    and a cooperative one leaves the partition here, read past the refused offset, so nothing
    else would ever commit it if no record of it came again.
    """

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        group_id: str,
        topics: list[str],
        client_id: str,
        stall_seconds: float = STALL_SECONDS,
    ):
        self._config: dict[str, Any] = {
            **client_config(kafka),
            "group.id": group_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # A killed worker's partitions move on after 10 s rather than Kafka's 45 s.
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 2_000,
            "on_commit": self._committed,
        }
        self._topics = topics
        self._stall_seconds = stall_seconds
        self._watermarks = Watermarks(client_config(kafka))
        # Moves whenever this member's partitions may have changed hands (a rebalance, a lost
        # session, a new member, a new consumer): what a reader remembered about its partitions'
        # keys is stale then. Drawn from one count for the process, so no two consumers share a
        # value.
        self.rebalances = 0
        self._consumer = self._subscribe()
        self._closed = False
        self.paused = False
        self._failed: set[tuple[str, int]] = set()
        self._failed_lock = threading.Lock()
        # When failed commits may be sent again: a rebalance under way refuses them too.
        self._commit_again_at = 0.0
        # The offsets last sent for commit: where a partition stands before it yields anything.
        self._committed_at: dict[tuple[str, int], int] = {}

    def _subscribe(self) -> Consumer:
        group = str(self._config["group.id"])
        self._membership = Membership(group)
        self._progress = Progress(
            group,
            stall_seconds=self._stall_seconds,
            check_seconds=min(PROGRESS_CHECK_SECONDS, self._stall_seconds / 4),
        )
        self._progress_check = CheckBeside()
        consumer = Consumer({**self._config, **self._membership.config()})
        self.rebalances = next(_REBALANCES)
        # The callbacks only count: the client assigns and revokes itself after they return.
        consumer.subscribe(
            self._topics,
            on_assign=self._rebalanced,
            on_revoke=self._rebalanced,
            on_lost=self._rebalanced,
        )
        return consumer

    def _rebalanced(self, _consumer: Consumer, _partitions: list[TopicPartition]) -> None:
        self.rebalances = next(_REBALANCES)

    async def _check_membership(self) -> None:
        """Join afresh with a new consumer when this one has been stuck outside its group, or
        has stopped fetching records its partitions hold (`shared.membership`). Records handed
        out and not yet committed are read again by whoever gets their partitions: at least
        once, as after any rebalance."""
        lost = self._membership.lost()
        if not lost:
            lost = self._progress_check.verdict() or False
        if not lost and self.paused:
            self._progress.pause()
        elif not lost and not self._progress_check.running and self._progress.due():
            assigned = [(str(tp.topic), int(tp.partition)) for tp in self._consumer.assignment()]
            # Beside the loop: records keep flowing while the broker answers.
            self._progress_check.start(
                partial(
                    self._progress.stalled,
                    self._consumer,
                    assigned,
                    dict(self._committed_at),
                    self._watermarks,
                )
            )
        if not lost:
            return
        await self._progress_check.finish()
        await close_within(self._consumer)
        self._consumer = self._subscribe()
        self.paused = False

    def _committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Called from a poll with a commit's result."""
        failed = {
            (str(tp.topic), int(tp.partition))
            for tp in partitions
            if err is not None or tp.error is not None
        }
        if failed:
            log.warning("kafka.commit_failed", error=str(err), partitions=sorted(failed))
            with self._failed_lock:
                self._failed |= failed

    def _commit_again(self) -> None:
        """Send again, at most every `COMMIT_AGAIN_SECONDS`, the last commit of each partition
        whose commit failed, if this member still holds it (one it lost is its new owner's
        to commit)."""
        now = time.monotonic()
        if now < self._commit_again_at:
            return
        with self._failed_lock:
            failed, self._failed = self._failed, set()
        if not failed:
            return
        self._commit_again_at = now + COMMIT_AGAIN_SECONDS
        held = {(str(tp.topic), int(tp.partition)) for tp in self._consumer.assignment()}
        offsets = {
            where: self._committed_at[where]
            for where in failed
            if where in held and where in self._committed_at
        }
        if offsets:
            self.commit_offsets(offsets)

    async def records(self, batch: int = 100, timeout: float = 0.5) -> AsyncIterator[list[Record]]:
        """Yield batches of records (possibly empty, so callers can notice shutdown)."""
        while not self._closed:
            messages = await asyncio.to_thread(self._consumer.consume, batch, timeout)
            out = []
            for msg in messages:
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("kafka.consume_error", error=str(error))
                    continue
                key = msg.key()
                out.append(
                    Record(
                        topic=str(msg.topic()),
                        partition=int(msg.partition() or 0),
                        offset=int(msg.offset() or 0),
                        key=key.decode() if key is not None else None,
                        value=msg.value() or b"",
                    )
                )
            self._commit_again()
            yield out
            await self._check_membership()

    def commit(self, records: list[Record]) -> None:
        """Commit past the given records (the highest offset per partition)."""
        highest: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            highest[tp] = max(highest.get(tp, -1), record.offset)
        if highest:
            self.commit_offsets({tp: offset + 1 for tp, offset in highest.items()})

    def commit_offsets(self, offsets: Mapping[tuple[str, int], int], *, wait: bool = False) -> bool:
        """Send a commit of explicit next offsets, without waiting for it unless `wait` (a last
        commit before closing); False (logged) when it cannot be sent (no longer assigned)."""
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        self._committed_at.update(offsets)
        try:
            if wait:
                self._consumer.commit(offsets=partitions, asynchronous=False)
            else:
                self._consumer.commit(offsets=partitions, asynchronous=True)
        except KafkaException as exc:
            log.warning("kafka.commit_failed", error=str(exc))
            return False
        return True

    def pause(self) -> None:
        """Stop fetching (the group membership stays alive while `records()` keeps polling)."""
        self._consumer.pause(self._consumer.assignment())
        self.paused = True

    def resume(self) -> None:
        self._consumer.resume(self._consumer.assignment())
        self.paused = False

    def close(self) -> None:
        self._closed = True
        self._progress_check.wait_ended(END_OFFSETS_TIMEOUT_SECONDS)
        self._consumer.close()


async def close_within(consumer: Consumer, seconds: float = CLOSE_SECONDS) -> None:
    """Close a consumer (it leaves its group: its partitions move at once) within a deadline: a
    consumer stuck outside its group must not hold its owner."""
    try:
        await asyncio.wait_for(asyncio.to_thread(consumer.close), seconds)
    except (KafkaException, RuntimeError, TimeoutError) as exc:
        log.warning("kafka.close_failed", error=str(exc) or type(exc).__name__)


async def run_pipelined(
    consumer: ConsumerLoop,
    process: Callable[[Record], Coroutine[Any, Any, None]],
    stop: asyncio.Event,
    *,
    limit: int,
) -> None:
    """Process records concurrently (at most `limit` unfinished), committing each partition's
    offset only past records that finished along with every record before them.

    `process` must not raise: a record it cannot handle goes to the dead-letter topic.
    """
    tracker = OffsetTracker()
    running: set[asyncio.Task[None]] = set()

    def finished(record: Record) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            tracker.finished(record.topic, record.partition, record.offset)
            if not task.cancelled() and task.exception() is not None:
                log.error("pipeline.record_failed", error=repr(task.exception()))

        return done

    try:
        async for batch in consumer.records(timeout=0.2):
            for record in batch:
                tracker.started(record.topic, record.partition, record.offset)
                task = asyncio.create_task(process(record))
                running.add(task)
                task.add_done_callback(finished(record))
            offsets = tracker.committable()
            if offsets and consumer.commit_offsets(offsets):
                tracker.mark_committed(offsets)
            if len(running) >= limit and not consumer.paused:
                consumer.pause()
            elif len(running) < limit and consumer.paused:
                consumer.resume()
            if stop.is_set():
                break
        if running:  # a graceful stop lets started work finish, then commits behind it
            await asyncio.wait(running, timeout=30)
            offsets = tracker.committable()
            if offsets:
                await asyncio.to_thread(partial(consumer.commit_offsets, offsets, wait=True))
    finally:
        for task in running:
            task.cancel()


class CompactedTopicView:
    """Follows a compacted topic from the beginning in a thread and keeps the latest value per key.

    Every instance reads every partition (no consumer group), so each worker sees all definitions.
    """

    def __init__(
        self,
        kafka: KafkaConnection | str,
        topic: str,
        *,
        on_change: Callable[[str, bytes | None], None] | None = None,
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._on_change = on_change
        self._values: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"view-{topic}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        return self._caught_up.wait(timeout)

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._values)

    def get(self, key: str) -> bytes | None:
        """The latest value of one key (None: none, or deleted)."""
        with self._lock:
            return self._values.get(key)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        """Follow the topic for as long as the view runs. Reading starts again with a new
        consumer, where the last one stopped, when the old one failed (the broker away at
        its start, say) or stopped fetching what the topic holds (`shared.membership`)."""
        positions: dict[int, int] = {}
        while not self._stopping.is_set():
            try:
                self._follow(positions)
            except KafkaException as exc:
                log.warning("kafka.view_restarting", topic=self._topic, error=str(exc))
                self._stopping.wait(VIEW_RETRY_SECONDS)

    def _follow(self, positions: dict[int, int]) -> None:
        """Read with one consumer, from `positions` (next offset per partition, updated as
        records come), until the view stops or the consumer stops fetching."""
        consumer = Consumer(
            {
                **client_config(self._kafka),
                "group.id": "waypost-compacted-view",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        progress = Progress(f"view {self._topic}")
        try:
            metadata = consumer.list_topics(self._topic, timeout=30)
            topic = metadata.topics[self._topic]
            if topic.error is not None:
                raise KafkaException(topic.error)
            partitions = sorted(topic.partitions)
            consumer.assign(
                [
                    TopicPartition(self._topic, p, positions.get(p, OFFSET_BEGINNING))
                    for p in partitions
                ]
            )
            at_end: set[int] = set()
            while not self._stopping.is_set():
                if progress.due():
                    watched = [(self._topic, p) for p in partitions]
                    known = {(self._topic, p): positions.get(p, 0) for p in partitions}
                    if progress.stalled(consumer, watched, known):
                        return
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(int(msg.partition() or 0))
                        if len(at_end) == len(partitions):
                            self._caught_up.set()
                    else:
                        log.warning("kafka.view_error", topic=self._topic, error=str(error))
                    continue
                positions[int(msg.partition() or 0)] = int(msg.offset() or 0) + 1
                raw_key = msg.key()
                if raw_key is None:
                    continue
                key = raw_key.decode()
                value = msg.value()
                with self._lock:
                    if value is None:
                        self._values.pop(key, None)
                    else:
                        self._values[key] = value
                if self._on_change is not None:
                    self._on_change(key, value)
        finally:
            consumer.close()
