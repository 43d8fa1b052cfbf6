"""The dispatcher's delivery reports (`Dispatcher.on_report`): consent changes and erasures are
acted on only when Waypost sent them; the same names from anywhere else are dropped with a
warning. Then a try's way to its provider call and back: call slots, calls kept past a failed
batch, tries parked before their call, staged messages, receipts. The tables are real RocksDB
databases of a table (no broker); the template store and the suppression list are real clients
that are never connected (no report reads them); the receipts topic, where a try's intent makes
its mark durable and its call's receipt is written, is kept in memory
(`tests.unit.receipts_log.Log`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from structlog.testing import capture_logs

from services.dispatcher import handlers
from services.dispatcher.adapters.metrics import TRY_STEPS, DispatchMetrics
from services.dispatcher.adapters.store import Templates
from services.dispatcher.adapters.suppressions import SuppressionList
from services.dispatcher.adapters.tables import (
    Caps,
    Consent,
    ForgottenContacts,
    IntentsFrom,
    Ledger,
)
from services.dispatcher.channels.sms.domain import SmsContent
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.handlers import (
    OWNER_LEASE_LEFT_BEFORE_INTENT,
    RECEIPT_REASON,
    Called,
    Dispatcher,
    LeaseLapsed,
    Stores,
    _begun,
    _WholeCall,
)
from services.dispatcher.settings import DispatcherSettings
from shared.clock import ManualClock
from shared.contracts import Channel, Event, Profile, SendRequest, SendRetry, TestSend
from shared.deadletter import DeadLetters
from shared.kafka import CompactedTopicView, Record, TransactionDoomed
from shared.links import LinkSigner
from shared.streams import Fenced, Table, focus
from shared.system_events import CONTACT_FORGOTTEN, UNSUBSCRIBED
from shared.topics import DELIVERY_REPORTS, SEND_RETRIES, SUPPRESSIONS
from tests.unit.receipts_log import Log

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
SECRET = b"test-suppression-secret"


class Outbox:
    """The producer as the dead letters see it: keeps what would be sent."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str | None, bytes | None]] = []

    async def send(self, topic: str, key: str | None, value: bytes | None) -> None:
        self.records.append((topic, key, value))

    async def send_all(self, records: Any) -> None:
        self.records.extend(records)

    def retries(self) -> list[SendRetry]:
        """The retry records written, in order."""
        topics = {topic.name for topic in SEND_RETRIES.values()}
        return [
            SendRetry.model_validate_json(value)
            for topic, _key, value in self.records
            if topic in topics and value is not None
        ]


class Reports:
    """A dispatcher over real tables with `log` as its receipts topic, and what its reports left
    in them."""

    def __init__(
        self,
        folder: Path,
        mongo: AsyncMongoClient[dict[str, Any]],
        settings: DispatcherSettings | None = None,
    ) -> None:
        self.tables = {name: Table(name, f"{name}-changelog", folder) for name in TABLES}
        for table in self.tables.values():
            table.open(0)
        clock = ManualClock(T0)
        self.outbox = Outbox()
        self.log = Log()
        self.forgotten = ForgottenContacts(self.tables["forgotten"], SECRET)
        self.consent = Consent(self.tables["consent"])
        stores = Stores(
            Ledger(self.tables["ledger"], _no_gate),
            Templates(mongo["waypost"], time.monotonic),
            Caps(self.tables["caps"]),
            self.consent,
            SuppressionList(
                CompactedTopicView("127.0.0.1:1", SUPPRESSIONS.name),
                self.outbox,  # type: ignore[arg-type]
                SECRET,
            ),
            self.forgotten,
            IntentsFrom(self.tables["intents"]),
        )
        self.dispatcher = Dispatcher(
            settings or DispatcherSettings(),
            clock,
            stores,
            {},
            LinkSigner("test-link-secret", "http://127.0.0.1:8000"),
            self.outbox,  # type: ignore[arg-type]
            DeadLetters(self.outbox, "dispatcher", clock),  # type: ignore[arg-type]
            DispatchMetrics(),
            time.monotonic,
            receipts=self.log,
        )

    async def report(self, event: Event, offset: int = 0) -> None:
        record = Record(DELIVERY_REPORTS.name, 0, offset, event.contact_key, event.to_wire())
        await self.dispatcher.on_report(record)

    def close(self) -> None:
        for table in self.tables.values():
            table.close(0)


TABLES = ("ledger", "caps", "consent", "forgotten", "intents")


async def _no_gate(*_: object) -> None:
    return None


