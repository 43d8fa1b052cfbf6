"""An email try left without an answer (its worker stopped mid-send, its answer timed out) is
reconciled by asking the provider's events API about its Message-ID: the dispatcher over real
tables (`test_dispatcher_reports.Reports`), the provider's events log and SMTP server kept in
memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from services.dispatcher.channels.email.reconcile import (
    EmailEvent,
    EmailEvents,
    bare,
    message_id_header,
)
from services.dispatcher.domain import progress
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.handlers import RECEIPT_VOUCHES_WITHIN, email_route
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel, Profile, SendRequest, TestSend
from shared.kafka import Record
from shared.topics import SEND_RETRIES
from tests.unit.test_dispatcher_reports import T0, Parking, Reports, made_reports

SETTLE = 120.0
SMTP_TIMEOUT = 30.0
DOMAIN = "mail.example.com"
# When a try begun at T0 (`Stopped.stopped`) can be ruled out: the server may take it until the
# client's SMTP timeout, and the log shows it within the settle time.
READY = T0 + timedelta(seconds=SMTP_TIMEOUT + SETTLE)


class EventsLog:
    """The provider's events API: the Message-IDs it accepted (`show`), or why it cannot
    answer (`failures`, one per query)."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.failures: list[str] = []
        self.asked: list[str] = []

    def show(self, message_id: str) -> None:
        self.accepted.add(bare(message_id))

    async def events_of(self, message_id: str) -> EmailEvents | str:
        self.asked.append(message_id)
        if self.failures:
            return self.failures.pop()
        found = bare(message_id) in self.accepted
        return EmailEvents(
            (EmailEvent("ev1", "accepted", bare(message_id), None),) if found else ()
        )


class Smtp:
    """The SMTP server as the dispatcher's email provider: answers each message with `answer`
    (`sent` under its Message-ID, by default), and keeps the ids it was sent."""

    channel: Channel = "email"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answer: Outcome | None = None

    async def send(self, delivery: Delivery) -> Outcome:
        self.sent.append(delivery.message_id)
        if self.answer is not None:
            return self.answer
        return Outcome("sent", provider_id=message_id_header(delivery.message_id, DOMAIN))


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
        self.smtp = Smtp()
        self.dispatcher.providers = {"email": self.smtp}
        self.outbox = made.outbox
        self.clock = made.dispatcher.clock
        self.log.now = self.clock.now

    async def stopped(self, message_id: str, *, transactional: bool = False) -> SendRequest:
        """The entry as a worker killed during the call leaves it: marked at T0, no outcome."""
        request = _email_request(message_id, transactional=transactional)
        await self.ledger.claim(request, T0)
        assert await self.ledger.begin(message_id, "1:first", 1, T0)
        return request

    async def voucher(self, message_id: str = "m-voucher") -> str:
        """An email sent now, which the server accepted and the events log shows: the worker
        keeps it to check the log against."""
        await self.found_again(_email_request(message_id))
        assert (await self.entry(message_id))["state"] == "sent"
        header = message_id_header(message_id, DOMAIN)
        self.events.show(header)
        return header

    def stopped_tries(self, settled_by: str) -> float:
        labels = {"channel": "email", "settled_by": settled_by}
        registry = self.dispatcher.metrics.registry
        return registry.get_sample_value("waypost_dispatcher_stopped_tries_total", labels) or 0.0

    async def found_again(self, request: SendRequest) -> None:
        record = Record("waypost.send-requests.v1", 0, 7, "ada", request.to_wire())
        await self.dispatcher.handle(request, record)


@pytest.fixture
async def stopped(tmp_path: Path) -> AsyncIterator[Stopped]:
    settings = DispatcherSettings(
        message_id_domain=DOMAIN,
        smtp_timeout_seconds=SMTP_TIMEOUT,
        email_reconcile_settle_seconds=SETTLE,
        email_reconcile_again_seconds=(30.0, 90.0),
    )
    async with made_reports(tmp_path, settings) as made:
        yield Stopped(made)


async def _absent_once_vouched_by(stopped: Stopped, voucher: str) -> None:
    """A stopped try that never reached the server, asked about once the log can tell: the log
    is checked against `voucher`, which it shows, so absent is absent and it is tried again."""
    request = await stopped.stopped("m-absent")
    stopped.clock.set(READY)

    await stopped.found_again(request)

    assert stopped.events.asked == [f"<m-absent@{DOMAIN}>", voucher]
    entry = await stopped.entry("m-absent")
    assert (entry["state"], entry["attempt"]) == ("retrying", 2)
    assert "never arrived" in entry["reason"]


