"""A producer that librdkafka declares failed for good is replaced, and what it held is failed
back to its senders (whose outage retries send it again); no broker is needed to see either."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from structlog.testing import capture_logs

from shared.kafka import (
    AsyncProducer,
    DeliveryFailed,
    RenewableProducer,
    TransactionAborted,
    TransactionDoomed,
    fatal_error,
)

NO_BROKER = {"bootstrap.servers": "127.0.0.1:1", "log_level": 0, "enable.idempotence": True}
FATAL = KafkaError(KafkaError._FATAL, "sequence desynchronised", fatal=True)


def test_a_fatal_error_replaces_the_producer_and_fails_what_it_held() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    reports: list[KafkaError | None] = []
    first.produce("t", b"held", on_delivery=lambda err, _msg: reports.append(err))
    renewable.noticed(KafkaException(FATAL))  # what a poll raises once

    second = renewable.usable()
    assert second is not first
    assert renewable.current is second
    assert renewable.retiring
    deadline = time.monotonic() + 10
    while renewable.retiring and time.monotonic() < deadline:
        renewable.poll_retired()
    assert not renewable.retiring
    assert len(reports) == 1
    assert reports[0] is not None
    assert reports[0].code() == KafkaError._PURGE_QUEUE
    second.purge()
    second.flush(0)


def test_an_error_librdkafka_recovers_from_keeps_the_producer() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    renewable.noticed(KafkaException(KafkaError(KafkaError._TRANSPORT, "broker went away")))
    assert renewable.usable() is first


def test_a_call_after_the_fatal_error_is_taken_for_it() -> None:
    """Calls made after it raise the bare code `_FATAL`, not flagged fatal."""
    after = KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message"))
    assert fatal_error(after)
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    renewable.noticed(after)
    assert renewable.usable() is not first


class _RaisingOnce:
    """A real producer whose first poll raises the fatal error, as confluent-kafka's poll does
    when it serves one."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.polls = 0

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if self.polls == 1:
            raise KafkaException(FATAL)
        return self.producer.poll(timeout)


def test_a_fatal_error_raised_by_a_poll_leaves_the_poll_thread_serving() -> None:
    """Every pending send waits on the reports the poll thread serves: it must outlive the
    error, and the producer is replaced at its next use."""
    producer = AsyncProducer(NO_BROKER["bootstrap.servers"], client_id="test", extra=NO_BROKER)
    first = producer._renewable.current
    raising = _RaisingOnce(first)
    producer._renewable.current = raising  # type: ignore[assignment]
    try:
        deadline = time.monotonic() + 10
        while raising.polls < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert raising.polls >= 3, "the poll thread stopped at the error"
        assert producer._poller is not None
        assert producer._poller.is_alive()
        producer._renewable.current = first
        assert producer._renewable.usable() is not first
    finally:
        producer.close(0)


def test_a_fatal_error_raised_by_a_call_is_noticed() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    renewable.noticed(KafkaException(FATAL))
    assert renewable.usable() is not first


def test_a_transactional_producer_is_never_replaced() -> None:
    """Its owner must register a new one (init_transactions) to fence the old one."""
    renewable = RenewableProducer({**NO_BROKER, "transactional.id": "test-tx"}, "test")
    first = renewable.usable()
    renewable.noticed(KafkaException(FATAL))
    assert renewable.usable() is first


def test_a_fenced_producer_is_let_go_once_its_reports_are_served() -> None:
    """Each fence replaces the producer; keeping every fenced one would leak an instance (its
    threads and connections) per fence."""
    renewable = RenewableProducer({**NO_BROKER, "transactional.id": "test-tx"}, "test")
    fenced = renewable.current
    renewable.replace_wedged("fenced")
    assert renewable.current is not fenced
    assert renewable._wedged == []
    assert renewable.retiring  # polled until its reports are served, not dropped unserved
    deadline = time.monotonic() + 10
    while renewable.retiring and time.monotonic() < deadline:
        renewable.poll_retired()
    assert not renewable.retiring


def test_a_wedged_producer_is_kept_and_never_polled() -> None:
    """A thread may still be inside its call: nothing else may touch it."""
    renewable = RenewableProducer({**NO_BROKER, "transactional.id": "test-tx"}, "test")
    wedged = renewable.current
    renewable.replace_wedged("wedged")
    assert renewable.current is not wedged
    assert renewable._wedged == [wedged]
    assert not renewable.retiring