@contextlib.asynccontextmanager
async def made_reports(
    tmp_path: Path, settings: DispatcherSettings | None = None
) -> AsyncIterator[Reports]:
    """A `Reports` over a document store never reached (the dispatcher's state is in its
    tables), its tables addressed at partition 0; closed after."""
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        "mongodb://127.0.0.1:1", connect=False
    )
    focus(0)
    made = Reports(tmp_path, mongo, settings)
    try:
        yield made
    finally:
        made.close()
        focus(None)
        await mongo.close()


@pytest.fixture
async def reports(tmp_path: Path) -> AsyncIterator[Reports]:
    async with made_reports(tmp_path) as made:
        yield made


def report(name: str, source: str | None, message_id: str) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="ada",
        message_id=message_id,
        timestamp=T0,
        received_at=T0,
        properties={"channel": "email"},
        source=source,
    )


@pytest.mark.parametrize("source", ["web", None, "waypostal"])
async def test_an_unsubscribe_or_erasure_not_from_waypost_is_dropped_with_a_warning(
    reports: Reports, source: str | None
) -> None:
    with capture_logs() as logs:
        await reports.report(report(UNSUBSCRIBED, source, "m-1"), 0)
        await reports.report(report(CONTACT_FORGOTTEN, source, "m-2"), 1)

    assert await reports.consent.get("ada", "email") is None
    assert not await reports.forgotten.includes("ada")
    assert [(line["event"], line["name"], line["source"]) for line in logs] == [
        ("dispatcher.forged_report", UNSUBSCRIBED, source),
        ("dispatcher.forged_report", CONTACT_FORGOTTEN, source),
    ]
    assert reports.outbox.records == []  # dropped, not dead-lettered


async def test_the_same_reports_from_waypost_are_acted_on(reports: Reports) -> None:
    await reports.report(report(UNSUBSCRIBED, "waypost", "m-1"), 0)
    consent = await reports.consent.get("ada", "email")
    assert consent is not None
    assert not consent.given

    await reports.report(report(CONTACT_FORGOTTEN, "waypost-segmenter", "m-2"), 1)

    assert await reports.forgotten.includes("ada")
    assert await reports.consent.get("ada", "email") is None  # erased with the contact


# --- calls under way when a batch fails -----------------------------------------------------


async def _never(*_: float) -> None:
    raise AssertionError("no proof of ownership expected")


def _remembered(
    dispatcher: Dispatcher,
    message_id: str,
    call: asyncio.Future[Outcome],
    partition: int | None = None,
) -> None:
    dispatcher._remember(
        message_id,
        Called(1, T0, f"{message_id}@example.com", call, time.monotonic(), partition),
    )


@pytest.mark.parametrize(
    ("failure", "cut_off"),
    [
        (Fenced("UNKNOWN_MEMBER_ID", moved_on=True), True),
        (Fenced("REBALANCE_IN_PROGRESS: the worker may keep its partitions"), False),
        (TransactionDoomed("producer fenced"), False),
    ],
)
async def test_calls_under_way_are_cut_off_only_when_the_group_moved_on(
    reports: Reports, failure: BaseException, cut_off: bool
) -> None:
    """Another worker now handles the requests of a partition that moved: no call of this one
    may still go out. After any other failure (a rebalance under way, a fenced producer) this
    worker may read the requests again and conclude them with the calls' own answers."""
    loop = asyncio.get_running_loop()
    under_way: asyncio.Future[Outcome] = loop.create_future()
    answered: asyncio.Future[Outcome] = loop.create_future()
    answered.set_result(Outcome("sent", None))
    dispatcher = reports.dispatcher
    _remembered(dispatcher, "m-1", under_way)
    _remembered(dispatcher, "m-2", answered)

    async def failing(_record: Record) -> None:
        raise failure

    dispatcher.on_report = failing  # type: ignore[method-assign]
    record = Record(DELIVERY_REPORTS.name, 0, 0, "ada", b"{}")
    with pytest.raises(type(failure)):
        await dispatcher.process([record], _never)

    assert under_way.cancelled() is cut_off
    assert ("m-1" in dispatcher._calls) is not cut_off
    assert "m-2" in dispatcher._calls
    under_way.cancel()