async def test_a_stopped_email_the_provider_accepted_is_sent(stopped: Stopped) -> None:
    request = await stopped.stopped("m-accepted")
    stopped.events.show(f"m-accepted@{DOMAIN}")

    await stopped.found_again(request)

    entry = await stopped.entry("m-accepted")
    assert (entry["state"], entry["attempt"]) == ("sent", 1)
    assert entry["provider_id"] == message_id_header("m-accepted", DOMAIN)
    assert entry["reason"].startswith("reconciled")
    assert stopped.events.asked == [f"<m-accepted@{DOMAIN}>"]
    assert stopped.smtp.sent == []
    assert stopped.stopped_tries("provider") == 1


async def test_a_stopped_email_the_log_never_showed_is_tried_again(stopped: Stopped) -> None:
    await _absent_once_vouched_by(stopped, await stopped.voucher())

    [retry] = stopped.outbox.retries()
    assert (retry.attempt, retry.reconcile_tries) == (2, 0)


async def test_absent_from_a_log_that_does_not_show_our_mail_proves_nothing(
    stopped: Stopped,
) -> None:
    # An events URL of another domain: every query answers nothing, the voucher's too.
    await stopped.found_again(_email_request("m-voucher"))
    request = await stopped.stopped("m-elsewhere")
    stopped.clock.set(READY)

    with capture_logs() as logs:
        await stopped.found_again(request)

    assert (await stopped.entry("m-elsewhere"))["state"] == "sending"  # not resent
    [retry] = stopped.outbox.retries()
    assert (retry.attempt, retry.reconcile_tries) == (1, 1)  # asked again later
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "dispatcher.email_events_unvouched"
    ]
    assert stopped.smtp.sent == ["m-voucher"]


async def test_absent_proves_nothing_before_the_worker_has_mail_to_check_the_log_against(
    stopped: Stopped,
) -> None:
    request = await stopped.stopped("m-first")
    stopped.clock.set(READY)

    await stopped.found_again(request)

    assert (await stopped.entry("m-first"))["state"] == "sending"
    assert [r.reconcile_tries for r in stopped.outbox.retries()] == [1]
    assert stopped.events.asked == [f"<m-first@{DOMAIN}>"]  # no voucher to ask about


async def _receipted(stopped: Stopped, message_id: str, route: str | None) -> str:
    """A stopped try whose receipt says the server took it (by `route`), shown in the log and
    concluded `sent` from its receipt; its Message-ID."""
    header = message_id_header(message_id, DOMAIN)
    request = await stopped.stopped(message_id)
    stopped.log.record(0, message_id, "1:first", Outcome("sent", provider_id=header), route)
    stopped.events.show(header)
    await stopped.found_again(request)
    assert (await stopped.entry(message_id))["state"] == "sent"
    return header


async def test_a_receipt_of_an_email_sent_by_the_same_route_vouches_for_the_log(
    stopped: Stopped,
) -> None:
    # A worker that took over with nothing of its own to send: one stopped try had its answer
    # written down (the server took it), another never reached the server.
    route = email_route(stopped.dispatcher.settings)
    header = await _receipted(stopped, "m-receipted", route)

    # The receipt's message, old enough by now, is what the log is checked against.
    await _absent_once_vouched_by(stopped, header)
    assert stopped.smtp.sent == []


@pytest.mark.parametrize("route", [None, "another route"])
async def test_a_receipt_of_another_route_does_not_vouch_for_the_log(
    stopped: Stopped, route: str | None
) -> None:
    # Written before a deploy that moved the mail (or before receipts said their route): the
    # log that shows it need not be the one this worker's mail goes to.
    await _receipted(stopped, "m-receipted", route)
    request = await stopped.stopped("m-absent")
    stopped.clock.set(READY)

    await stopped.found_again(request)

    assert stopped.events.asked == [f"<m-absent@{DOMAIN}>"]  # no voucher to ask about
    assert (await stopped.entry("m-absent"))["state"] == "sending"
    assert stopped.smtp.sent == []


async def test_a_stopped_try_the_log_showed_does_not_vouch_for_the_log(stopped: Stopped) -> None:
    # Shown, it was ours, but it may have gone by a route this worker's mail no longer takes.
    shown = await stopped.stopped("m-shown")
    stopped.events.show(f"m-shown@{DOMAIN}")
    absent = await stopped.stopped("m-absent")
    stopped.clock.set(READY)

    await stopped.found_again(shown)
    await stopped.found_again(absent)

    assert (await stopped.entry("m-shown"))["state"] == "sent"
    assert (await stopped.entry("m-absent"))["state"] == "sending"
    assert stopped.events.asked == [f"<m-shown@{DOMAIN}>", f"<m-absent@{DOMAIN}>"]


async def test_a_receipt_of_another_email_of_the_partition_vouches_for_the_log(
    stopped: Stopped,
) -> None:
    # The worker that took over has only a try to ask about again (its retry record), with no
    # receipt of its own; the partition's receipts hold another email the server accepted.
    header = message_id_header("m-other", DOMAIN)
    route = email_route(stopped.dispatcher.settings)
    stopped.log.record(0, "m-other", "1:first", Outcome("sent", provider_id=header), route)
    stopped.events.show(header)

    await _absent_once_vouched_by(stopped, header)
    assert stopped.smtp.sent == []