TIMED_OUT = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Report:
    """What a delivery report's message says of its record: where it went."""

    def __init__(self, partition: int = 0, topic: str = "t") -> None:
        self._where = (topic, partition)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]


def _stallable(
    config: dict[str, object] | None = None, stalled_after: float | None = None
) -> tuple[RenewableProducer, _Clock]:
    clock = _Clock()
    renewable = RenewableProducer(
        config or NO_BROKER, "test", stalled_after=stalled_after, clock=clock
    )
    return renewable, clock


def _timed_out(renewable: RenewableProducer, partition: int = 0) -> None:
    """A report of the current producer's record to `partition` that timed out."""
    renewable.undelivered(TIMED_OUT, _Report(partition), renewable.generation)


def test_a_producer_whose_records_only_time_out_for_long_is_replaced() -> None:
    """librdkafka can keep a partition's leader unknown after the broker came back, and then
    times out every record for good: a new producer asks the broker afresh."""
    renewable, clock = _stallable(stalled_after=60)
    first = renewable.usable()
    _timed_out(renewable)
    clock.now += 59
    _timed_out(renewable)
    assert renewable.usable() is first  # not yet: the streak is younger than 60 s

    clock.now += 1
    _timed_out(renewable)
    second = renewable.usable()
    assert second is not first
    assert renewable.retiring  # the old one is purged and served, as a failed one is
    assert renewable.timing_out == {}  # the new producer starts streaks of its own
    _timed_out(renewable)
    assert renewable.usable() is second
    second.flush(0)


def test_one_stuck_partition_is_enough_though_others_deliver() -> None:
    renewable, clock = _stallable(stalled_after=60)
    first = renewable.usable()
    for _ in range(3):
        _timed_out(renewable, partition=4)
        renewable.delivered(_Report(1), renewable.generation)
        renewable.delivered(_Report(2), renewable.generation)
        clock.now += 30
    assert renewable.usable() is not first
    renewable.current.flush(0)


def test_a_record_delivered_to_the_partition_ends_its_streak() -> None:
    renewable, clock = _stallable(stalled_after=60)
    first = renewable.usable()
    _timed_out(renewable, partition=3)
    clock.now += 50
    renewable.delivered(_Report(3), renewable.generation)
    clock.now += 50
    _timed_out(renewable, partition=3)
    clock.now += 50
    _timed_out(renewable, partition=3)
    assert renewable.usable() is first


def test_the_replaced_producers_reports_say_nothing_of_the_new_one() -> None:
    """Timeouts the old producer still reports after the renewal start no streak, and its late
    deliveries end none."""
    renewable, clock = _stallable(stalled_after=60)
    old = renewable.generation
    _timed_out(renewable)
    clock.now += 60
    _timed_out(renewable)
    second = renewable.usable()

    renewable.undelivered(TIMED_OUT, _Report(), old)
    assert renewable.timing_out == {}
    _timed_out(renewable)  # the new producer's
    renewable.delivered(_Report(), old)  # the old producer's late delivery
    clock.now += 60
    _timed_out(renewable)
    assert renewable.usable() is not second
    renewable.current.flush(0)


def test_only_timeouts_count_towards_a_stall() -> None:
    """A refused record (too large, say) or a purge says nothing of the producer's health."""
    renewable, clock = _stallable(stalled_after=60)
    first = renewable.usable()
    for _ in range(3):
        for code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError._PURGE_QUEUE):
            renewable.undelivered(KafkaError(code), _Report(), renewable.generation)
        clock.now += 60
    assert renewable.usable() is first


def test_a_stalled_transactional_producer_is_left_to_its_owner() -> None:
    """Its records time out inside a transaction, which its owner aborts and starts over."""
    renewable, clock = _stallable({**NO_BROKER, "transactional.id": "test-tx"}, 60)
    first = renewable.usable()
    _timed_out(renewable)
    clock.now += 120
    _timed_out(renewable)
    assert renewable.usable() is first


def test_the_stall_is_taken_after_twice_the_message_timeout_by_default() -> None:
    renewable, clock = _stallable({**NO_BROKER, "message.timeout.ms": 30_000})
    first = renewable.usable()
    _timed_out(renewable)
    clock.now += 59.9
    _timed_out(renewable)
    assert renewable.usable() is first
    clock.now += 0.1
    _timed_out(renewable)
    assert renewable.usable() is not first
    renewable.current.flush(0)


