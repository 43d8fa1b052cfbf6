"""An SMS try its worker stopped in is looked up in the provider's listing of the number: the
dispatcher over real tables (`test_dispatcher_reports.Reports`), the listing kept in memory. A
marketing SMS is asked about at once and, when the listing cannot tell yet, asked again later by
a retry record; it never holds its batch waiting for the listing to catch up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.dispatcher.channels.sms.reconcile import ListedSms, SmsListing
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.handlers import Called
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import SendRetry
from shared.kafka import Record
from shared.topics import SEND_RETRIES
from tests.unit.test_dispatcher_reports import T0, Parking, Reports, _sms_request, made_reports

SETTLE = 10.0
SENDER = "+15005550006"


class Listing:
    """The provider's listing of a number: the bodies it shows, newest first."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.asked: list[str] = []

    async def sent_to(self, to: str) -> SmsListing:
        self.asked.append(to)
        return SmsListing(
            tuple(
                ListedSms(f"SM{n}", body, SENDER, None, None) for n, body in enumerate(self.bodies)
            )
        )


class AwaitedCall(asyncio.Future[Outcome]):
    """A provider call that says when something first waits on it (`awaited`)."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = asyncio.Event()

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        self.awaited.set()
        super().add_done_callback(fn, context=context)


class Stopped(Parking):
    def __init__(self, made: Reports) -> None:
        super().__init__(made)
        self.listing = Listing()
        self.dispatcher.sms_history = self.listing
        self.outbox = made.outbox
        self.clock = made.dispatcher.clock

    async def retry(self, retry: SendRetry) -> None:
        """A retry record of the request, handled as read from its topic."""
        record = Record(SEND_RETRIES["medium"].name, 0, 1, "ada", retry.to_wire())
        await self.dispatcher.handle_retry(retry, record)

    def own_call(self, message_id: str) -> AwaitedCall:
        """A call of attempt 1 this worker made (its batch failed; the call is remembered)."""
        call = AwaitedCall()
        at = asyncio.get_running_loop().time()
        self.dispatcher._remember(message_id, Called(1, T0, "+15550001", call, at, partition=0))
        return call

    async def stopped(self, message_id: str) -> None:
        """The entry as a worker killed during the call leaves it: marked at T0, no outcome."""
        await self.ledger.claim(_sms_request(message_id), T0)
        assert await self.ledger.begin(message_id, "1:first", 1, T0)


@pytest.fixture
async def stopped(tmp_path: Path) -> AsyncIterator[Stopped]:
    settings = DispatcherSettings(sms_reconcile_settle_seconds=SETTLE, sms_from=SENDER)
    async with made_reports(tmp_path, settings) as made:
        yield Stopped(made)


async def test_a_young_stopped_sms_not_listed_yet_is_asked_again_without_holding_the_batch(
    stopped: Stopped,
) -> None:
    await stopped.stopped("m-young")
    stopped.clock.advance(timedelta(seconds=1))

    async with asyncio.timeout(2):  # it waited 9 s for the listing before
        await stopped.handle("m-young")

    assert stopped.listing.asked == ["+15550001"]
    assert (await stopped.entry("m-young"))["state"] == "sending"
    [retry] = stopped.outbox.retries()
    assert (retry.attempt, retry.reconcile_tries) == (1, 1)
    assert retry.due_at == T0 + timedelta(seconds=SETTLE)

    # Due: the listing now shows it.
    stopped.clock.set(retry.due_at)
    stopped.listing.bodies = ["Hi"]
    await stopped.retry(retry)

    entry = await stopped.entry("m-young")
    assert (entry["state"], entry["attempt"], entry["provider_id"]) == ("sent", 1, "SM0")
    assert stopped.provider.sent == []


async def test_a_young_stopped_sms_already_listed_is_sent_at_once(stopped: Stopped) -> None:
    await stopped.stopped("m-listed")
    stopped.clock.advance(timedelta(seconds=1))
    stopped.listing.bodies = ["Hi"]

    async with asyncio.timeout(2):
        await stopped.handle("m-listed")

    entry = await stopped.entry("m-listed")
    assert (entry["state"], entry["provider_id"]) == ("sent", "SM0")
    assert stopped.outbox.retries() == []


async def test_a_settled_stopped_sms_not_listed_is_tried_again(stopped: Stopped) -> None:
    await stopped.stopped("m-absent")
    stopped.clock.advance(timedelta(seconds=SETTLE + 1))

    await stopped.handle("m-absent")

    entry = await stopped.entry("m-absent")
    assert (entry["state"], entry["attempt"]) == ("retrying", 2)
    assert [r.reconcile_tries for r in stopped.outbox.retries()] == [0]


async def test_a_stopped_sms_is_taken_for_absent_only_a_settle_after_its_partition_was_taken(
    stopped: Stopped,
) -> None:
    # Marked at T0 by a worker that may have written its request until it was gone: this one
    # took the partition 15 s later, past the settle counted from the try's start.
    await stopped.stopped("m-late")
    stopped.clock.advance(timedelta(seconds=SETTLE + 5))
    taken = stopped.clock.now()
    stopped.dispatcher._held_since = {0: taken}.get  # as `StreamWorker.held_since` says

    await stopped.handle("m-late")

    # Not listed yet (the provider had not read the old worker's last request): no new try.
    assert (await stopped.entry("m-late"))["state"] == "sending"
    assert stopped.provider.sent == []
    [retry] = stopped.outbox.retries()
    assert retry.due_at == taken + timedelta(seconds=SETTLE)

    # Asked again when due, it is listed: sent once, by the worker that is gone.
    stopped.clock.set(retry.due_at)
    stopped.listing.bodies = ["Hi"]
    await stopped.retry(retry)

    entry = await stopped.entry("m-late")
    assert (entry["state"], entry["provider_id"]) == ("sent", "SM0")
    assert stopped.provider.sent == []


async def test_a_try_whose_own_call_is_under_way_is_asked_about_only_a_settle_after_it_ended(
    stopped: Stopped,
) -> None:
    # This worker's call of attempt 1 is still under way when its batch failed and the retry
    # record that made it is read again: the call may write until it ends, 15 s after T0.
    await stopped.stopped("m-own")
    call = stopped.own_call("m-own")
    stopped.dispatcher._held_since = {0: T0 - timedelta(hours=1)}.get
    stopped.clock.advance(timedelta(seconds=SETTLE + 1))
    retry = SendRetry(request=_sms_request("m-own"), attempt=1, due_at=T0, reason="r")

    handling = asyncio.create_task(stopped.retry(retry))
    async with asyncio.timeout(2):
        await call.awaited.wait()
    assert not handling.done()  # waiting for the call, not asking the provider yet
    assert stopped.listing.asked == []
    stopped.clock.set(T0 + timedelta(seconds=15))
    call.set_result(Outcome("unknown", "timed out after 15 s"))  # no answer came
    async with asyncio.timeout(2):
        await handling

    # Not listed a moment after the call ended: too soon to tell, nothing sent again.
    assert stopped.listing.asked == ["+15550001"]
    assert (await stopped.entry("m-own"))["state"] == "sending"
    assert stopped.provider.sent == []
    [again] = stopped.outbox.retries()
    assert again.due_at == T0 + timedelta(seconds=15 + SETTLE)


async def test_a_try_whose_own_call_answered_is_concluded_with_that_answer(
    stopped: Stopped,
) -> None:
    # The same, but the call this worker made was answered: no need to ask the provider.
    await stopped.stopped("m-answered")
    stopped.own_call("m-answered").set_result(Outcome("sent", None, provider_id="SM42"))
    retry = SendRetry(request=_sms_request("m-answered"), attempt=1, due_at=T0, reason="r")

    await stopped.retry(retry)

    entry = await stopped.entry("m-answered")
    assert (entry["state"], entry["provider_id"]) == ("sent", "SM42")
    assert stopped.listing.asked == []
    assert stopped.provider.sent == []
