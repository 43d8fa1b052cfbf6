"""An email try left without an answer (its worker stopped mid-send, its answer timed out) is
reconciled by asking the provider's events API about its Message-ID: the dispatcher over real
tables (`test_dispatcher_reports.Reports`), the provider's events log kept in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from services.dispatcher.channels.email.reconcile import (
    EmailEvent,
    EmailEvents,
    bare,
    message_id_header,
)
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Profile, SendRequest, SendRetry, TestSend
from shared.kafka import Record
from shared.streams import focus
from shared.topics import SEND_RETRIES
from tests.unit.test_dispatcher_reports import T0, Parking, Reports

SETTLE = 120.0
DOMAIN = "mail.example.com"


class EventsLog:
    """The provider's events API: the Message-IDs it accepted, or why it cannot answer."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.failures: list[str] = []
        self.asked: list[str] = []

    async def events_of(self, message_id: str) -> EmailEvents | str:
        self.asked.append(message_id)
        if self.failures:
            return self.failures.pop()
        found = bare(message_id) in self.accepted
        return EmailEvents(
            (EmailEvent("ev1", "accepted", bare(message_id), None),) if found else ()
        )


def _email_request(message_id: str, *, transactional: bool = False) -> SendRequest:
    return SendRequest(
        message_id=message_id,
        contact_key="ada",
        channel="email",
        template_id="t-email",
        journey_id="j1",
        journey_version=1,
        instance_id="i1",
        step_id="s1",
        transactional=transactional,
        profile=Profile(contact_key="ada", first_seen=T0, last_seen=T0, updated_at=T0),
        requested_at=T0,
        test=TestSend(
            address="ada@example.com",
            content={"channel": "email", "subject": "Hi", "text": "Hello"},
        ),
    )


class Stopped(Parking):
    """`Parking` with an email try its worker stopped in, and the provider's events log."""

    def __init__(self, made: Reports) -> None:
        super().__init__(made)
        self.events = EventsLog()
        self.dispatcher.email_history = self.events
        self.outbox = made.outbox
        self.clock = made.dispatcher.clock

    async def stopped(self, message_id: str, *, transactional: bool = False) -> SendRequest:
        """The entry as a worker killed during the call leaves it: marked at T0, no outcome."""
        request = _email_request(message_id, transactional=transactional)
        await self.ledger.claim(request, T0)
        assert await self.ledger.begin(message_id, "1:first", 1, T0)
        return request

    async def found_again(self, request: SendRequest) -> None:
        record = Record("waypost.send-requests.v1", 0, 7, "ada", request.to_wire())
        await self.dispatcher.handle(request, record)

    async def entry(self, message_id: str) -> dict[str, Any]:
        return dict(await self.ledger.get(message_id) or {})

    def retries(self) -> list[SendRetry]:
        topics = {topic.name for topic in SEND_RETRIES.values()}
        return [
            SendRetry.model_validate_json(value)
            for topic, _key, value in self.outbox.records
            if topic in topics and value is not None
        ]


@pytest.fixture
async def stopped(tmp_path: Path) -> AsyncIterator[Stopped]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        "mongodb://127.0.0.1:1", connect=False
    )
    settings = DispatcherSettings(
        message_id_domain=DOMAIN,
        email_reconcile_settle_seconds=SETTLE,
        email_reconcile_again_seconds=(30.0, 90.0),
    )
    made = Reports(tmp_path, mongo, settings)
    focus(0)
    yield Stopped(made)
    made.close()
    await mongo.close()


async def test_a_stopped_email_the_provider_accepted_is_sent(stopped: Stopped) -> None:
    request = await stopped.stopped("m-accepted")
    stopped.events.accepted.add(f"m-accepted@{DOMAIN}")

    await stopped.found_again(request)

    entry = await stopped.entry("m-accepted")
    assert (entry["state"], entry["attempt"]) == ("sent", 1)
    assert entry["provider_id"] == message_id_header("m-accepted", DOMAIN)
    assert entry["reason"].startswith("reconciled")
    assert stopped.events.asked == [f"<m-accepted@{DOMAIN}>"]
    assert stopped.provider.sent == []


async def test_a_stopped_email_the_provider_never_accepted_is_tried_again(
    stopped: Stopped,
) -> None:
    request = await stopped.stopped("m-absent")
    stopped.clock.advance(timedelta(seconds=SETTLE + 1))

    await stopped.found_again(request)

    entry = await stopped.entry("m-absent")
    assert (entry["state"], entry["attempt"]) == ("retrying", 2)
    assert "never arrived" in entry["reason"]
    [retry] = stopped.retries()
    assert (retry.attempt, retry.reconcile_tries) == (2, 0)


async def test_asked_too_soon_it_is_asked_again_once_the_log_can_tell(stopped: Stopped) -> None:
    request = await stopped.stopped("m-young")
    stopped.clock.advance(timedelta(seconds=10))

    await stopped.found_again(request)

    assert (await stopped.entry("m-young"))["state"] == "sending"  # nothing sent meanwhile
    [retry] = stopped.retries()
    assert (retry.attempt, retry.reconcile_tries) == (1, 1)
    assert retry.due_at == T0 + timedelta(seconds=SETTLE)

    # Due: the log now shows the message.
    stopped.clock.set(retry.due_at)
    stopped.events.accepted.add(f"m-young@{DOMAIN}")
    record = Record(SEND_RETRIES["short"].name, 0, 1, "ada", retry.to_wire())
    await stopped.dispatcher.handle_retry(retry, record)

    entry = await stopped.entry("m-young")
    assert (entry["state"], entry["attempt"]) == ("sent", 1)
    assert len(stopped.events.asked) == 2


async def test_while_the_events_cannot_be_had_it_is_asked_again_then_left_unknown(
    stopped: Stopped,
) -> None:
    request = await stopped.stopped("m-unlisted")
    stopped.clock.advance(timedelta(seconds=SETTLE + 1))
    stopped.events.failures = ["email events: HTTP 503: busy"] * 3

    await stopped.found_again(request)
    [first] = stopped.retries()
    assert (first.attempt, first.reconcile_tries) == (1, 1)
    assert first.due_at == stopped.clock.now() + timedelta(seconds=30)

    for tries in (1, 2):
        retry = stopped.retries()[-1]
        stopped.clock.set(retry.due_at)
        record = Record(SEND_RETRIES["medium"].name, 0, tries, "ada", retry.to_wire())
        await stopped.dispatcher.handle_retry(retry, record)

    # Asked three times, the schedule (30 s, 90 s) spent: it stays unknown, never resent.
    assert len(stopped.events.asked) == 3
    assert [r.reconcile_tries for r in stopped.retries()] == [1, 2]
    entry = await stopped.entry("m-unlisted")
    assert entry["state"] == "unknown"
    assert "HTTP 503" in entry["reason"]
    assert stopped.provider.sent == []


async def test_an_email_is_not_asked_about_without_an_events_api(stopped: Stopped) -> None:
    stopped.dispatcher.email_history = None
    request = await stopped.stopped("m-unasked")

    await stopped.found_again(request)

    entry = await stopped.entry("m-unasked")
    assert entry["state"] == "unknown"
    assert stopped.events.asked == []