def _loop_served(timeout_ms: int) -> AsyncProducer:
    """A producer served on the loop, with no broker: each record times out after
    `timeout_ms`."""
    return AsyncProducer(
        NO_BROKER["bootstrap.servers"],
        client_id="test",
        extra={**NO_BROKER, "message.timeout.ms": timeout_ms},
        serve_on_loop=True,
    )


async def test_an_async_producer_whose_sends_only_time_out_gets_a_new_producer() -> None:
    """Through the delivery reports of real sends (no broker: each times out after 100 ms)."""
    producer = _loop_served(timeout_ms=100)
    first = producer._renewable.current
    deadline = time.monotonic() + 30
    with capture_logs() as logs:
        while producer._renewable.current is first and time.monotonic() < deadline:
            with pytest.raises(DeliveryFailed, match="timed out"):
                await producer.send("t", "k", b"v")
            producer._renewable.usable()
    assert producer._renewable.current is not first
    assert {"event": "kafka.producer_renewed", "producer": "test", "reason": "stalled"} in [
        {k: entry.get(k) for k in ("event", "producer", "reason")} for entry in logs
    ]
    producer.close(timeout=0)


class _RaisingRetired:
    """A replaced producer whose poll raises (its fatal error, served late)."""

    def poll(self, _timeout: float) -> int:
        raise KafkaException(FATAL)

    def __len__(self) -> int:
        return 0


def test_an_error_of_a_replaced_producer_never_marks_the_current_one_failed() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    current = renewable.usable()
    renewable._retired.append(_RaisingRetired())  # type: ignore[arg-type]
    renewable.poll_retired()
    assert not renewable.retiring
    assert renewable.usable() is current


@contextmanager
def _transactional_producer_over(fake: object, transactional_id: str) -> Iterator[AsyncProducer]:
    """A transactional `AsyncProducer` whose librdkafka producer is `fake` (no broker)."""
    producer = AsyncProducer(
        NO_BROKER["bootstrap.servers"],
        client_id="test",
        extra={**NO_BROKER, "transactional.id": transactional_id},
    )
    first = producer._renewable.current
    producer._renewable.current = fake  # type: ignore[assignment]
    try:
        yield producer
    finally:
        producer._stopping.set()
        assert producer._poller is not None
        producer._poller.join(timeout=5)
        first.flush(0)


class _Fenced:
    """A fenced producer: every produce raises the bare `_FATAL` code, as librdkafka's does."""

    def produce(self, *_args: object, **_kwargs: object) -> None:
        raise KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message"))

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0

    def send_offsets_to_transaction(self, *_args: object) -> None:
        raise KafkaException(KafkaError(KafkaError._FATAL, "producer fenced"))

    def begin_transaction(self) -> None:
        raise KafkaException(KafkaError(KafkaError._FATAL, "producer fenced"))

    commit_transaction = send_offsets_to_transaction


async def test_a_fenced_transactional_producer_dooms_the_transaction_rather_than_an_outage() -> (
    None
):
    """No outage retry can help a fenced producer: the batch must be aborted and read again."""
    with (
        _transactional_producer_over(_Fenced(), "test-fenced") as producer,
        pytest.raises(TransactionDoomed),
    ):
        await producer.send_all([("t", "k", b"v")])


async def test_every_transactional_call_of_a_fenced_producer_dooms_the_transaction() -> None:
    """A fenced producer's error met by a task of the batch (proving ownership before a
    provider call, say) must reach the worker, which starts over: taken for an outage, the
    task would ask again for ever and the batch would never end."""
    with _transactional_producer_over(_Fenced(), "test-fenced-calls") as producer:
        with pytest.raises(TransactionDoomed):
            await producer.prove_offsets([], None)
        with pytest.raises(TransactionDoomed):
            await producer.commit_transaction([], None)
        with pytest.raises(TransactionDoomed):
            producer.begin_transaction()