async def test_an_assignment_cuts_off_the_kept_calls_of_partitions_handed_elsewhere(
    reports: Reports,
) -> None:
    """After a failed batch the calls under way run on, for the batch read again; once the
    group hands a partition to another worker, that worker takes their tries for stopped, so
    a call of this one still waiting (for a session, a connection) must never go out."""
    loop = asyncio.get_running_loop()
    calls = {name: loop.create_future() for name in ("kept", "moved", "moved-done", "unplaced")}
    calls["moved-done"].set_result(Outcome("sent", None))
    dispatcher = reports.dispatcher
    _remembered(dispatcher, "m-kept", calls["kept"], partition=0)
    _remembered(dispatcher, "m-moved", calls["moved"], partition=1)
    _remembered(dispatcher, "m-moved-done", calls["moved-done"], partition=1)
    _remembered(dispatcher, "m-unplaced", calls["unplaced"])

    with capture_logs() as logs:
        dispatcher.keep_calls_of(frozenset({0, 2}))

    assert calls["moved"].cancelled()
    assert not calls["kept"].done()
    assert not calls["unplaced"].done()
    assert set(dispatcher._calls) == {"m-kept", "m-unplaced"}
    assert [(line["event"], line["calls"], line["partitions"]) for line in logs] == [
        ("dispatcher.calls_cut_off", 1, [1])
    ]
    dispatcher.keep_calls_of(frozenset({0, 1}))  # nothing more to cut
    assert set(dispatcher._calls) == {"m-kept", "m-unplaced"}
    for call in calls.values():
        call.cancel()


async def test_a_call_under_way_is_never_forgotten_to_make_room(
    reports: Reports, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgotten, a later batch would take its try for stopped while the call could still
    write: the remembered calls may exceed their count while the oldest is under way, and
    make room once it ended."""
    monkeypatch.setattr(handlers, "CALLS_KEPT", 2)
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Outcome] = loop.create_future()
    dispatcher = reports.dispatcher
    _remembered(dispatcher, "m-under-way", pending)
    for n in range(3):
        done: asyncio.Future[Outcome] = loop.create_future()
        done.set_result(Outcome("sent", None))
        _remembered(dispatcher, f"m-done-{n}", done)

    assert list(dispatcher._calls) == ["m-under-way", "m-done-0", "m-done-1", "m-done-2"]
    pending.set_result(Outcome("sent", None))
    _remembered(dispatcher, "m-next", pending)
    assert list(dispatcher._calls) == ["m-done-2", "m-next"]


# --- call slots --------------------------------------------------------------------------------


def test_each_channel_has_its_own_limit_of_calls_in_flight_or_the_common_one() -> None:
    settings = DispatcherSettings(max_in_flight=8, max_in_flight_sms=256)
    assert {c: settings.in_flight(c) for c in ("email", "sms", "push", "wechat")} == {
        "email": 8,
        "sms": 256,
        "push": 24,
        "wechat": 8,
    }
    assert DispatcherSettings(max_in_flight_push="").in_flight("push") == 192  # type: ignore[arg-type]


def test_sms_and_push_take_three_times_the_common_limit_unless_they_have_their_own() -> None:
    """Their calls are short HTTP requests, of which a worker keeps many in flight."""
    assert DispatcherSettings().in_flight("sms") == 192
    assert DispatcherSettings().in_flight("push") == 192
    assert DispatcherSettings(max_in_flight=8).in_flight("sms") == 24
    assert DispatcherSettings(max_in_flight=8, max_in_flight_sms=3).in_flight("sms") == 3
    assert DispatcherSettings(max_in_flight=8, max_in_flight_push=5).in_flight("push") == 5
    assert DispatcherSettings().in_flight("email") == 64
    assert DispatcherSettings().in_flight("wechat") == 64


async def test_a_channel_whose_slots_are_all_taken_holds_back_no_other_channel(
    tmp_path: Path,
) -> None:
    """A slow provider fills its own channel's slots; sends on the other channels go on."""
    settings = DispatcherSettings(max_in_flight=1, max_in_flight_sms=2)
    async with made_reports(tmp_path, settings) as made:
        dispatcher = made.dispatcher
        async with asyncio.timeout(5), dispatcher._call_slot("email", 0):
            async with dispatcher._call_slot("sms", 0), dispatcher._call_slot("sms", 0):
                async with asyncio.timeout(5):
                    async with dispatcher._call_slot("push", 0):
                        pass  # not held back by the busy email and SMS slots
                third_sms = asyncio.ensure_future(_hold(dispatcher, "sms"))
                second_email = asyncio.ensure_future(_hold(dispatcher, "email"))
                await asyncio.sleep(0)  # both run until they wait for a slot
                assert not third_sms.done()
                assert not second_email.done()
            async with asyncio.timeout(5):
                await third_sms  # an SMS slot came free
            assert not second_email.done()
        async with asyncio.timeout(5):
            await second_email


async def _hold(dispatcher: Dispatcher, channel: Channel) -> None:
    async with dispatcher._call_slot(channel, 0):
        pass


class Answering:
    """A provider that answers each send at once."""

    channel: Channel = "sms"

    async def send(self, delivery: Delivery) -> Outcome:
        return Outcome("sent", None)


async def test_a_call_is_remembered_with_the_partition_of_its_request(tmp_path: Path) -> None:
    async with made_reports(tmp_path) as made:
        dispatcher = made.dispatcher
        dispatcher.providers = {"sms": Answering()}
        dispatcher._prove_owner = _no_gate  # inside a batch that still owns its partitions
        delivery = Delivery("m-1", "ada", "sms", "+15550001", SmsContent(body="Hi"))
        focus(3)
        whole = _WholeCall(dispatcher.providers["sms"], delivery)
        outcome = await dispatcher._call("sms", whole, delivery, 1, T0, "1:first")
        assert outcome == Outcome("sent", None)
        assert dispatcher._calls["m-1"].partition == 3
        dispatcher.keep_calls_of(frozenset({0}))  # done, of a partition now elsewhere: forgotten
        assert "m-1" not in dispatcher._calls


class Counting:
    """A provider that answers each send at once and keeps the message ids it was sent."""

    channel: Channel = "sms"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, delivery: Delivery) -> Outcome:
        self.sent.append(delivery.message_id)
        return Outcome("sent", None)