async def test_a_receipt_written_long_ago_does_not_vouch_for_the_log(stopped: Stopped) -> None:
    header = message_id_header("m-other", DOMAIN)
    route = email_route(stopped.dispatcher.settings)
    stopped.log.record(0, "m-other", "1:first", Outcome("sent", provider_id=header), route)
    stopped.events.show(header)  # written at T0, and read first more than an hour later
    request = await stopped.stopped("m-absent")
    stopped.clock.set(T0 + RECEIPT_VOUCHES_WITHIN + timedelta(seconds=1))

    await stopped.found_again(request)

    assert stopped.events.asked == [f"<m-absent@{DOMAIN}>"]
    assert (await stopped.entry("m-absent"))["state"] == "sending"


async def test_an_email_receipt_says_the_route_it_went_by(stopped: Stopped) -> None:
    await stopped.voucher("m-own")

    [receipt] = [r for r in stopped.log.records[0] if r[0] == "receipt"]
    assert receipt[1:5] == (
        "m-own",
        "1:first",
        Outcome("sent", provider_id=message_id_header("m-own", DOMAIN)),
        email_route(stopped.dispatcher.settings),
    )


def test_the_email_route_names_the_server_the_domain_and_the_events_log() -> None:
    base = DispatcherSettings(message_id_domain=DOMAIN)
    routes = {
        email_route(settings)
        for settings in (
            base,
            DispatcherSettings(message_id_domain=DOMAIN, smtp_host="smtp.eu.example.com"),
            DispatcherSettings(message_id_domain=DOMAIN, smtp_port=2525),
            DispatcherSettings(
                message_id_domain=DOMAIN, smtp_username="postmaster", smtp_password="secret"
            ),
            DispatcherSettings(message_id_domain="mail.example.org"),
            DispatcherSettings(
                message_id_domain=DOMAIN,
                email_events_url="https://api.eu.mailgun.net/v3/mail.example.com",
                email_events_api_key="key",
            ),
        )
    }
    assert len(routes) == 6
    assert email_route(DispatcherSettings(message_id_domain=DOMAIN)) == email_route(base)


async def test_a_voucher_must_be_old_enough_for_the_log_to_show_it(stopped: Stopped) -> None:
    request = await stopped.stopped("m-early")
    stopped.clock.set(READY)
    await stopped.voucher()  # accepted just now: the log need not show it yet

    await stopped.found_again(request)

    assert (await stopped.entry("m-early"))["state"] == "sending"
    assert stopped.events.asked == [f"<m-early@{DOMAIN}>"]


async def test_asked_too_soon_it_is_asked_again_once_the_log_can_tell(stopped: Stopped) -> None:
    request = await stopped.stopped("m-young")
    stopped.clock.advance(timedelta(seconds=10))

    await stopped.found_again(request)

    assert (await stopped.entry("m-young"))["state"] == "sending"  # nothing sent meanwhile
    [retry] = stopped.outbox.retries()
    assert (retry.attempt, retry.reconcile_tries) == (1, 1)
    # The server could take the message until the client's timeout, and the log show it later.
    assert retry.due_at == READY

    # Due: the log now shows the message.
    stopped.clock.set(retry.due_at)
    stopped.events.show(f"m-young@{DOMAIN}")
    record = Record(SEND_RETRIES["short"].name, 0, 1, "ada", retry.to_wire())
    await stopped.dispatcher.handle_retry(retry, record)

    entry = await stopped.entry("m-young")
    assert (entry["state"], entry["attempt"]) == ("sent", 1)
    assert len(stopped.events.asked) == 2
    assert stopped.stopped_tries("provider") == 1  # one stopped try, however often asked


async def test_while_the_events_cannot_be_had_it_is_asked_again_then_left_unknown(
    stopped: Stopped,
) -> None:
    request = await stopped.stopped("m-unlisted")
    stopped.clock.set(READY)
    stopped.events.failures = ["email events: HTTP 503: busy"] * 3

    await stopped.found_again(request)
    [first] = stopped.outbox.retries()
    assert (first.attempt, first.reconcile_tries) == (1, 1)
    assert first.due_at == READY + timedelta(seconds=30)

    for tries in (1, 2):
        retry = stopped.outbox.retries()[-1]
        stopped.clock.set(retry.due_at)
        record = Record(SEND_RETRIES["medium"].name, 0, tries, "ada", retry.to_wire())
        await stopped.dispatcher.handle_retry(retry, record)

    # Asked three times, the schedule (30 s, 90 s) spent: it stays unknown, never resent.
    assert len(stopped.events.asked) == 3
    assert [r.reconcile_tries for r in stopped.outbox.retries()] == [1, 2]
    entry = await stopped.entry("m-unlisted")
    assert entry["state"] == "unknown"
    assert "HTTP 503" in entry["reason"]
    assert stopped.smtp.sent == []