class _Refused:
    """A producer whose offsets the group coordinator refuses with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.aborted = 0

    def send_offsets_to_transaction(self, *_args: object) -> None:
        raise KafkaException(KafkaError(self.code, "refused", txn_requires_abort=True))

    def abort_transaction(self, *_args: object) -> None:
        self.aborted += 1

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0


@pytest.mark.parametrize(
    ("code", "moved_on"),
    [
        (KafkaError.UNKNOWN_MEMBER_ID, True),
        (KafkaError.ILLEGAL_GENERATION, True),
        (KafkaError.REBALANCE_IN_PROGRESS, False),
        (KafkaError._TIMED_OUT, False),
    ],
)
async def test_an_aborted_transaction_says_whether_the_group_moved_on(
    code: int, moved_on: bool
) -> None:
    """Only the coordinator's word that this member no longer owns the partitions means
    another worker handles them; a rebalance under way may leave them with this one."""
    refused = _Refused(code)
    with (
        _transactional_producer_over(refused, "test-refused") as producer,
        pytest.raises(TransactionAborted) as aborted,
    ):
        await producer.prove_offsets([], None)
    assert aborted.value.moved_on is moved_on
    assert refused.aborted == 1


class _RefusedThenFenced(_Refused):
    """Refused offsets, and the abort that follows meets the producer's fatal error."""

    def abort_transaction(self, *_args: object) -> None:
        raise KafkaException(KafkaError(KafkaError._FATAL, "producer fenced"))


async def test_an_abort_that_meets_the_fatal_error_dooms_the_transaction() -> None:
    with (
        _transactional_producer_over(
            _RefusedThenFenced(KafkaError.REBALANCE_IN_PROGRESS), "test-refused-fenced"
        ) as producer,
        pytest.raises(TransactionDoomed),
    ):
        await producer.commit_transaction([TopicPartition("t", 0, 1)], None)


async def test_an_error_that_needs_no_abort_reaches_the_caller_as_it_came() -> None:
    class Unavailable(_Refused):
        def send_offsets_to_transaction(self, *_args: object) -> None:
            raise KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE, "away"))

    refused = Unavailable(KafkaError.COORDINATOR_NOT_AVAILABLE)
    with (
        _transactional_producer_over(refused, "test-unavailable") as producer,
        pytest.raises(KafkaException) as raised,
    ):
        await producer.prove_offsets([], None)
    assert raised.value.args[0].code() == KafkaError.COORDINATOR_NOT_AVAILABLE
    assert refused.aborted == 0


# --- delivery reports served on the event loop (`serve_on_loop`, `LoopPoller`) --------------


async def test_a_producer_served_on_the_loop_has_no_poll_thread_and_fails_back_on_the_loop() -> (
    None
):
    """Its reports are served by the loop alone: a record no broker ever takes times out, and
    its sender learns of it from a report served on the loop's thread."""
    producer = _loop_served(timeout_ms=200)
    try:
        assert producer._poller is None
        with pytest.raises(DeliveryFailed, match="timed out"):
            await asyncio.wait_for(producer.send("t", "k", b"never taken"), 10)
    finally:
        producer.close(0)


async def test_the_loop_poller_stops_once_nothing_is_in_flight() -> None:
    """It polls only while records are queued, in flight or reported but not served: the
    record's report was served (its sender learned of the failure), then polling stopped. (The
    producer's queue may hold an event again by then, an error about the missing broker that
    librdkafka queues on its own: it is served with the next record, so it is not asserted.)"""
    producer = _loop_served(timeout_ms=200)
    poller = producer._loop_poller
    assert poller is not None
    try:
        assert poller._timer is None
        with pytest.raises(DeliveryFailed):
            await asyncio.wait_for(producer.send("t", "k", b"never taken"), 10)
        deadline = time.monotonic() + 5
        while poller._timer is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert poller._timer is None
    finally:
        producer.close(0)


class _RaisingOnceWhole(_RaisingOnce):
    """`_RaisingOnce` that otherwise is the producer it wraps (produce, len, flush)."""

    def __getattr__(self, name: str) -> object:
        return getattr(self.producer, name)

    def __len__(self) -> int:
        return len(self.producer)


async def test_a_fatal_error_raised_by_a_poll_on_the_loop_leaves_the_loop_serving() -> None:
    """As with the poll thread: the error is noticed (the producer is replaced at its next
    use) and the reports after it are still served."""
    producer = _loop_served(timeout_ms=300)
    first = producer._renewable.current
    raising = _RaisingOnceWhole(first)
    producer._renewable.current = raising  # type: ignore[assignment]
    try:
        delivered = producer.produce("t", "k", b"held")
        with pytest.raises(DeliveryFailed):
            await asyncio.wait_for(delivered, 10)
        assert raising.polls >= 2, "the loop stopped serving at the error"
        producer._renewable.current = first
        assert producer._renewable.usable() is not first
    finally:
        producer.close(0)