def _sms_request(message_id: str) -> SendRequest:
    return SendRequest(
        message_id=message_id,
        contact_key="ada",
        channel="sms",
        template_id="t-sms",
        journey_id="j1",
        journey_version=1,
        instance_id="i1",
        step_id="s1",
        profile=Profile(contact_key="ada", first_seen=T0, last_seen=T0, updated_at=T0),
        requested_at=T0,
        test=TestSend(address="+15550001", content={"channel": "sms", "text": "Hi"}),
    )


class Parking:
    """A dispatcher over real tables that makes each try's mark durable by its intent in `log`,
    as it does within a batch (`Dispatcher.process`); the next intent (`log.fail_intents`), the
    next proof of ownership before an intent (`before_intent`) or before a call (`before_call`)
    fails once per failure listed. Its SMS provider counts what it was sent."""

    def __init__(self, made: Reports) -> None:
        self.dispatcher, self.ledger, self.log = made.dispatcher, made.dispatcher.ledger, made.log
        self.provider = Counting()
        self.dispatcher.providers = {"sms": self.provider}
        self.before_intent: list[BaseException] = []
        self.before_call: list[BaseException] = []
        self.ledger.use_gate(self.dispatcher._durable)
        self.dispatcher._prove_owner = self._prove

    async def _prove(self, fresh_for: float) -> None:
        before_intent = fresh_for == OWNER_LEASE_LEFT_BEFORE_INTENT
        failures = self.before_intent if before_intent else self.before_call
        if failures:
            raise failures.pop()

    async def handle(self, message_id: str) -> None:
        request = _sms_request(message_id)
        record = Record("waypost.send-requests.v1", 0, 7, "ada", request.to_wire())
        await self.dispatcher.handle(request, record)

    async def entry(self, message_id: str) -> dict[str, Any]:
        return dict(await self.ledger.get(message_id) or {})

    async def state(self, message_id: str) -> tuple[object, object]:
        entry = await self.entry(message_id)
        return entry.get("state"), entry.get("attempt")


@pytest.fixture
async def parking(tmp_path: Path) -> AsyncIterator[Parking]:
    async with made_reports(tmp_path) as made:
        yield Parking(made)


