"""The stream worker's tables and positions (shared/streams.py), without a broker: a table
addresses the partition in focus, reads its staged writes first, stores them in one write batch
with the changelog offset they reach; a position drops what its owner handled already."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from rocksdict import AccessType, Options, Rdict
from structlog.testing import capture_logs

from shared.clock import ManualClock
from shared.kafka import (
    AsyncProducer,
    DeliveryFailed,
    ProducerWedged,
    Record,
    TransactionDoomed,
)
from shared.restore import CURRENT_KEY, OFFSET_KEY
from shared.settings import StreamSettings
from shared.streams import Fenced, NotOwned, Positions, StreamWorker, Table, focus


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Table]:
    things = Table("things", "app-things-changelog", tmp_path)
    things.open(0)
    things.open(1)
    yield things
    focus(None)
    for partition in things.partitions:
        things.close(partition)


def test_writes_go_to_the_partition_in_focus_and_are_staged_until_applied(table: Table) -> None:
    focus(0)
    table[b"a"] = b"1"
    focus(1)
    table[b"b"] = b"2"
    assert b"a" not in table  # partition 1 has no `a`
    assert table[b"b"] == b"2"  # staged writes are read first
    assert sorted(table.staged()) == [(0, b"a", b"1"), (1, b"b", b"2")]
    assert dict(table.rows()) == {b"a": b"1", b"b": b"2"}  # a scan sees them too

    table.apply(0, through=7)
    table.apply(1, through=None)

    assert list(table.staged()) == []
    assert dict(table.rows()) == {b"a": b"1", b"b": b"2"}
    focus(None)
    assert table[b"a"] == b"1"  # outside a record, every held partition is looked in
    assert table.get(b"missing") is None


def test_the_applied_offset_is_kept_beside_the_rows_and_survives_a_reopen(
    table: Table, tmp_path: Path
) -> None:
    focus(0)
    table[b"a"] = b"1"
    table.apply(0, through=41)
    table.close(0)
    db = Rdict(
        str(table.path_of(0)), options=Options(raw_mode=True), access_type=AccessType.read_only()
    )
    try:
        assert db[OFFSET_KEY] == b"41"
        assert db[b"a"] == b"1"
    finally:
        db.close()
    table.open(0)
    assert table[b"a"] == b"1"
    assert dict(table.rows()) == {b"a": b"1"}  # the offset is not a row


def test_a_delete_is_staged_as_a_tombstone_and_applied(table: Table) -> None:
    focus(1)
    table[b"k"] = b"v"
    table.apply(1, through=0)
    del table[b"k"]
    assert b"k" not in table
    assert list(table.staged()) == [(1, b"k", None)]
    with pytest.raises(KeyError):
        del table[b"k"]
    assert table.pop(b"k", None) is None
    table.apply(1, through=1)
    assert list(table.rows()) == []


def test_a_partition_not_held_is_refused(table: Table) -> None:
    focus(5)
    with pytest.raises(NotOwned):
        table.get(b"a")
    with pytest.raises(NotOwned):
        table[b"a"] = b"1"
    focus(None)
    with pytest.raises(NotOwned, match="outside a record"):
        table[b"a"] = b"1"


def test_closing_a_partition_drops_its_staged_writes(table: Table) -> None:
    focus(0)
    table[b"a"] = b"1"
    table.close(0)
    assert list(table.staged()) == []
    assert table.partitions == frozenset({1})
    table.open(0)
    assert table.get(b"a") is None


def record(topic: str, partition: int, offset: int) -> Record:
    return Record(topic, partition, offset, "k", b"")


def test_positions_drop_records_below_the_next_offset_and_advance_past_handled_ones() -> None:
    positions = Positions()
    assert positions.fresh(record("t", 0, 0))  # nothing known: everything is fresh
    positions.start("t", 0, 10)
    positions.start("t", 1, -1001)  # no committed offset: from wherever the consumer starts
    assert not positions.fresh(record("t", 0, 9))
    assert positions.fresh(record("t", 0, 10))
    assert positions.fresh(record("t", 1, 0))

    moved = positions.handled([record("t", 0, 10), record("t", 0, 12), record("t", 1, 3)])

    assert moved == {("t", 0): 13, ("t", 1): 4}
    # Fetched again after a rebalance: already handled by this owner, dropped.
    assert not positions.fresh(record("t", 0, 12))
    assert positions.fresh(record("t", 0, 13))
    positions.forget("t", 0)
    assert positions.fresh(record("t", 0, 0))


def test_a_scan_sees_the_staged_writes_of_the_batch_in_hand(table: Table) -> None:
    focus(0)
    table[b"kept"] = b"1"
    table[b"gone"] = b"1"
    table.apply(0, through=1)
    table[b"new"] = b"2"
    del table[b"gone"]
    assert dict(table.rows()) == {b"kept": b"1", b"new": b"2"}


def test_stored_rows_are_read_in_slices_from_a_key_on(table: Table) -> None:
    focus(0)
    for key in (b"a", b"b", b"c", b"d", b"e"):
        table[key] = key.upper()
    table.apply(0, through=5, current_at=1)  # the offset and time rows are not table rows
    table[b"f"] = b"F"  # staged: not read

    first = table.rows_from(0, None, 2)
    second = table.rows_from(0, first[-1][0] + b"\x00", 2)
    third = table.rows_from(0, second[-1][0] + b"\x00", 2)

    assert [first, second, third] == [
        [(b"a", b"A"), (b"b", b"B")],
        [(b"c", b"C"), (b"d", b"D")],
        [(b"e", b"E")],
    ]
    assert table.rows_from(0, b"e\x00", 2) == []
    table.close(0)
    assert table.rows_from(0, None, 2) == []  # the partition moved away meanwhile


def test_a_database_last_current_too_long_ago_is_dropped_to_be_restored_whole(
    table: Table,
) -> None:
    focus(0)
    written = 1_800_000_000
    table[b"a"] = b"1"
    table.apply(0, through=0, current_at=written)
    table.close(0)
    table.close(1)
    assert not table.drop_if_stale(0, written + 60, max_age=3600)  # current enough: read on
    assert table.path_of(0).exists()
    assert table.drop_if_stale(0, written + 7200, max_age=3600)
    assert not table.path_of(0).exists()
    # A database that never said when it was current (written before the marker) is dropped.
    table.open(1)
    focus(1)
    table[b"b"] = b"1"
    table.apply(1, through=None)
    table.close(1)
    assert table.drop_if_stale(1, written, max_age=3600)
    assert not table.drop_if_stale(5, written, max_age=3600)  # nothing there


class Producer:
    """Records each changelog send, in order, and acknowledges at growing offsets."""

    def __init__(self) -> None:
        self.sends: list[list[tuple[str, int, bytes, bytes | None]]] = []

    async def send_to_partitions(
        self, records: list[tuple[str, int, bytes, bytes | None]]
    ) -> dict[tuple[str, int], int]:
        self.sends.append(list(records))
        return {(topic, partition): 100 + len(self.sends) for topic, partition, _k, _v in records}


async def test_the_primary_tables_changelog_is_written_after_the_others(tmp_path: Path) -> None:
    producer = Producer()
    worker = StreamWorker(
        "app",
        StreamSettings(data_dir=tmp_path),
        producer,  # type: ignore[arg-type]
        ManualClock(datetime(2026, 12, 2, tzinfo=UTC)),
        service="test",
    )
    timers, contacts = worker.table("timers"), worker.table("contacts", primary=True)
    for t in (timers, contacts):
        t.open(0)
    focus(0)
    contacts[b"c"] = b"state"
    timers[b"c\x00i"] = b"due"

    await worker._store()

    assert producer.sends == [
        [("app-timers-changelog", 0, b"c\x00i", b"due")],
        [("app-contacts-changelog", 0, b"c", b"state")],
    ]
    assert dict(contacts.rows()) == {b"c": b"state"}
    assert list(contacts.staged()) == []
    for t in (timers, contacts):
        t.close(0)
    db = Rdict(
        str(contacts.path_of(0)),
        options=Options(raw_mode=True),
        access_type=AccessType.read_only(),
    )
    try:
        assert db[OFFSET_KEY] == b"102"  # the offset its changelog write was acknowledged at
        assert db[CURRENT_KEY] == str(int(datetime(2026, 12, 2, tzinfo=UTC).timestamp())).encode()
    finally:
        db.close()


async def test_a_record_too_large_for_the_producer_is_refused_not_an_outage() -> None:
    producer = AsyncProducer(
        "127.0.0.1:1", client_id="test", extra={"message.max.bytes": 1000}
    )  # never contacted: the size is checked before the record is queued
    try:
        with pytest.raises(DeliveryFailed) as refused:
            await producer.send_all([("t", "k", b"x" * 5000)])
        assert refused.value.refused
    finally:
        producer.close(timeout=0)


class Committed:
    """Answers the group's committed offsets, as a consumer would after an assignment."""

    def committed(self, partitions: list[TopicPartition], _timeout: float) -> list[Any]:
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]


