"""Each try's intent (`Dispatcher._durable`): the try's `sending` mark is made durable before its
call by an intent in the receipts topic, while the mark itself commits with the batch. A worker
that takes the partition after a crash reads the intents written since the last commit and puts
the marks the ledger lacks back in it, so the try is found `sending`, as if its mark had
committed: concluded from its receipt, or taken for stopped, never sent again.

Real RocksDB tables of a table; the worker around the dispatcher is played by the test (a batch
commits: its staged writes are applied; a kill: they are dropped); the receipts topic is kept in
memory (`tests.unit.receipts_log.Log`, the same contract as `adapters.receipts.CallReceipts`,
whose Kafka side the e2e tests cover)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.dispatcher.adapters.metrics import DispatchMetrics
from services.dispatcher.adapters.tables import FORGOTTEN_KEY
from services.dispatcher.handlers import RECEIPT_REASON, Dispatcher
from shared.kafka import DeliveryFailed, Record
from shared.streams import focus
from tests.unit.receipts_log import Log
from tests.unit.test_dispatcher_reports import T0, Counting, Reports, _sms_request, made_reports


class Worker:
    """A dispatcher over the tables of `made`, with `log` as its receipts topic and an SMS
    provider that counts what it was sent (`sent`, shared by every worker of a test)."""

    def __init__(self, made: Reports, log: Log, sent: Counting) -> None:
        first = made.dispatcher
        self.made = made
        self.dispatcher = Dispatcher(
            first.settings,
            first.clock,
            first.stores,
            {"sms": sent},
            first.links,
            first.producer,
            first.dead_letters,
            DispatchMetrics(),
            time.monotonic,
            receipts=log,
        )
        self.dispatcher.on_assignment(frozenset({0}))

    async def batch(self, *message_ids: str, commit: bool = True) -> None:
        """One batch of the requests `message_ids`; committed, or lost with a kill."""
        records = [
            Record("waypost.send-requests.v1", 0, 10 + i, "ada", _sms_request(m).to_wire())
            for i, m in enumerate(message_ids)
        ]
        await self.dispatcher.process(records, _owner)
        await asyncio.sleep(0)  # the receipts, written by the calls' own callbacks
        for table in self.made.tables.values():
            if commit:
                table.apply(0, None)
            else:
                table.discard_staged()

    async def entry(self, message_id: str) -> dict[str, Any]:
        focus(0)
        found = await self.dispatcher.ledger.get(message_id)
        assert found is not None
        return found


async def _owner(*_: float) -> None:
    return None


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[Reports]:
    async with made_reports(tmp_path) as reports:
        yield reports


async def test_a_try_whose_batch_never_committed_is_concluded_from_its_receipt_once(
    made: Reports,
) -> None:
    """The first worker called and the call answered, then it died before its batch
    committed: the ledger holds nothing of the message. The next worker puts the intent's mark
    back, finds the receipt and concludes `sent`; it sends nothing."""
    log, sent = Log(), Counting()
    await Worker(made, log, sent).batch("m-1", commit=False)
    assert sent.sent == ["m-1"]

    after = Worker(made, log, sent)
    await after.batch("m-1")

    assert sent.sent == ["m-1"]
    entry = await after.entry("m-1")
    assert (entry["state"], entry["reason"]) == ("sent", RECEIPT_REASON)


async def test_a_try_on_the_wire_when_its_worker_died_ends_unknown_not_sent_again(
    made: Reports,
) -> None:
    """No receipt: the call may have arrived. A marketing SMS that cannot be asked about ends
    `unknown`, as a try whose mark had committed would."""
    log, sent = Log(), Counting()
    log.lose_receipts = True
    await Worker(made, log, sent).batch("m-2", commit=False)

    after = Worker(made, log, sent)
    await after.batch("m-2")

    assert sent.sent == ["m-2"]
    assert (await after.entry("m-2"))["state"] == "unknown"


async def test_each_commit_says_where_the_next_worker_reads_intents_from(
    made: Reports,
) -> None:
    """Intents before that offset are of marks the ledger holds: the next worker reads only
    what came after, and a batch that committed is not touched again."""
    log, sent = Log(), Counting()
    first = Worker(made, log, sent)
    await first.batch("m-3")  # committed: its intent (offset 0) is behind
    await first.batch("m-4", commit=False)

    after = Worker(made, log, sent)
    await after.batch("m-4")

    # The first read, with nothing committed: from the oldest; then past m-3's intent.
    assert log.read_from == [None, 1]
    assert sent.sent == ["m-3", "m-4"]
    assert [(await after.entry(m))["state"] for m in ("m-3", "m-4")] == ["sent", "sent"]


async def test_an_intent_whose_mark_the_ledger_holds_changes_nothing(made: Reports) -> None:
    """Read from the oldest record (nothing said where to start), an intent of a try that
    committed and concluded is older than its entry: the entry stays as it is."""
    log, sent = Log(), Counting()
    await Worker(made, log, sent).batch("m-5")
    made.tables["intents"].discard_staged()
    focus(0)
    before = await made.dispatcher.ledger.get("m-5")

    after = Worker(made, log, sent)
    await after.batch()  # a batch of none of its records: the intents are read all the same

    assert await after.entry("m-5") == before
    assert sent.sent == ["m-5"]


async def test_an_intent_that_could_not_be_written_makes_no_call_until_one_is(
    made: Reports,
) -> None:
    """The broker did not acknowledge the intent (an outage): no call goes out on it. The
    request is tried again as the outage passes, under a new try, and sent once."""
    log, sent = Log(), Counting()
    worker = Worker(made, log, sent)
    log.fail_intents.append(DeliveryFailed("timed out"))

    await worker.batch("m-6")

    assert sent.sent == ["m-6"]
    assert log.intents_of("m-6") == 1
    entry = await worker.entry("m-6")
    assert entry["state"] == "sent"
    assert entry["try"] != "1:first"  # the try whose intent may have been written is not reused


async def test_an_erased_contacts_mark_is_put_back_without_its_key(made: Reports) -> None:
    """The contact was erased after the worker died: the mark put back from the intent keeps
    nothing of it, like every other entry of the contact."""
    log, sent = Log(), Counting()
    log.lose_receipts = True
    await Worker(made, log, sent).batch("m-7", commit=False)
    focus(0)
    await made.forgotten.record("ada", T0)
    made.tables["forgotten"].apply(0, None)

    after = Worker(made, log, sent)
    await after.batch()

    entry = await after.entry("m-7")
    assert (entry["state"], entry["contact_key"]) == ("sending", FORGOTTEN_KEY)
    assert log.intents_of("m-7") == 1