def test_a_loop_served_producer_closes_after_its_loop_ended_with_records_unanswered() -> None:
    """A stream worker closes its producer once its loop has ended. Reports that closing
    serves (here: records no broker took, timing out) go to a loop that is gone: that must
    neither raise nor stop the flush, which is what a poll thread's producer did too."""
    producer = _loop_served(timeout_ms=300)
    # Every delivery report passes through the producer's stall check first: count them there.
    # (The queue's length is no measure: it also counts the client's own error events.)
    reports: list[int] = []
    check = producer._renewable.reported

    def counted(err: KafkaError | None, msg: Any, generation: int) -> None:
        reports.append(err.code() if err is not None else 0)
        check(err, msg, generation)

    producer._renewable.reported = counted  # type: ignore[method-assign]

    async def sent_then_stopped() -> None:
        sending = asyncio.ensure_future(producer.send_all([("t", "k", b"a"), ("t", "k", b"b")]))
        single = producer.produce("t", "k", b"c")
        await asyncio.sleep(0)
        sending.cancel()
        single.cancel()

    asyncio.run(sent_then_stopped())
    assert reports == [], "nothing is answered while the loop runs"

    producer.close(10)

    assert reports == [KafkaError._MSG_TIMED_OUT] * 3


class _ReplacedDuringCall:
    """A producer whose proof of offsets is answered with `error` after the worker replaced
    it (wedged elsewhere in the batch) and opened the next batch's transaction on the new one:
    an outage (retriable), or the group's refusal (the old member left), which needs an abort."""

    def __init__(self, producer: AsyncProducer, replacement: object, error: KafkaError) -> None:
        self.producer = producer
        self.replacement = replacement
        self.error = error
        self.calls = 0

    def send_offsets_to_transaction(self, *_args: object) -> None:
        self.calls += 1
        self.producer._renewable.current = self.replacement  # type: ignore[assignment]
        raise KafkaException(self.error)

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0


class _OpenTransaction:
    """The new producer, the next batch's transaction open: no call of the old one may reach
    it, an abort least of all."""

    def __init__(self) -> None:
        self.calls = 0
        self.aborts = 0

    def send_offsets_to_transaction(self, *_args: object) -> None:
        self.calls += 1

    def abort_transaction(self, *_args: object) -> None:
        self.aborts += 1

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, "loading", retriable=True),
        KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "unknown member", txn_requires_abort=True),
    ],
    ids=["retried", "refused"],
)
async def test_a_call_of_a_replaced_producer_dooms_its_transaction_and_leaves_the_new_one(
    error: KafkaError,
) -> None:
    """Its transaction went with the old producer: asked of the new one, the call would meet no
    transaction open, add the old batch's offsets to the next batch's, or abort that one."""
    new = _OpenTransaction()
    with _transactional_producer_over(_OpenTransaction(), "test-replaced") as producer:
        old = _ReplacedDuringCall(producer, new, error)
        producer._renewable.current = old  # type: ignore[assignment]
        with pytest.raises(TransactionDoomed, match="replaced"):
            await asyncio.wait_for(producer.prove_offsets([], None), 10)
        producer._renewable.current = old  # type: ignore[assignment]
    assert old.calls == 1
    assert (new.calls, new.aborts) == (0, 0)


@pytest.mark.parametrize("serve_on_loop", [False, True])
async def test_a_full_local_queue_is_waited_out_while_reports_free_it(serve_on_loop: bool) -> None:
    """`send_all` of more records than the local queue holds: the records that do not fit wait
    for room (here, made by the first ones timing out) instead of failing with the client's
    `BufferError`, and the failure `send_all` raises is the records' own."""
    config = {**NO_BROKER, "queue.buffering.max.messages": 2, "message.timeout.ms": 300}
    producer = AsyncProducer(
        NO_BROKER["bootstrap.servers"], client_id="test", extra=config, serve_on_loop=serve_on_loop
    )
    try:
        records = [("t", f"k-{n}", b"v") for n in range(3)]
        with pytest.raises(DeliveryFailed, match="timed out"):
            await asyncio.wait_for(producer.send_all(records), timeout=30)
    finally:
        producer.close(0)