async def test_a_try_whose_start_is_not_known_is_not_taken_for_absent(stopped: Stopped) -> None:
    await stopped.voucher()
    request = await stopped.stopped("m-when")
    stopped.clock.set(READY)
    record = Record("waypost.send-requests.v1", 0, 7, "ada", request.to_wire())

    # As after another copy's lost marker: the try stopped, its start unknown.
    await stopped.dispatcher._carry_out(progress.Reconcile(1, None, False), request, record)

    entry = await stopped.entry("m-when")
    assert entry["state"] == "unknown"
    assert "not known" in entry["reason"]
    assert stopped.smtp.sent == ["m-voucher"]


async def test_an_unanswered_email_is_asked_about_at_once(stopped: Stopped) -> None:
    # The server took the message, and its answer never came back in time.
    stopped.smtp.answer = Outcome("unknown", "smtp no answer: timed out after DATA")
    stopped.events.show(f"m-timeout@{DOMAIN}")

    await stopped.found_again(_email_request("m-timeout"))

    entry = await stopped.entry("m-timeout")
    assert (entry["state"], entry["attempt"]) == ("sent", 1)
    assert entry["reason"].startswith("reconciled")
    assert stopped.smtp.sent == ["m-timeout"]


async def test_an_unanswered_email_the_log_does_not_show_yet_is_asked_about_later(
    stopped: Stopped,
) -> None:
    stopped.smtp.answer = Outcome("unknown", "smtp no answer: timed out after DATA")

    await stopped.found_again(_email_request("m-later"))

    assert (await stopped.entry("m-later"))["state"] == "sending"
    [retry] = stopped.outbox.retries()
    assert (retry.attempt, retry.reconcile_tries) == (1, 1)
    assert retry.due_at == stopped.clock.now() + timedelta(seconds=SMTP_TIMEOUT + SETTLE)


async def test_a_stopped_transactional_email_the_log_does_not_show_is_sent_again(
    stopped: Stopped,
) -> None:
    request = await stopped.stopped("m-receipt", transactional=True)

    await stopped.found_again(request)  # asked too soon: at least once, so sent again now

    entry = await stopped.entry("m-receipt")
    assert (entry["state"], entry["attempt"]) == ("sent", 2)
    assert stopped.smtp.sent == ["m-receipt"]


async def test_a_stopped_transactional_email_the_log_shows_is_not_sent_again(
    stopped: Stopped,
) -> None:
    request = await stopped.stopped("m-shown", transactional=True)
    stopped.events.show(f"m-shown@{DOMAIN}")

    await stopped.found_again(request)

    entry = await stopped.entry("m-shown")
    assert (entry["state"], entry["attempt"]) == ("sent", 1)
    assert stopped.smtp.sent == []


async def test_an_email_is_not_asked_about_without_an_events_api(stopped: Stopped) -> None:
    stopped.dispatcher.email_history = None
    request = await stopped.stopped("m-unasked")

    await stopped.found_again(request)

    entry = await stopped.entry("m-unasked")
    assert entry["state"] == "unknown"
    assert stopped.events.asked == []
    assert stopped.stopped_tries("nothing") == 1


def test_an_events_api_needs_its_key() -> None:
    with pytest.raises(ValueError, match="WAYPOST_EMAIL_EVENTS_API_KEY is required"):
        DispatcherSettings(email_events_url="https://api.mailgun.net/v3/mg.example.com")
    with pytest.raises(ValueError, match="WAYPOST_EMAIL_EVENTS_API_KEY is required"):
        DispatcherSettings(
            email_events_url="https://api.mailgun.net/v3/mg.example.com", email_events_api_key=""
        )
    unset = DispatcherSettings(email_events_url="", email_events_api_key="")
    assert unset.email_events_url is None


async def test_a_stopped_email_counts_its_settle_from_when_its_partition_was_taken(
    stopped: Stopped,
) -> None:
    # The worker that marked it at T0 could write its "." until it was gone: this one took the
    # partition after the client's timeout, so the log gets its settle from then.
    request = await stopped.stopped("m-taken")
    stopped.clock.advance(timedelta(seconds=SMTP_TIMEOUT + 20))
    taken = stopped.clock.now()
    stopped.dispatcher._held_since = {0: taken}.get  # as `StreamWorker.held_since` says

    await stopped.found_again(request)

    assert (await stopped.entry("m-taken"))["state"] == "sending"
    [retry] = stopped.outbox.retries()
    assert retry.due_at == taken + timedelta(seconds=SETTLE)
    assert stopped.smtp.sent == []