async def test_assignment_hooks_run_once_the_group_hands_partitions_out_not_on_a_revocation(
    tmp_path: Path,
) -> None:
    worker = StreamWorker(
        "app",
        StreamSettings(data_dir=tmp_path),
        Producer(),  # type: ignore[arg-type]
        ManualClock(datetime(2026, 12, 2, tzinfo=UTC)),
        service="test",
        transactional=True,  # its batches commit their own offsets: none on revocation
    )

    async def process(_records: list[Record]) -> None:
        return None

    worker.consume(["in"], process)
    every: list[frozenset[int]] = []
    handed_out: list[frozenset[int]] = []
    worker.on_assigned(every.append)
    worker.on_assignment(handed_out.append)
    consumer: Any = Committed()

    worker._on_assign(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)
    worker._on_revoke(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)  # a rebalance under way: nothing handed out yet
    worker._on_assign(consumer, [TopicPartition("in", 1)])
    await worker._settle(consumer)

    assert every == [frozenset({0, 1}), frozenset(), frozenset({1})]
    assert handed_out == [frozenset({0, 1}), frozenset({1})]
    assert worker._positions.next[("in", 1)] == 7

    # A revocation and the next assignment in one poll: one settled assignment.
    worker._on_revoke(consumer, [TopicPartition("in", 1)])
    worker._on_assign(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)
    # An assignment revoked again within the same poll: nothing settled yet.
    worker._on_revoke(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    worker._on_assign(consumer, [TopicPartition("in", 0)])
    worker._on_revoke(consumer, [TopicPartition("in", 0)])
    await worker._settle(consumer)
    # Partitions lost (a session timed out, in a broker outage say) wait for the assignment
    # that follows, like a revocation: a lone worker gets them all back.
    worker._on_assign(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)
    worker._on_lost(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)
    worker._on_assign(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)

    assert handed_out[2:] == [frozenset({0, 1}), frozenset({0, 1}), frozenset({0, 1})]
    assert every[3:] == [
        frozenset({0, 1}),
        frozenset(),
        frozenset({0, 1}),
        frozenset(),
        frozenset({0, 1}),
    ]


async def test_a_partition_is_held_since_it_was_last_taken_with_no_revocation_or_loss_between(
    tmp_path: Path,
) -> None:
    clock = ManualClock(datetime(2026, 12, 2, tzinfo=UTC))
    worker = StreamWorker(
        "app",
        StreamSettings(data_dir=tmp_path),
        Producer(),  # type: ignore[arg-type]
        clock,
        service="test",
        transactional=True,
    )

    async def process(_records: list[Record]) -> None:
        return None

    worker.consume(["in"], process)
    consumer: Any = Committed()
    taken = clock.now()
    worker._on_assign(consumer, [TopicPartition("in", 0)])
    await worker._settle(consumer)
    assert (worker.held_since(0), worker.held_since(1)) == (taken, None)

    # Partition 1 joins later; 0 stays held through that assignment.
    clock.advance(timedelta(seconds=10))
    worker._on_assign(consumer, [TopicPartition("in", 1)])
    await worker._settle(consumer)
    assert (worker.held_since(0), worker.held_since(1)) == (taken, clock.now())

    # Revoked and handed back within one poll: another worker may have held it between.
    clock.advance(timedelta(seconds=10))
    worker._on_revoke(consumer, [TopicPartition("in", 0)])
    worker._on_assign(consumer, [TopicPartition("in", 0)])
    await worker._settle(consumer)
    assert worker.held_since(0) == clock.now()

    # Lost (a session timed out), then given back by the next assignment: taken anew.
    clock.advance(timedelta(seconds=10))
    worker._on_lost(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)
    assert (worker.held_since(0), worker.held_since(1)) == (None, None)
    clock.advance(timedelta(seconds=10))
    worker._on_assign(consumer, [TopicPartition("in", 0), TopicPartition("in", 1)])
    await worker._settle(consumer)
    assert worker.held_since(0) == worker.held_since(1) == clock.now()


class Transactions(Producer):
    """A transactional producer that says yes, counting each proof of ownership asked of the
    group; `refuse` fails the next commit."""

    def __init__(self) -> None:
        super().__init__()
        self.proofs = 0
        self.commits = 0
        self.aborts = 0
        self.refuse = False
        self.open = False
        self.proving = asyncio.Event()
        self.proof_may_end = asyncio.Event()
        self.proof_may_end.set()
        self.proof_ended = False

    def begin_transaction(self) -> None:
        # As librdkafka: a transaction left open (neither committed nor aborted) is refused.
        assert not self.open, "the last batch's transaction was left open"
        self.open = True

    async def prove_offsets(self, _offsets: list[TopicPartition], _group: Any) -> None:
        self.proofs += 1
        self.proving.set()
        await self.proof_may_end.wait()
        self.proof_ended = True

    async def commit_transaction(self, _offsets: list[TopicPartition], _group: Any) -> None:
        if self.refuse:
            self.refuse = False
            raise RuntimeError("the broker went away")
        self.commits += 1
        self.open = False

    async def abort_transaction(self) -> None:
        assert self.proof_ended or not self.proving.is_set(), "a proof was still under way"
        self.aborts += 1
        self.open = False


class Member:
    """A consumer of the group, as far as a transactional batch asks it."""

    def consumer_group_metadata(self) -> object:
        return object()

    def seek(self, _partition: TopicPartition) -> None:
        return None


def _transactional_worker(folder: Path, producer: Transactions) -> StreamWorker:
    return StreamWorker(
        "app",
        StreamSettings(data_dir=folder),
        producer,  # type: ignore[arg-type]
        ManualClock(datetime(2026, 12, 2, tzinfo=UTC)),
        service="test",
        transactional=True,
    )


async def test_a_commit_proves_ownership_for_the_next_batch_until_the_assignment_changes(
    tmp_path: Path,
) -> None:
    """The group hands a member's partitions on only through its rebalance callbacks (or once
    its session ended, which the lease bounds): a batch right after a commit, with no
    callback between, does not ask the group again before its first provider call."""
    producer = Transactions()
    worker = _transactional_worker(tmp_path, producer)

    async def call_a_provider(_records: list[Record]) -> None:
        await worker.prove_owner(0.0)

    worker.consume(["in"], call_a_provider)
    member: Any = Member()
    worker._consumer = member
    records = [Record("in", 0, 5, "k", b"v")]

    await worker._handle_transaction(member, records)
    assert (producer.proofs, producer.commits) == (1, 1)  # the first batch asks

    await worker._handle_transaction(member, records)
    assert (producer.proofs, producer.commits) == (1, 2)  # the commit stands for it

    worker._on_assign(member, [TopicPartition("in", 0)])
    await worker._handle_transaction(member, records)
    assert producer.proofs == 2  # the assignment changed since: asked again

    worker._on_revoke(member, [TopicPartition("in", 0)])
    worker._on_assign(member, [TopicPartition("in", 0)])
    await worker._handle_transaction(member, records)
    assert producer.proofs == 3

    worker.owner_lease_seconds = 0.0  # the lease ran out since the last commit
    await worker._handle_transaction(member, records)
    assert producer.proofs == 4
    worker.owner_lease_seconds = 3600.0

    producer.refuse = True  # a batch that fails proves nothing for the next one
    with pytest.raises(RuntimeError):
        await worker._handle_transaction(member, records)
    await worker._handle_transaction(member, records)
    assert producer.proofs == 5
    await worker._handle_transaction(member, records)
    assert producer.proofs == 5

    # A revocation or a loss ends the lease at once: a call kept running past a failed batch
    # that has not written its request yet finds it lapsed at its last check.
    assert worker.owner_within_lease()
    worker._on_revoke(member, [TopicPartition("in", 0)])
    assert not worker.owner_within_lease()
    worker._on_assign(member, [TopicPartition("in", 0)])
    await worker._handle_transaction(member, records)
    assert worker.owner_within_lease()
    worker._on_lost(member, [TopicPartition("in", 0)])
    assert not worker.owner_within_lease()


async def test_a_batch_fenced_by_its_own_check_aborts_its_transaction_after_the_proof_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's last check can end a batch as fenced (a lease that lapsed while the worker was
    stopped) while another task of the batch waits for a proof of ownership: the proof runs to
    its end, the transaction is aborted after it, and the next batch begins."""
    monkeypatch.setattr("shared.streams.RESTORE_RETRY_SECONDS", 0.0)
    producer = Transactions()
    worker = _transactional_worker(tmp_path, producer)
    producer.proof_may_end.clear()

    async def lapsed(_records: list[Record]) -> None:
        proving = asyncio.ensure_future(worker.prove_owner(0.0))
        await producer.proving.wait()
        proving.cancel()  # its task is cut off with the batch
        asyncio.get_running_loop().call_later(0.05, producer.proof_may_end.set)
        raise Fenced("the lease on the partitions lapsed before the call went out")

    worker.consume(["in"], lapsed)
    member: Any = Member()
    worker._consumer = member
    records = [Record("in", 0, 5, "k", b"v")]

    await worker._handle_transaction(member, records)

    assert producer.proof_ended
    assert (producer.aborts, producer.commits, producer.open) == (1, 0, False)

    async def calls(_records: list[Record]) -> None:
        await worker.prove_owner(0.0)

    worker._processors["in"] = calls
    await worker._handle_transaction(member, records)  # begins: nothing left open
    assert (producer.commits, producer.proofs) == (1, 2)


class Wedging(Transactions):
    """Its commit never returns (`ProducerWedged`); a proof under way then ends once the
    producer is replaced, as `AsyncProducer` ends it (`TransactionDoomed`)."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed: list[str] = []

    async def prove_offsets(self, _offsets: list[TopicPartition], _group: Any) -> None:
        self.proofs += 1
        self.proving.set()
        await self.proof_may_end.wait()
        raise TransactionDoomed("the producer was replaced while the call was retried")

    async def commit_transaction(self, _offsets: list[TopicPartition], _group: Any) -> None:
        raise ProducerWedged("a transactional call blocked for more than 60 s")

    def renew(self, reason: str) -> None:
        self.renewed.append(reason)
        self.open = False

    async def init_transactions(self) -> None:
        return None