class Ticking:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Slow:
    """An SMS provider whose every call takes `seconds` of `clock`."""

    channel: Channel = "sms"

    def __init__(self, clock: Ticking, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    async def send(self, delivery: Delivery) -> Outcome:
        self.clock.now += self.seconds
        return Outcome("sent", None)


class SlowLog(Log):
    """A receipts topic whose every intent takes `seconds` of `clock` to be acknowledged."""

    def __init__(self, clock: Ticking, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    async def intend(self, partition: int, message_id: str, rev: int, entry: bytes) -> int:
        self.clock.now += self.seconds
        return await super().intend(partition, message_id, rev, entry)


async def test_each_step_of_a_try_is_timed_by_channel(parking: Parking) -> None:
    """Waiting for a slot, staging, making its mark durable (its intent), the call and coming
    back in: an operator reads from these which one holds the channel's rate back."""
    clock = Ticking()
    dispatcher = parking.dispatcher
    dispatcher._monotonic = clock
    dispatcher.providers = {"sms": Slow(clock, 0.2)}
    dispatcher.receipts = SlowLog(clock, 0.03)

    await parking.handle("m-timed")

    registry = dispatcher.metrics.registry

    def sample(step: str, suffix: str) -> float | None:
        labels = {"channel": "sms", "step": step}
        return registry.get_sample_value(f"waypost_dispatcher_try_step_seconds_{suffix}", labels)

    assert [sample(step, "count") for step in TRY_STEPS] == [1.0] * len(TRY_STEPS)
    seconds = {step: sample(step, "sum") for step in TRY_STEPS}
    assert seconds == {
        "slot": 0.0,
        "stage": 0.0,
        "mark": pytest.approx(0.03),
        "call": pytest.approx(0.2),
        "back": 0.0,
    }


@pytest.mark.parametrize("failure", [RuntimeError("intent timed out"), asyncio.CancelledError()])
async def test_a_try_whose_intent_failed_before_its_call_is_made_when_read_again(
    parking: Parking, failure: BaseException
) -> None:
    """The intent that makes the try's `sending` mark durable failed after the marker was
    written (unacknowledged in a broker outage, or the batch cancelled while it waited); it
    may have been written all the same, and the marker is in the ledger when the request is
    read again (the record retried through the outage, or the intent put back). Read again,
    the try is made, once, under an intent of its own: not concluded `unknown` without ever
    reaching the provider."""
    parking.log.fail_intents.append(failure)
    with pytest.raises(type(failure)):
        await parking.handle("m-parked")
    assert parking.provider.sent == []
    assert await parking.state("m-parked") == ("sending", 1)
    assert parking.log.intents_of("m-parked") == 0

    await parking.handle("m-parked")  # the batch, read again

    assert parking.provider.sent == ["m-parked"]
    assert await parking.state("m-parked") == ("sent", 1)
    assert parking.log.intents_of("m-parked") == 1
    await parking.handle("m-parked")  # and again: nothing more
    assert parking.provider.sent == ["m-parked"]


@pytest.mark.parametrize("before", ["intent", "call"])
async def test_a_try_whose_proof_of_ownership_failed_is_made_when_read_again(
    parking: Parking, before: str
) -> None:
    """The marker was written, then the proof of ownership before its intent, or (the intent
    acknowledged) before its call, failed (the group could not be asked): no call was made, so
    the batch read again makes it, once."""
    failures = parking.before_intent if before == "intent" else parking.before_call
    failures.append(RuntimeError("the coordinator did not answer"))
    with pytest.raises(RuntimeError):
        await parking.handle("m-proof")
    assert await parking.state("m-proof") == ("sending", 1)
    await parking.handle("m-proof")
    assert parking.provider.sent == ["m-proof"]
    assert await parking.state("m-proof") == ("sent", 1)


async def test_a_parked_try_of_a_partition_handed_elsewhere_is_forgotten(
    parking: Parking,
) -> None:
    """Its new owner decides what the marker means; back here later, the try is taken for
    stopped like any other (a marketing SMS that cannot be asked about: unknown)."""
    parking.log.fail_intents.append(RuntimeError("intent timed out"))
    with pytest.raises(RuntimeError):
        await parking.handle("m-moved")
    parking.dispatcher.keep_calls_of(frozenset({1, 2}))
    await parking.handle("m-moved")
    assert parking.provider.sent == []
    assert await parking.state("m-moved") == ("unknown", 1)


async def test_the_same_marker_written_by_another_worker_is_not_taken_for_the_parked_one(
    parking: Parking,
) -> None:
    """While this worker was out of its group (a broker outage), another one held the
    partition, found the entry `requested` (this worker's transaction aborted), marked the same
    first try ("1:first") at its own time and called, then failed before its outcome committed.
    Back here, that marker is not this worker's parked one: no second send."""
    parking.log.fail_intents.append(RuntimeError("intent timed out"))
    with pytest.raises(RuntimeError):
        await parking.handle("m-twice")
    # The other worker's marker: the same try id, its own time.
    entry = parking.ledger._read("m-twice")
    assert entry is not None
    later = T0 + timedelta(seconds=3)
    parking.ledger._move("m-twice", entry, "sending", later, **{"try": "1:first"})
    parking.dispatcher.keep_calls_of(frozenset({0}))  # the partition is back here

    await parking.handle("m-twice")

    assert parking.provider.sent == []
    assert await parking.state("m-twice") == ("unknown", 1)


class StagedSms:
    """What `Staging` staged for one message: finished or abandoned, never both."""

    def __init__(self, provider: Staging, message_id: str) -> None:
        self.provider, self.message_id = provider, message_id

    def start(self) -> None:
        pass

    async def finish(self) -> Outcome:
        self.provider.sent.append(self.message_id)
        self.provider.marked_at_finish.append(self.provider.state_of(self.message_id))
        return Outcome("sent", None)

    def abandon(self) -> None:
        self.provider.abandoned.append(self.message_id)


class Staging:
    """A provider that stages its calls (`StagingProvider`), as SMTP does up to the final ".":
    it keeps the ledger state each message had when staged and when finished, what it
    finished and what it abandoned, and refuses the addresses in `refuse` when staging."""

    channel: Channel = "sms"

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger
        self.sent: list[str] = []
        self.abandoned: list[str] = []
        self.marked_at_stage: list[object] = []
        self.marked_at_finish: list[object] = []
        self.refuse: set[str] = set()

    def state_of(self, message_id: str) -> object:
        return (self.ledger._read(message_id) or {}).get("state")

    async def send(self, delivery: Delivery) -> Outcome:
        raise AssertionError("a staging provider is staged, then finished")

    async def stage(self, delivery: Delivery) -> StagedSms | Outcome:
        self.marked_at_stage.append(self.state_of(delivery.message_id))
        if delivery.address in self.refuse:
            return Outcome("recipient", "550 no such mailbox", code="550")
        return StagedSms(self, delivery.message_id)


@pytest.fixture
def staging(parking: Parking) -> Staging:
    provider = Staging(parking.ledger)
    parking.dispatcher.providers = {"sms": provider}
    return provider


async def test_a_staged_call_is_marked_sending_between_its_stage_and_its_end(
    parking: Parking, staging: Staging
) -> None:
    await parking.handle("m-staged")
    assert staging.marked_at_stage == ["requested"]  # staged before the mark
    assert staging.marked_at_finish == ["sending"]  # finished once durable
    assert (staging.sent, staging.abandoned) == (["m-staged"], [])
    assert await parking.state("m-staged") == ("sent", 1)


async def test_a_refusal_while_staging_concludes_the_try_without_marking_it(
    parking: Parking, staging: Staging
) -> None:
    staging.refuse.add("+15550001")
    await parking.handle("m-refused")
    entry = await parking.ledger.get("m-refused")
    assert entry is not None
    assert entry["state"] == "failed"
    assert "try" not in entry  # never `sending`: nothing could have arrived
    assert (staging.sent, staging.abandoned) == ([], [])


@pytest.mark.parametrize("failure", ["intent", "proof before the intent", "proof before the call"])
async def test_a_staged_call_whose_intent_or_proof_failed_is_abandoned_then_made_once(
    parking: Parking, staging: Staging, failure: str
) -> None:
    """The intent that makes its mark durable failed, or a proof of ownership (before the
    intent, or before its last step): the staged message is dropped unsent, and the batch read
    again stages and sends it once."""
    failures = {
        "intent": parking.log.fail_intents,
        "proof before the intent": parking.before_intent,
        "proof before the call": parking.before_call,
    }[failure]
    failures.append(RuntimeError("timed out"))
    with pytest.raises(RuntimeError):
        await parking.handle("m-dropped")
    assert (staging.sent, staging.abandoned) == ([], ["m-dropped"])

    await parking.handle("m-dropped")  # the batch, read again

    assert (staging.sent, staging.abandoned) == (["m-dropped"], ["m-dropped"])
    assert await parking.state("m-dropped") == ("sent", 1)


async def test_a_staged_call_cut_off_before_it_started_is_abandoned(
    tmp_path: Path,
) -> None:
    async with made_reports(tmp_path) as made:
        dispatcher = made.dispatcher
        provider = Staging(dispatcher.ledger)
        dispatcher.providers = {"sms": provider}
        dispatcher._prove_owner = _no_gate
        delivery = Delivery("m-cut", "ada", "sms", "+15550001", SmsContent(body="Hi"))
        staged = await dispatcher._stage("sms", delivery)
        assert isinstance(staged, StagedSms)
        calling = asyncio.ensure_future(dispatcher._call("sms", staged, delivery, 1, T0, "1:a"))
        await asyncio.sleep(0)  # the call is made (a task of its own) but has not started yet
        dispatcher._cut_off_calls()
        with pytest.raises(asyncio.CancelledError):
            await calling
        assert (provider.sent, provider.abandoned) == ([], ["m-cut"])


async def _left_sending(parking: Parking, request: SendRequest, try_id: str) -> None:
    """The entry as a worker killed during the call leaves it: claimed, marked (its intent
    written), no outcome."""
    await parking.ledger.claim(request, T0)
    assert await parking.ledger.begin(request.message_id, try_id, 1, T0)


async def test_an_answered_call_leaves_a_receipt_of_its_try_in_its_partition(
    parking: Parking,
) -> None:
    await parking.handle("m-answered")
    await asyncio.sleep(0)  # the receipt is written by the call's own callback
    assert parking.log.receipts(0) == [("m-answered", "1:first", Outcome("sent", None))]
    assert set(parking.log.records) == {0}


async def test_a_receipt_keeps_no_address_the_providers_reason_quotes(
    parking: Parking,
) -> None:
    parking.dispatcher.providers = {"sms": Refusing("21211 +15550001 is not a valid number")}
    await parking.handle("m-refused")
    await asyncio.sleep(0)
    [(message_id, try_id, outcome)] = parking.log.receipts(0)
    assert (message_id, try_id, outcome.kind) == ("m-refused", "1:first", "recipient")
    assert outcome.reason == "21211 <address> is not a valid number"


async def test_a_call_that_could_not_be_written_leaves_a_receipt_that_it_never_left(
    parking: Parking,
) -> None:
    parking.dispatcher.providers = {"sms": Unwritable()}
    await parking.handle("m-unsendable")
    await asyncio.sleep(0)
    [(message_id, try_id, outcome)] = parking.log.receipts(0)
    assert (message_id, try_id, outcome.kind) == ("m-unsendable", "1:first", "skipped")
    assert outcome.reason == "unsendable: sms: ValueError: a header the library refuses"


class Unwritable:
    """An SMS provider that cannot write the request at all."""

    channel: Channel = "sms"

    async def send(self, delivery: Delivery) -> Outcome:
        raise ValueError("a header the library refuses")


class Refusing:
    """An SMS provider that refuses every number, quoting it."""

    channel: Channel = "sms"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def send(self, delivery: Delivery) -> Outcome:
        return Outcome("recipient", self.reason, code="21211", address_invalid=True)


async def test_a_try_left_sending_with_a_receipt_is_concluded_from_it_not_unknown(
    parking: Parking,
) -> None:
    """The killed worker's call answered and its receipt was written, but the commit that
    would have held the outcome never came: the new owner concludes the try `sent`, saying
    so, and sends nothing."""
    await _left_sending(parking, _sms_request("m-receipt"), "1:first")
    parking.log.record(0, "m-receipt", "1:first", Outcome("sent", None, provider_id="SM1"))

    await parking.handle("m-receipt")

    assert parking.provider.sent == []
    entry = await parking.ledger.get("m-receipt")
    assert entry is not None
    assert (entry["state"], entry.get("provider_id")) == ("sent", "SM1")
    assert entry["reason"] == RECEIPT_REASON
    assert _stopped(parking, "receipt") == 1


async def test_a_receipt_of_another_try_says_nothing_of_the_one_left_sending(
    parking: Parking,
) -> None:
    await _left_sending(parking, _sms_request("m-other"), "1:first")
    parking.log.record(0, "m-other", "1:earlier", Outcome("sent", None))

    await parking.handle("m-other")

    assert parking.log.asked == ["m-other"]
    assert parking.provider.sent == []
    assert await parking.state("m-other") == ("unknown", 1)  # marketing: not resent
    # A test send's SMS has no provider listing to ask here (`sms_history` unset).
    assert (_stopped(parking, "receipt"), _stopped(parking, "nothing")) == (0, 1)


def _stopped(parking: Parking, settled_by: str) -> float:
    registry = parking.dispatcher.metrics.registry
    labels = {"channel": "sms", "settled_by": settled_by}
    return registry.get_sample_value("waypost_dispatcher_stopped_tries_total", labels) or 0.0


async def test_a_transactional_try_with_a_receipt_is_not_sent_again(
    parking: Parking,
) -> None:
    request = _sms_request("m-tx").model_copy(update={"transactional": True})
    await _left_sending(parking, request, "1:first")
    parking.log.record(0, "m-tx", "1:first", Outcome("sent", None))
    record = Record("waypost.send-requests.v1", 0, 7, "ada", request.to_wire())

    await parking.dispatcher.handle(request, record)

    assert parking.provider.sent == []
    assert await parking.state("m-tx") == ("sent", 1)


async def test_a_transactional_try_without_a_receipt_is_sent_again(
    parking: Parking,
) -> None:
    request = _sms_request("m-again").model_copy(update={"transactional": True})
    await _left_sending(parking, request, "1:first")
    record = Record("waypost.send-requests.v1", 0, 7, "ada", request.to_wire())

    await parking.dispatcher.handle(request, record)

    assert parking.provider.sent == ["m-again"]
    assert await parking.state("m-again") == ("sent", 2)


async def test_a_receipt_of_a_temporary_failure_schedules_the_retry_the_call_would_have(
    parking: Parking,
) -> None:
    await _left_sending(parking, _sms_request("m-451"), "1:first")
    parking.log.record(0, "m-451", "1:first", Outcome("retry", "451 try later", code="451"))

    await parking.handle("m-451")

    assert parking.provider.sent == []
    entry = await parking.ledger.get("m-451")
    assert entry is not None
    assert (entry["state"], entry["reason"]) == ("retrying", "451 try later")


async def test_a_call_whose_lease_lapsed_before_it_started_does_not_go_out(
    parking: Parking,
) -> None:
    """The call was made under the lease, then the worker was stopped before the call took
    its first step; resumed past the lease, the call does not go out. The try is parked, so
    the batch read again (the group still counting this worker its owner) makes it, once."""
    lapses = [True]  # lapsed at the first check, within the lease after
    parking.dispatcher._within_lease = lambda: not (lapses and lapses.pop())
    with pytest.raises(LeaseLapsed):
        await parking.handle("m-lapsed")
    assert parking.provider.sent == []
    assert "m-lapsed" not in parking.dispatcher._calls

    await parking.handle("m-lapsed")

    assert parking.provider.sent == ["m-lapsed"]
    assert await parking.state("m-lapsed") == ("sent", 1)


async def test_a_staged_call_whose_lease_lapsed_is_abandoned_unsent(
    parking: Parking, staging: Staging
) -> None:
    parking.dispatcher._within_lease = lambda: False
    with pytest.raises(LeaseLapsed):
        await parking.handle("m-staged-lapsed")
    assert (staging.sent, staging.abandoned) == ([], ["m-staged-lapsed"])


async def test_a_kept_call_whose_lease_lapsed_is_made_anew_when_its_request_is_read_again(
    parking: Parking,
) -> None:
    """The batch failed while the call waited to start (kept, as calls past a failed batch
    are), and its lease lapsed before it started: the batch that reads the request again does
    not wait on it for ever, it makes the try anew, once."""
    lapses = [True]
    parking.dispatcher._within_lease = lambda: not (lapses and lapses.pop())
    handling = asyncio.ensure_future(parking.handle("m-kept"))
    while "m-kept" not in parking.dispatcher._calls:
        await asyncio.sleep(0)
    handling.cancel()  # the batch failed: the call is kept and runs on
    with pytest.raises(asyncio.CancelledError):
        await handling
    await asyncio.sleep(0)  # the call takes its first step: the lease has lapsed
    assert parking.provider.sent == []
    assert "m-kept" not in parking.dispatcher._calls

    await parking.handle("m-kept")

    assert parking.provider.sent == ["m-kept"]
    assert await parking.state("m-kept") == ("sent", 1)


# --- a call's last step begins in the turn that decides it ----------------------------------


class _Steps:
    """A staged message that records its steps."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def start(self) -> None:
        self.steps.append("start")

    async def finish(self) -> Outcome:
        self.steps.append("finish")
        return Outcome("sent", None)

    def abandon(self) -> None:
        self.steps.append("abandon")


async def test_a_call_takes_what_it_can_of_its_last_step_before_its_task_runs() -> None:
    """An email's "." goes out as its try resumes, not a turn of the loop later, when the call's
    task first runs: a kill in between would leave `unknown` a message never sent."""
    staged = _Steps()
    call = _begun(staged, lambda: None)
    assert staged.steps == ["start"]  # no turn of the loop yet
    assert (await call).kind == "sent"
    assert staged.steps == ["start", "finish"]


async def test_a_call_whose_lease_lapsed_drops_its_message_without_starting_it() -> None:
    staged = _Steps()

    def lapsed() -> None:
        raise LeaseLapsed("the lease lapsed")

    call = _begun(staged, lapsed)
    assert staged.steps == []
    with pytest.raises(LeaseLapsed):
        await call
    assert staged.steps == ["abandon"]