async def test_a_proof_left_by_a_wedged_batch_ends_logged_not_unretrieved(
    tmp_path: Path,
) -> None:
    """The batch does not wait for a proof blocked in the wedged producer; what the proof ends
    with later belongs to no batch: logged, never an exception asyncio reports unretrieved."""
    producer = Wedging()
    worker = _transactional_worker(tmp_path, producer)
    producer.proof_may_end.clear()
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))

    proofs: list[asyncio.Future[None]] = []

    async def proving_then_cut_off(_records: list[Record]) -> None:
        waiter = asyncio.ensure_future(worker.prove_owner(0.0))
        await producer.proving.wait()
        assert worker._proof is not None
        proofs.append(worker._proof)
        waiter.cancel()  # the call that asked is cut off; the proof runs on

    worker.consume(["in"], proving_then_cut_off)
    member: Any = Member()
    worker._consumer = member
    try:
        with capture_logs() as logs:
            await worker._handle_transaction(member, [Record("in", 0, 5, "k", b"v")])
            assert producer.renewed == ["wedged"]
            producer.proof_may_end.set()
            # Its logging callback was added before `wait`'s own, so it has run by then.
            await asyncio.wait(proofs, timeout=10)
        proofs.clear()
        gc.collect()  # a future never retrieved is reported as it is collected
    finally:
        loop.set_exception_handler(previous)
    (ended,) = [e for e in logs if e["event"] == "stream.dropped_proof_ended"]
    assert "replaced" in ended["error"]
    assert unhandled == []
