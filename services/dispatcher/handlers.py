"""Dispatcher shell: claim the ledger entry, check, render, send, record, report.

A transactional stream worker (`shared.streams`) feeds it batches from three streams: send
requests, the retry topics (one per delay class, each record held back until it is due) and the
delivery reports the segmenter passes on (`waypost.delivery-reports.v1`). The ledger, caps and
consent live in the worker's tables (`adapters/tables.py`). A batch runs one task per contact,
a few started per turn of the loop (`shared.tasks.run_all`); a contact's records run one
after another, which keeps the frequency-cap check and the count it guards together. A try
takes one of its channel's call slots, then is marked `sending`, and the mark is made durable
before the call (`_durable`): the try's intent, the entry as marked, is written to the
receipts topic and acknowledged, while the mark itself commits with the batch. A worker that
takes a partition reads the intents written since the last commit and puts every mark the
ledger lacks back in it (`_overlay`), so what follows sees the ledger as if each mark had
committed before its call. The worker proves it still owns the partitions before a call
(`StreamWorker.prove_owner`). An SMTP try is staged first
(`StagingProvider`: the whole transaction but the "." that ends it), so the mark covers only
the last step, the one after which the message may have arrived. A crash repeats the batch, and
the ledger turns repeats into no-ops: a try left `sending` (only one that held a slot) is
concluded from its call receipt (`adapters.receipts`: each call's answer, written down the
moment it comes), else reconciled with the provider where it can be asked, else ends
`unknown` (marketing) or is tried again (transactional).

Channels are rendered and sent through their kits (`services/dispatcher/channels`); what an
outcome comes to is decided by `domain.conclude` and carried out here.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar, assert_never

import structlog
from pydantic import ValidationError
from pydantic_core import from_json, to_json

from services.dispatcher.adapters.metrics import DispatchMetrics
from services.dispatcher.adapters.store import Templates
from services.dispatcher.adapters.suppressions import SuppressionList, without_address
from services.dispatcher.adapters.tables import (
    FORGOTTEN_REASON,
    Caps,
    Consent,
    ForgottenContacts,
    IntentsFrom,
    Ledger,
    forgotten_entry,
)
from services.dispatcher.channels import kits
from services.dispatcher.channels.email.reconcile import (
    RETAINED,
    EmailHistory,
    message_id_header,
    reconcile_email,
    vouches,
)
from services.dispatcher.channels.http import BEFORE_SENDING
from services.dispatcher.channels.sms.domain import SmsContent
from services.dispatcher.channels.sms.reconcile import SmsHistory, SmsTry, reconcile_sms
from services.dispatcher.domain import progress
from services.dispatcher.domain.conclude import (
    Announce,
    ConcludePolicy,
    CountSend,
    DeadLetter,
    FallBack,
    PauseChannel,
    SuppressAddress,
    Wait,
    WithdrawConsent,
    conclude,
)
from services.dispatcher.domain.messages import (
    Delivery,
    MessageContent,
    Provider,
    RenderContext,
    Staged,
    StagingProvider,
)
from services.dispatcher.domain.outcomes import ASKED_TOO_SOON, EVENT_NAMES, Outcome, Receipt
from services.dispatcher.domain.policy import (
    CapRule,
    TokenBucket,
    cap_refusal,
    class_for_delay,
    kept_sends,
    recipient_refusal,
    send_address,
    suppression_refusal,
)
from services.dispatcher.settings import DispatcherSettings
from shared.channels import CHANNELS, consent_changes
from shared.clock import Clock
from shared.contracts import Channel, Event, SendRequest, SendRetry
from shared.deadletter import DeadLetters, through_outages
from shared.durations import parse_duration, zone
from shared.ids import stable_id
from shared.kafka import AsyncProducer, Record
from shared.links import LinkClaims, LinkSigner
from shared.profiles import CONTACT_FORGOTTEN
from shared.rendering import (
    RenderError,
    render_variables,
)
from shared.streams import Fenced, focus, focused
from shared.system_events import (
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    MESSAGE_DELIVERED,
    MESSAGE_UNDELIVERED,
    SUBSCRIBED,
    UNSUBSCRIBED,
    forged,
)
from shared.tasks import run_all
from shared.topics import EVENTS, SEND_REQUESTS, SEND_RETRIES

log = structlog.get_logger(__name__)

# Delivery reports that move a ledger entry forward, by event name.
TRACKED = {
    MESSAGE_DELIVERED: "delivered",
    EMAIL_OPENED: "opened",
    EMAIL_LINK_CLICKED: "clicked",
}


def log_outcome(message_id: str, state: str, reason: str | None) -> None:
    """A message's final state in the log: a message sent at debug, any other outcome at info.
    At hundreds of sends a second, a line for each sent message was most of the worker's log
    (and a tenth of its samples in a profile of bench/dispatch.py's SMS run, though the bench
    measured no change in CPU); the ledger and its `messages` view keep every outcome, and
    `waypost_dispatcher_outcomes` counts them."""
    emit = log.debug if state == "sent" else log.info
    emit("dispatcher.outcome", message_id=message_id, state=state, reason=reason)


class Receipts(Protocol):
    """Where each provider call's answer is written down as it comes (`adapters.receipts`),
    for a worker that finds the try left `sending` to read."""

    def record(
        self,
        partition: int,
        message_id: str,
        try_id: str,
        outcome: Outcome,
        route: str | None = None,
    ) -> None: ...

    async def find(
        self, partition: int, message_id: str, try_id: str, marked_at: datetime
    ) -> Receipt | None: ...

    def accepted(self, partition: int, route: str) -> tuple[str, datetime] | None: ...

    def forget(self, partitions: frozenset[int]) -> None: ...

    async def intend(self, partition: int, message_id: str, rev: int, entry: bytes) -> int: ...

    async def intents(
        self, partition: int, start: int | None
    ) -> tuple[dict[str, tuple[int, bytes]], int]: ...


# Proves the worker still owns the batch's partitions (`StreamWorker.prove_owner`): asks the
# group unless the last proof's lease has the given seconds left.
ProveOwner = Callable[[float], Awaitable[None]]
# Seconds of the ownership lease (a third of the 10 s session) a proof before a try's intent
# must leave, so that the call right after never waits on a proof.
OWNER_LEASE_LEFT_BEFORE_INTENT = 1.5

# The reason a try concluded from its receipt shows, when the provider's answer gave none.
RECEIPT_REASON = "answered before its worker stopped (from the call's receipt)"


class PauseRecord(Protocol):
    """Where a channel's pause is recorded for the admin to show (`adapters.store`)."""

    async def record(
        self, channel: str, until: datetime, reason: str | None, now: datetime
    ) -> object: ...


# Provider calls a worker remembers (`Dispatcher._calls`): for as long as a start-over could
# take, and no more than this many (a few hundred bytes each, the content left out).
CALLS_KEPT_SECONDS = 300.0
CALLS_KEPT = 20_000
# An email found absent from the provider's events log counts as never arrived only once the
# log has shown a message this worker saw accepted (its own, or a receipt's sent by the same
# route, `email_route`): one such message is kept per VOUCHER_SPACING, a day's worth, and a log
# that showed one is trusted for VOUCHED_FOR.
VOUCHER_SPACING = timedelta(seconds=30)
# A receipt vouches for the log only if it was written this recently (the log must still hold
# its message when it is asked about, `RETAINED`).
RECEIPT_VOUCHES_WITHIN = timedelta(hours=1)
VOUCHERS_KEPT = 2_880
VOUCHED_FOR = timedelta(seconds=60)


@dataclass
class Called:
    """A provider call this worker made. Should the batch fail before the call's outcome is
    committed (a fenced producer, a rebalance under way) and this worker read the request
    again, the call's answer concludes the try (`progress.AwaitCall`) instead of `unknown`; so
    a call under way runs to its end rather than being cut off, which would only leave its
    outcome unknown. Only when the group has moved the partitions on are calls cut off
    (`Dispatcher._cut_off_calls`, or `Dispatcher.keep_calls_of` for the partitions it handed
    to another worker)."""

    attempt: int
    began: datetime
    address: str
    call: asyncio.Future[Outcome]
    at: float  # when it began, on the worker's monotonic clock
    partition: int | None  # of its request (None: outside a partition, in tests)
    ended: datetime | None = None  # when its task ended (set as it does)


class _Kept(Protocol):
    @property
    def at(self) -> float: ...


K = TypeVar("K", bound=_Kept)


def _forget_oldest(kept: OrderedDict[str, K], now: float, finished: Callable[[K], bool]) -> None:
    """Drop the oldest entries (`kept` is oldest first) while the oldest is `finished` and beyond
    `CALLS_KEPT` or older than `CALLS_KEPT_SECONDS`. One still under way at the front stops the
    dropping, whatever the count, until it ends (within its timeout): forgotten, a later batch
    would take its try for stopped while it could still write. An `OrderedDict`: a plain dict
    emptied from the front scans every deleted slot to find its first entry, until it is
    resized."""
    since = now - CALLS_KEPT_SECONDS
    while kept:
        oldest = next(iter(kept.values()))
        if not finished(oldest) or (len(kept) <= CALLS_KEPT and oldest.at >= since):
            break
        kept.popitem(last=False)


@dataclass(frozen=True)
class Parked:
    """A try this worker marked `sending` whose intent failed (or whose batch failed, or a
    proof of ownership before its intent or its call), so it never made the call. The intent
    may have been written all the same (the broker stores a record whose acknowledgement the
    worker gave up on in an outage), and the mark is then found again; read again by the same
    marker, the try is made, not taken for stopped (`progress.resume`)."""

    marked: progress.Marked
    at: float  # on the worker's monotonic clock
    partition: int | None


@dataclass(frozen=True)
class _Asked:
    """What asking the provider about a try without an answer came to, and the address the
    try went to (None: not known, the request no longer renders). `unlisted`: the provider's
    answer could not be had; `ask_at`: it was asked before it could tell, and can by then.
    Either way, asking again later may tell."""

    outcome: Outcome
    address: str | None
    unlisted: bool = False
    ask_at: datetime | None = None


@dataclass(frozen=True)
class Stores:
    ledger: Ledger
    templates: Templates
    caps: Caps
    consent: Consent
    suppressions: SuppressionList
    forgotten: ForgottenContacts
    intents_from: IntentsFrom


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings,
        clock: Clock,
        stores: Stores,
        providers: Mapping[Channel, Provider],
        links: LinkSigner,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        metrics: DispatchMetrics,
        monotonic: Callable[[], float],
        receipts: Receipts,
        sms_history: SmsHistory | None = None,
        email_history: EmailHistory | None = None,
        pauses: PauseRecord | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.stores = stores
        self.ledger = stores.ledger
        self.providers = providers
        self.links = links
        self._kits = kits()
        self.producer = producer
        self.dead_letters = dead_letters
        self.metrics = metrics
        self._monotonic = monotonic
        self.sms_history = sms_history
        self.email_history = email_history
        # Message-IDs the SMTP server was seen to accept, with when, one per VOUCHER_SPACING
        # (`_accepted_email`), and when the events log last showed one (`_unvouched`).
        self._vouchers: deque[tuple[str, datetime]] = deque(maxlen=VOUCHERS_KEPT)
        self._vouched_at: datetime | None = None
        self._email_route = email_route(settings)
        # The newest such Message-ID found in other workers' receipts (`_voucher_from_receipts`).
        self._receipt_voucher: tuple[str, datetime] | None = None
        self.pauses = pauses
        self.receipts = receipts
        # Pause records being written: held here so they finish (the loop keeps weak refs).
        self._recording: set[asyncio.Task[None]] = set()
        self._buckets = {
            channel: TokenBucket(float(getattr(settings, f"rate_{channel}")))
            for channel in CHANNELS
        }
        self._caps = {
            channel: CapRule(
                per_day=cap.per_day,
                per_window=cap.per_window,
                window=parse_duration(cap.window) if cap.window else None,
            )
            for channel, cap in settings.frequency_caps.items()
        }
        self._paused_until: dict[str, datetime] = {}
        self._retry_topics = frozenset(topic.name for topic in SEND_RETRIES.values())
        # Provider calls in flight, per channel; a batch's other tries wait for a slot.
        self._slots = {
            channel: asyncio.Semaphore(settings.in_flight(channel)) for channel in CHANNELS
        }
        # The provider calls made lately, by message id, oldest first (`Called`).
        self._calls: OrderedDict[str, Called] = OrderedDict()
        # Tries marked and never called (`Parked`), by message id, oldest first.
        self._parked: OrderedDict[str, Parked] = OrderedDict()
        self._prove_owner: ProveOwner = _outside_a_batch
        self._within_lease: Callable[[], bool] = lambda: True
        # Intents of tries whose marks the ledger may lack, by partition and message id:
        # (revision, entry as marked). Put in the ledger at each batch's start until it has
        # them (`_overlay`).
        self._intents: dict[int, dict[str, tuple[int, bytes]]] = {}
        # Per partition, the receipts offset before which every intent is of a try whose
        # mark the coming commit holds (`IntentsFrom`, written with it).
        self._intents_from: dict[int, int] = {}
        # Partitions held, and those whose intents are still to be read (since the group's
        # last assignment).
        self._owned: frozenset[int] = frozenset()
        self._unread: set[int] = set()
        # When this worker took a partition it holds, with no revocation or loss since
        # (`StreamWorker.held_since`): whoever made a try of it before is gone by then, and
        # can have written nothing of its call since (`_written_by`).
        self._held_since: Callable[[int], datetime | None] = lambda _partition: None
        self._delays = {
            "short": settings.retry_short_seconds,
            "medium": settings.retry_medium_seconds,
            "long": settings.retry_long_seconds,
        }
        self._policy = ConcludePolicy(
            attempts=settings.send_attempts,
            delays=self._delays,
            pause_seconds=settings.provider_pause_seconds,
            caps=self._caps,
        )

    @property
    def providers(self) -> Mapping[Channel, Provider]:
        return self._providers

    @providers.setter
    def providers(self, providers: Mapping[Channel, Provider]) -> None:
        self._providers = providers
        # Known once: a protocol check per send costs more than the check is worth.
        self._stagers = {
            channel: provider
            for channel, provider in providers.items()
            if isinstance(provider, StagingProvider)
        }

    # --- a batch ------------------------------------------------------------------------------

    async def process(
        self,
        records: list[Record],
        prove_owner: ProveOwner,
        within_lease: Callable[[], bool] = lambda: True,
        held_since: Callable[[int], datetime | None] = lambda _partition: None,
    ) -> None:
        """Handle a batch: one task per contact, a contact's records in offset order, each try's
        mark made durable by its own intent (`_durable`) and the rest committed with the batch.
        `prove_owner` is awaited before each intent and right before each provider call
        (`StreamWorker.prove_owner`): a worker that was stopped past its lease asks the group
        again, and calls nothing once its partitions have moved on. `within_lease` is asked
        again at the last moment before the call's bytes go out
        (`StreamWorker.owner_within_lease`): a call made under the lease that still waited for
        its first step, or for a pooled connection, when the worker was stopped does not go
        out once it resumes (`LeaseLapsed`). `held_since` says when the worker took each
        partition (`StreamWorker.held_since`; `_written_by`)."""
        self._prove_owner = prove_owner
        self._within_lease = within_lease
        self._held_since = held_since
        contacts: dict[tuple[int, str], list[Record]] = {}
        for record in records:
            key = record.key if record.key is not None else f"#{record.offset}"
            contacts.setdefault((record.partition, key), []).append(record)
        self.ledger.use_gate(self._durable)
        await self._overlay()
        try:
            await run_all([partial(self._contact_records, mine) for mine in contacts.values()])
        except Fenced as exc:
            if exc.moved_on:
                self._cut_off_calls()
            raise
        self._note_intents_from()

    # --- intents: each try's mark, durable before its call ----------------------------------

    async def _durable(self, message_id: str, rev: int, entry: bytes) -> None:
        """Make a try's `sending` mark (`entry`, at revision `rev`) durable before its call:
        its intent acknowledged by the broker in the request's partition of the receipts
        topic, and kept until the ledger has the mark (`_overlay`); the mark itself commits
        with the batch. A try is marked within its record's partition (`_contact_records`
        focuses it, and the ledger writes nowhere else): without one, there is no partition
        to write the intent to, and the try is not made."""
        partition = focused()
        if partition is None:
            raise RuntimeError("a try marked outside a record's partition")
        # Ownership is proven before the intent, with half its lease left, as well as right
        # before the call (`_call`), which then finds the lease standing: a proof asks the
        # group coordinator, and tries whose intents were written while they waited on it
        # would be found `sending`, uncalled, after a crash.
        await self._prove_owner(OWNER_LEASE_LEFT_BEFORE_INTENT)
        offset = await self.receipts.intend(partition, message_id, rev, entry)
        self._intents.setdefault(partition, {})[message_id] = (rev, entry)
        reached = self._intents_from.get(partition, 0)
        self._intents_from[partition] = max(reached, offset + 1)

    def on_assignment(self, owned: frozenset[int]) -> None:
        """The group handed out an assignment (`StreamWorker.on_assignment`): the kept calls
        of partitions handed elsewhere are cut off (`keep_calls_of`), and every partition held
        has its intents read again before its next batch: another worker may have held it
        meanwhile."""
        self.keep_calls_of(owned)
        self._owned = owned
        self._unread = set(owned)
        self._intents.clear()
        self._intents_from.clear()

    async def _overlay(self) -> None:
        """At a batch's start: read the intents of partitions taken since the group's last
        assignment (from where their last commit said, to their end), then put every mark the
        ledger lacks in it, staged with the batch. A worker killed after a try's intent and
        before its batch committed leaves the try as if its mark had committed: `sending`,
        found and concluded as such."""
        for partition in sorted(self._unread & self._owned):
            await self._read_intents(partition)
            self._unread.discard(partition)
        for partition, pending in self._intents.items():
            focus(partition)
            for message_id, (rev, entry) in list(pending.items()):
                current = self.ledger.revision(message_id)
                if current is not None and current >= rev:
                    del pending[message_id]  # the ledger has the mark, or what came after it
                    continue
                self.ledger.overlay(message_id, rev, await self._as_erasure_left(entry))
        focus(None)

    async def _read_intents(self, partition: int) -> None:
        focus(partition)
        start = self.stores.intents_from.get()
        found, end = await through_outages(
            lambda: self.receipts.intents(partition, start), what="dispatcher.intents"
        )
        self._intents[partition] = found
        self._intents_from[partition] = end
        if found:
            log.info("dispatcher.intents_read", partition=partition, start=start, found=len(found))

    async def _as_erasure_left(self, entry: bytes) -> bytes:
        """An intent's entry as the ledger keeps it: nothing of a contact erased since."""
        fields = from_json(entry)
        key = fields.get("contact_key")
        if isinstance(key, str) and await self.stores.forgotten.includes(key):
            return to_json(forgotten_entry(fields))
        return entry

    def _note_intents_from(self) -> None:
        """Where the next owner of each partition must read intents from, staged with the
        batch's commit: every intent written before is of a mark this commit holds, or one
        put back by `_overlay` in this batch."""
        for partition, offset in self._intents_from.items():
            if partition in self._owned:
                focus(partition)
                self.stores.intents_from.put(offset)
        focus(None)

    async def _contact_records(self, records: list[Record]) -> None:
        for record in records:
            focus(record.partition)
            if record.topic == SEND_REQUESTS.name:
                await self.on_request(record)
            elif record.topic in self._retry_topics:
                await self.on_retry(record)
            else:
                await self.on_report(record)

    # --- the three streams -------------------------------------------------------------------

    async def on_request(self, record: Record) -> None:
        try:
            request = SendRequest.model_validate_json(record.value)
        except ValidationError as exc:
            await self.dead_letters.send(record, f"undecodable send request: {exc}")
            return
        await self.dead_letters.guard(
            record, lambda: self.handle(request, record), "dispatcher.request"
        )

    async def on_retry(self, record: Record) -> None:
        try:
            retry = SendRetry.model_validate_json(record.value)
        except ValidationError as exc:
            await self.dead_letters.send(record, f"undecodable send retry: {exc}")
            return
        # The worker hands a retry over once it is due (`retry_due`).
        await self.dead_letters.guard(
            record, lambda: self.handle_retry(retry, record), "dispatcher.retry"
        )

    async def on_report(self, record: Record) -> None:
        """Delivery reports, opens, clicks, (un)subscribes and erasures, as the segmenter
        accepted them (`waypost.delivery-reports.v1`)."""
        try:
            event = Event.model_validate_json(record.value)
        except ValidationError as exc:
            await self.dead_letters.send(record, f"undecodable delivery report: {exc}")
            return
        if forged(event):
            # A client cannot move a ledger entry or change consent: ingest refuses these
            # names, and the segmenter dead-letters any that get through.
            log.warning("dispatcher.forged_report", name=event.event, source=event.source)
            return
        if event.label == CONTACT_FORGOTTEN:
            work = partial(self._forget, event.contact_key)
        else:
            work = partial(self.on_event, event)
        await self.dead_letters.guard(record, work, "dispatcher.report")

    # --- requests and retries ----------------------------------------------------------------

    async def handle(self, request: SendRequest, record: Record) -> None:
        """Deliver one request at most once (marketing) or at least once (transactional)."""
        if await self._skip_forgotten(request):
            return
        await self._claimed(request, record)

    async def _claimed(self, request: SendRequest, record: Record) -> None:
        claim = await self.ledger.claim(request, self.clock.now())
        entry = None if claim.new else await self._entry(request.message_id)
        called = self._calls.get(request.message_id)
        move = progress.after_claim(
            claim.new,
            entry,
            **self._facts(request),
            called=called.attempt if called is not None else None,
            parked=self._parked_try(request.message_id),
        )
        await self._carry_out(move, request, record)

    async def handle_retry(self, retry: SendRetry, record: Record) -> None:
        request = retry.request
        if await self._skip_forgotten(request):
            return
        entry = await self._entry(request.message_id)
        move = progress.on_retry(
            entry,
            retry.attempt,
            retry.due_at,
            **self._facts(request),
            parked=self._parked_try(request.message_id),
        )
        await self._carry_out(move, request, record, reconcile_tries=retry.reconcile_tries)

    async def _entry(self, message_id: str) -> progress.Entry | None:
        found = await self.ledger.get(message_id)
        return None if found is None else progress.Entry.of(found)

    def _facts(self, request: SendRequest) -> dict[str, bool]:
        # A try left `sending` is always looked into: its call receipt, then the provider
        # where it can be asked (`progress.Reconcile`).
        return {"transactional": request.transactional, "reconcilable": True}

    async def _receipt(
        self, request: SendRequest, try_id: str | None, marked_at: datetime
    ) -> Outcome | None:
        """What the call of a try another worker left `sending` answered, from its receipt
        (None: no receipt)."""
        partition = focused()
        if try_id is None or partition is None:
            return None
        receipt = await self.receipts.find(partition, request.message_id, try_id, marked_at)
        if request.channel == "email":
            self._voucher_from_receipts(partition)
        if receipt is None:
            return None
        found = receipt.outcome
        log.info(
            "dispatcher.receipt_found",
            message_id=request.message_id,
            try_id=try_id,
            outcome=found.kind,
        )
        return found if found.reason else replace(found, reason=RECEIPT_REASON)

    def _voucher_from_receipts(self, partition: int) -> None:
        """The newest email the server accepted, by this worker's route, among the receipts
        just read of `partition`: a voucher for the events log as good as one of this worker's
        own sends (a worker that took over may have none), kept unless a newer one is."""
        accepted = self.receipts.accepted(partition, self._email_route)
        if accepted is None:
            return
        message_id, at = accepted
        if self.clock.now() - at > RECEIPT_VOUCHES_WITHIN:
            return
        kept = self._receipt_voucher
        if kept is None or kept[1] < at:
            self._receipt_voucher = (message_id, at)

    def _write_receipt(
        self,
        channel: str,
        partition: int,
        message_id: str,
        try_id: str,
        address: str,
        call: asyncio.Future[Outcome],
    ) -> None:
        """The receipt of a call that answered, or could not be made (unsendable); not of one
        cut off or failed, whose outcome is unknown, as the ledger's `sending` already says.
        Without the address a provider's reason may quote."""
        if call.cancelled():
            return
        failed = call.exception()
        if isinstance(failed, ValueError):
            outcome = _unsendable(channel, failed)
        elif failed is not None:
            return
        else:
            outcome = call.result()
        if outcome.reason:
            outcome = replace(outcome, reason=without_address(outcome.reason, address))
        route = self._email_route if channel == "email" else None
        self.receipts.record(partition, message_id, try_id, outcome, route)

    async def _carry_out(
        self,
        move: progress.Move,
        request: SendRequest,
        record: Record,
        *,
        reconcile_tries: int = 0,
    ) -> None:
        """Carry out what `domain.progress` decided. `reconcile_tries`: how often the provider
        was asked about this try before and could not tell (a retry record that asks again)."""
        match move:
            case progress.Attempt(attempt=attempt, try_name=try_name):
                await self._attempt(request, attempt, try_name, record)
            case progress.Requeue(attempt=attempt, due=due, reason=reason):
                await self._enqueue(request, attempt, due or self.clock.now(), reason)
            case progress.Reconcile(attempt=attempt, began=began, resend=resend, try_id=try_id):
                own = self._own_call(request.message_id, attempt, record.partition)
                if own is not None:
                    # This worker made the call (its batch failed, and a retry record of the
                    # request was read again): its answer, once it comes, is at hand.
                    answered = await _answer(own.call, request.channel)
                    if answered.kind != "unknown":
                        await self._after_call(
                            request, attempt, record, None, answered, own.began, own.address
                        )
                        return
                written_by = self._written_by(began, record.partition, own)
                receipt = await self._receipt(request, try_id, began or request.requested_at)
                can_ask = self._can_reconcile(request)
                if reconcile_tries == 0:  # counted once, not again by a record asking again
                    ask = "provider" if can_ask else "nothing"
                    settled_by = "receipt" if receipt is not None else ask
                    self.metrics.stopped_try(request.channel, settled_by)
                if receipt is not None:  # it answered: concluded as the call would have been
                    await self._conclude(request, receipt, attempt, record, send_address(request))
                    return
                if not can_ask:  # no provider to ask: as if nothing could be found out
                    stopped_entry = progress.Entry("sending", attempt, sending_at=began)
                    unasked = progress.resume(
                        stopped_entry, transactional=request.transactional, reconcilable=False
                    )
                    await self._carry_out(unasked, request, record)
                    return
                # Ask the provider: found, it is sent; proven absent, a new try is safe.
                stopped = Outcome("unknown", progress.STOPPED)
                asked = await self._reconciled(request, stopped, None, began, written_by)
                outcome = asked.outcome
                if outcome.kind == "sent" or not resend:
                    if await self._ask_later(request, attempt, reconcile_tries, asked):
                        return
                    await self._conclude(request, outcome, attempt, record, asked.address)
                else:
                    await self._attempt(request, attempt + 1, "resumed", record)
            case progress.AwaitCall(attempt=attempt):
                # What `_claimed` found; kept, should this batch fail too before it commits.
                called = self._calls[request.message_id]
                answered = await _answer(called.call, request.channel)
                await self._after_call(
                    request, attempt, record, None, answered, called.began, called.address
                )
            case progress.Conclude(outcome=outcome, attempt=attempt):
                await self._conclude(request, outcome, attempt, record, None)
            case progress.Done():
                pass
            case _:
                assert_never(move)

    async def _attempt(
        self, request: SendRequest, attempt: int, try_name: str, record: Record
    ) -> None:
        """One try at the provider. `try_name` names the try (the first, a retry record's due
        time, a resumption), so copies of the same try meet at the same ledger marker."""
        prepared = await self._prepare(request)
        if isinstance(prepared, Outcome):
            await self._conclude(request, prepared, attempt, record, None)
            return
        channel = request.channel
        now = self.clock.now()
        paused = self._paused_until.get(channel)
        if paused is not None and paused > now:
            await self._enqueue(
                request, attempt, paused, f"{channel} paused by a configuration error"
            )
            return
        # Marked `sending` only once it holds a call slot, and once the provider holds all of
        # the message but its last step (`Staged`): a crash strands no try that was still
        # waiting for a slot or talking to an SMTP server.
        step = self.metrics.step
        asked = self._monotonic()
        async with self._call_slot(channel, self._buckets[channel].reserve(asked)):
            slotted = self._monotonic()
            step(channel, "slot", slotted - asked)
            staged = await self._stage(channel, prepared)
            began = self.clock.now()
            ready = self._monotonic()
            step(channel, "stage", ready - slotted)
            if isinstance(staged, Outcome):
                outcome: Outcome | None = staged  # refused before it could be taken: unmarked
            else:
                try_id = f"{attempt}:{try_name}"
                try:
                    begun = await self.ledger.begin(request.message_id, try_id, attempt, began)
                except BaseException:  # its intent or a proof failed, or the batch: no call made
                    staged.abandon()
                    self._park(request.message_id, try_id, began)
                    raise
                step(channel, "mark", self._monotonic() - ready)
                if begun:
                    outcome = await self._call(channel, staged, prepared, attempt, began, try_id)
                else:
                    staged.abandon()
                    outcome = None
        if outcome is None:
            await self._after_lost_begin(request, attempt, record)
            return
        await self._after_call(request, attempt, record, prepared, outcome, began, prepared.address)

    async def _after_call(
        self,
        request: SendRequest,
        attempt: int,
        record: Record,
        prepared: Delivery | None,
        outcome: Outcome,
        began: datetime,
        address: str,
    ) -> None:
        """What the provider answered, concluded (an unknown SMS or email asked about first;
        `prepared` None: an SMS is rendered again for the asking)."""
        if outcome.kind == "sent" and request.channel == "email":
            self._accepted_email(outcome.provider_id)
        if outcome.kind == "unknown" and self._can_reconcile(request):
            # The call is over: nothing of it can be written after this.
            asked = await self._reconciled(request, outcome, prepared, began, self.clock.now())
            if await self._ask_later(request, attempt, 0, asked):
                return
            outcome = asked.outcome
        await self._conclude(request, outcome, attempt, record, address)

    def _call_slot(self, channel: Channel, wait: float) -> _CallSlot:
        """One of the channel's provider call slots (`DispatcherSettings.in_flight`), after
        `wait` seconds of its rate limit."""
        return _CallSlot(self._slots[channel], wait)

    async def _stage(self, channel: Channel, prepared: Delivery) -> Staged | Outcome:
        """The message handed to a provider that stages (`StagingProvider`: SMTP) all but its
        last step, before its try is marked; another provider's call is made whole by
        `_call`."""
        provider = self._stagers.get(channel)
        if provider is None:
            return _WholeCall(self.providers[channel], prepared)
        return await provider.stage(prepared)

    async def _call(
        self,
        channel: Channel,
        staged: Staged,
        prepared: Delivery,
        attempt: int,
        began: datetime,
        try_id: str,
    ) -> Outcome:
        """The provider call (the last step of `staged`) of a try that holds a slot and is
        durable as `sending` (marked `try_id` at `began`), remembered (`Called`): once made, it
        runs to its end even when the batch fails meanwhile, unless the group moved the
        partitions on. Should the proof of ownership fail, the try is parked (`_park`): it
        never reached the provider."""
        with self.metrics.in_flight.labels(channel).track_inprogress():
            try:
                await self._prove_owner(0.0)
            except BaseException:
                staged.abandon()
                self._park(prepared.message_id, try_id, began)
                raise
            # No await from here to the call's start: nothing can stop the task in between.
            # The lease is asked again as the call starts, and by an HTTP call once it has
            # its connection (`channels.http.BEFORE_SENDING`).
            before = BEFORE_SENDING.set(self._check_lease)
            try:
                call = _begun(staged, self._check_lease)
            finally:
                BEFORE_SENDING.reset(before)
            # Cut off before its task ran, the staged message is dropped: unsent, unless
            # it was started (an email's "." went out as the call began), and then with its
            # answer unread, so the try stays `sending`: it may have arrived.
            call.add_done_callback(partial(_abandon_if_cut_off, staged))
            # Its lease lapsed before it started: parked, whoever awaits it (a call kept
            # past a failed batch is awaited by the batch that reads its request again).
            call.add_done_callback(partial(self._if_lapsed, prepared.message_id, try_id, began))
            timing = _CallTiming(self._monotonic, channel, self.metrics.step)
            call.add_done_callback(timing.answered)
            partition = focused()
            if partition is not None:
                call.add_done_callback(
                    partial(
                        self._write_receipt,
                        channel,
                        partition,
                        prepared.message_id,
                        try_id,
                        prepared.address,
                    )
                )
            called = Called(attempt, began, prepared.address, call, self._monotonic(), focused())
            call.add_done_callback(partial(self._ended, called))
            self._remember(prepared.message_id, called)
            # A lapsed lease raises here (`LeaseLapsed`): it never went out, and read
            # again, the try is made anew (`_if_lapsed` parked it).
            answer = await _answer(call, channel)
            timing.back()
            return answer

    def _ended(self, called: Called, _call: asyncio.Future[Outcome]) -> None:
        called.ended = self.clock.now()

    def _if_lapsed(
        self, message_id: str, try_id: str, began: datetime, call: asyncio.Future[Outcome]
    ) -> None:
        if call.cancelled() or not isinstance(call.exception(), LeaseLapsed):
            return
        kept = self._calls.get(message_id)
        if kept is not None and kept.call is call:
            del self._calls[message_id]
        self._park(message_id, try_id, began)

    def _check_lease(self) -> None:
        if not self._within_lease():
            raise LeaseLapsed("the lease on the partitions lapsed before the call went out")

    def _cut_off_calls(self) -> None:
        """The group moved this worker's partitions on (`Fenced.moved_on`): another worker now
        handles their requests, so no call of this one may still go out. Calls under way are
        cut off, whether they still wait for a connection or a session (they never reach the
        provider) or are on the wire (their outcome is then unknown, as the new owner finds
        it), and forgotten. Any other failure of a batch lets them run: this worker may read
        their requests again and conclude with their answers; should the group then hand
        their partitions to another worker, `keep_calls_of` cuts them off."""
        self._cut(lambda _partition: True, forget_answered=False)

    def keep_calls_of(self, owned: frozenset[int]) -> None:
        """The group handed out an assignment (`StreamWorker.on_assignment`): the calls this
        worker kept running after a failed batch, for partitions it no longer holds, are cut
        off (`_cut_off_calls`) and every remembered call of those partitions forgotten. The
        new owner reads their requests and takes the tries for stopped; a call of this worker
        that went out after that could only send a message twice. Calls of the partitions
        handed back to this worker run on, for the batch it reads again."""
        cut = self._cut(
            lambda partition: partition is not None and partition not in owned,
            forget_answered=True,
        )
        self.receipts.forget(owned)
        if cut:
            log.warning("dispatcher.calls_cut_off", calls=len(cut), partitions=sorted(set(cut)))

    def _cut(self, of: Callable[[int | None], bool], *, forget_answered: bool) -> list[int]:
        """Cancel and forget the unfinished calls of the partitions `of` picks (the answered
        ones too, when `forget_answered`), and forget their parked tries: the new owner decides
        what their markers mean. The partitions of the calls cut, one per call (-1: a call made
        outside a partition, in tests)."""
        cut: list[int] = []
        for message_id, called in list(self._calls.items()):
            if not of(called.partition):
                continue
            if not called.call.done():
                called.call.cancel()
                cut.append(called.partition if called.partition is not None else -1)
            elif not forget_answered:
                continue
            del self._calls[message_id]
        for message_id, parked in list(self._parked.items()):
            if of(parked.partition):
                del self._parked[message_id]
        return cut

    def _remember(self, message_id: str, called: Called) -> None:
        # Retrieved here, so that a call nobody asks about again never logs as unretrieved.
        called.call.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._parked.pop(message_id, None)
        self._calls.pop(message_id, None)
        self._calls[message_id] = called
        _forget_oldest(self._calls, called.at, lambda kept: kept.call.done())

    def _park(self, message_id: str, try_id: str, began: datetime) -> None:
        """Remember a try that never reached its call (`Parked`), for as long and as many as
        calls are remembered."""
        now = self._monotonic()
        self._parked.pop(message_id, None)
        self._parked[message_id] = Parked(progress.Marked(try_id, began), now, focused())
        _forget_oldest(self._parked, now, lambda _kept: True)

    def _parked_try(self, message_id: str) -> progress.Marked | None:
        parked = self._parked.get(message_id)
        if parked is None or parked.at < self._monotonic() - CALLS_KEPT_SECONDS:
            return None
        return parked.marked

    async def _after_lost_begin(self, request: SendRequest, attempt: int, record: Record) -> None:
        """Another copy holds this try (`domain.progress.after_lost_begin`)."""
        entry = await self._entry(request.message_id)
        move = progress.after_lost_begin(entry, attempt, **self._facts(request))
        await self._carry_out(move, request, record)

    def _can_reconcile(self, request: SendRequest) -> bool:
        if request.channel == "sms":
            return self.sms_history is not None
        return request.channel == "email" and self.email_history is not None

    async def _ask_later(
        self, request: SendRequest, attempt: int, tries: int, asked: _Asked
    ) -> bool:
        """A marketing try without an answer that the provider could not tell about yet: a
        retry record asks it again later, the ledger entry left `sending` meanwhile. Its
        listing could not be had: after `*_reconcile_again_seconds`
        (`domain.progress.after_unlisted`), False when asked enough (it concludes unknown). It
        was asked before it could tell: when it can (`domain.progress.when_told`). False for
        a transactional send, which is tried again instead, and when the asking told."""
        if request.transactional or not (asked.unlisted or asked.ask_at is not None):
            return False
        if asked.ask_at is not None:
            again: progress.AskAgain | None = progress.when_told(attempt, tries, asked.ask_at)
            reason = "asked the provider before it could tell: asking again"
        else:
            delays = (
                self.settings.email_reconcile_again_seconds
                if request.channel == "email"
                else self.settings.sms_reconcile_again_seconds
            )
            again = progress.after_unlisted(attempt, tries, self.clock.now(), delays)
            reason = "the provider's listing could not be had: asking again"
        if again is None:
            return False
        await self._write_retry(
            SendRetry(
                request=request,
                attempt=again.attempt,
                due_at=again.due,
                reason=reason,
                reconcile_tries=again.tries,
            )
        )
        log.info(
            "dispatcher.reconcile_later",
            channel=request.channel,
            message_id=request.message_id,
            tries=again.tries,
            due=again.due.isoformat(),
        )
        return True

    def _own_call(self, message_id: str, attempt: int, partition: int) -> Called | None:
        """This worker's call of the message's `attempt` in `partition`, if it made one lately."""
        called = self._calls.get(message_id)
        if called is None or called.attempt != attempt or called.partition != partition:
            return None
        return called

    def _written_by(self, began: datetime | None, partition: int, own: Called | None) -> datetime:
        """The latest moment a stopped try's call (marked at `began`) could still have been
        written to its provider. Made by another worker, or by this one before it lost the
        partition: when this worker took the partition, since whoever made the call is gone by
        then (killed, or fenced by the group). Made by this worker (`own`, ended by now): when
        the call ended. Not the try's start: a worker can mark a try and write its request
        seconds later (a busy loop, a wait for a pooled connection) and die right after, and a
        provider that has not read that request yet when asked would show it absent. A
        partition not known to be held (a harness driving the dispatcher directly) counts from
        the try's start (now, when that is not known)."""
        since = self._held_since(partition)
        latest = began or since or self.clock.now()
        if since is not None:
            latest = max(latest, since)
        if own is not None:
            latest = max(latest, own.ended or self.clock.now())
        return latest

    async def _reconciled(
        self,
        request: SendRequest,
        unanswered: Outcome,
        delivery: Delivery | None,
        began: datetime | None,
        written_by: datetime,
    ) -> _Asked:
        """What a try without an answer came to, by its provider: `sent`, `retry` (it never
        arrived) or `unanswered` with the reason it stays unknown, and whether asking again
        later may tell. `began`: when the try began (None: not known); `written_by`: the
        latest its call could have been written (its end, or `_written_by`), from which the
        provider is given its settle time before an absence counts."""
        if request.channel == "email":
            return await self._reconciled_email(request, unanswered, delivery, began, written_by)
        return await self._reconciled_sms(
            request, unanswered, delivery, began or request.requested_at, written_by
        )

    async def _reconciled_email(
        self,
        request: SendRequest,
        unanswered: Outcome,
        delivery: Delivery | None,
        began: datetime | None,
        written_by: datetime,
    ) -> _Asked:
        """An email by the provider's events of its Message-ID, which is the same for every
        try of the message: nothing to render again. Found absent, it is taken for never
        arrived only once the log has shown a message this worker saw accepted
        (`_unvouched`)."""
        history = self.email_history
        assert history is not None
        message_id = message_id_header(request.message_id, self.settings.message_id_domain)
        answer = await history.events_of(message_id)
        settle = timedelta(seconds=self.settings.email_reconcile_settle_seconds)
        # The server may take a message until the client gives up on its answer, and no
        # sooner than the last of it was written.
        taken_by = (
            None
            if began is None
            else max(began + timedelta(seconds=self.settings.smtp_timeout_seconds), written_by)
        )
        now = self.clock.now()
        found = reconcile_email(answer, message_id, taken_by, now, settle)
        outcome = found.outcome
        unlisted = isinstance(answer, str)
        if outcome.kind == "retry":
            doubt = await self._unvouched(history, now, settle)
            if doubt is not None:  # absent from a log not shown to hold our mail
                outcome, unlisted = Outcome("unknown", f"not reconciled: {doubt}"), True
        log.info(
            "dispatcher.email_reconciled",
            message_id=request.message_id,
            outcome=outcome.kind,
            reason=outcome.reason,
        )
        address = delivery.address if delivery is not None else send_address(request)
        if outcome.kind == "unknown":
            why = f"{unanswered.reason}; {outcome.reason}"
            return _Asked(
                replace(unanswered, reason=why), address, unlisted=unlisted, ask_at=found.ask_at
            )
        return _Asked(outcome, address)

    def _accepted_email(self, message_id: str | None) -> None:
        """Keep a Message-ID the server was seen to accept, now and then (`VOUCHER_SPACING`),
        to check the events log against later (`_unvouched`); other workers' receipts give
        theirs by `_voucher_from_receipts`."""
        if message_id is None or self.email_history is None:
            return
        now = self.clock.now()
        kept = self._vouchers
        if not kept or now - kept[-1][1] >= VOUCHER_SPACING:
            kept.append((message_id, now))

    async def _unvouched(
        self, history: EmailHistory, now: datetime, settle: timedelta
    ) -> str | None:
        """None when the events log shows our mail: it showed, lately (`VOUCHED_FOR`) or now, a
        message this worker saw accepted (or found a receipt of, sent by its route) at least
        `settle` ago. Otherwise why not: an events
        URL of another domain or region answers every query with nothing, which must not pass
        for "never arrived"."""
        if self._vouched_at is not None and now - self._vouched_at < VOUCHED_FOR:
            return None
        # The newest one the log must show by now (an older one would be no younger).
        found = next(((m, at) for m, at in reversed(self._vouchers) if at + settle <= now), None)
        receipted = self._receipt_voucher
        if (
            receipted is not None
            and receipted[1] + settle <= now
            and (found is None or receipted[1] > found[1])
        ):
            found = receipted
        if found is None or now - found[1] > RETAINED:
            return (
                "no email this worker saw accepted, or found the receipt of, is old enough "
                "to check the events log"
            )
        voucher = found[0]
        doubt = vouches(await history.events_of(voucher), voucher)
        if doubt is None:
            self._vouched_at = now
        else:
            log.warning("dispatcher.email_events_unvouched", reason=doubt)
        return doubt

    async def _reconciled_sms(
        self,
        request: SendRequest,
        unanswered: Outcome,
        delivery: Delivery | None,
        began: datetime,
        written_by: datetime,
    ) -> _Asked:
        """An SMS by the provider's listing of the number."""
        assert self.sms_history is not None
        if delivery is None:  # a resumed try: rendered again, the same request gives the same body
            prepared = await self._prepare(request)
            if isinstance(prepared, Outcome):
                why = f"{unanswered.reason}; {prepared.reason}"
                return _Asked(replace(unanswered, reason=why), None)
            delivery = prepared
        content = delivery.content
        if not isinstance(content, SmsContent):
            return _Asked(unanswered, delivery.address)
        settle = timedelta(seconds=self.settings.sms_reconcile_settle_seconds)
        written_by = max(began, written_by)
        ready = written_by + settle
        wait = (began + settle - self.clock.now()).total_seconds()
        if wait > 0 and request.transactional:
            # A request still on its way would not be listed yet, and a transactional SMS not
            # found is sent again at once: it waits here, for the settle from its start (no
            # longer: sent at least once either way, it does not hold its batch's transaction a
            # whole settle past a timed-out call). A marketing one is asked now (found, it is
            # settled at once) and, not found, asked again once `ready` (a retry record).
            await asyncio.sleep(wait)
        # A listing takes one of the provider call slots: a burst of unanswered tries (a worker
        # taking over a stopped one's batch) asked all at once, and the requests waiting for a
        # pooled connection ran out their timeout there, on our side.
        async with self._slots["sms"]:
            listing = await self.sms_history.sent_to(delivery.address)
        service = self.settings.sms_messaging_service_sid
        sent = SmsTry(
            to=delivery.address,
            body=content.body,
            sender=None if service else self.settings.sms_from,
            messaging_service_sid=service,
            began=began,
            written_by=written_by,
        )
        found = reconcile_sms(listing, sent, self.clock.now(), settle)
        log.info(
            "dispatcher.sms_reconciled",
            message_id=request.message_id,
            outcome=found.kind,
            reason=found.reason,
        )
        if found.kind == "unknown":
            why = f"{unanswered.reason}; {found.reason}"
            return _Asked(
                replace(unanswered, reason=why),
                delivery.address,
                unlisted=isinstance(listing, str),
                ask_at=ready if found.reason == ASKED_TOO_SOON else None,
            )
        return _Asked(found, delivery.address)

    async def _prepare(self, request: SendRequest) -> Delivery | Outcome:
        """Checks at send time, then rendering; an Outcome("skipped") says why not."""
        channel = request.channel
        profile = request.profile
        if channel not in self.providers:
            return Outcome("skipped", f"channel_not_configured: {channel}")
        test = request.test
        # A test goes to the marketer who asked for it, not to the contact: no consent to read.
        recorded = (
            await self.stores.consent.get(request.contact_key, channel) if test is None else None
        )
        address = send_address(request)
        refusal = recipient_refusal(request, recorded, address)
        if refusal or address is None:
            return Outcome("skipped", refusal or f"no_address: {channel}")
        suppressed = suppression_refusal(await self.stores.suppressions.reason(channel, address))
        if suppressed:
            return Outcome("skipped", suppressed)
        rule = self._caps.get(channel)
        if rule is not None and not request.transactional:
            sends = await self.stores.caps.sends(request.contact_key, channel)
            tz = zone(str(profile.traits.get("timezone") or self.settings.default_timezone))
            capped = cap_refusal(rule, sends, self.clock.now(), tz)
            if capped:
                return Outcome("skipped", capped)
        template = (
            await self.stores.templates.ready(request.template_id, channel)
            if test is None
            else test.content
        )
        if template is None:
            return Outcome("skipped", f"template_not_ready: {request.template_id}")
        try:
            content = self._render(request, template)
        except (RenderError, ValueError) as exc:  # ValueError: content the builders refuse
            return Outcome("skipped", f"template_error: {request.template_id}: {exc}")
        return Delivery(request.message_id, request.contact_key, channel, address, content)

    def _render(self, request: SendRequest, template: Mapping[str, Any]) -> MessageContent:
        claims = LinkClaims(
            kind="unsubscribe",
            message_id=request.message_id,
            contact_key=request.contact_key,
            is_user=request.profile.user_id == request.contact_key,
            channel=request.channel,
            template_id=request.template_id,
            journey_id=request.journey_id,
            step_id=request.step_id,
            issued_at=int(request.requested_at.timestamp()),
        )
        context = RenderContext(
            self.links,
            claims,
            request.transactional,
            # A test's opens and clicks are the marketer's, not the contact's.
            track_opens=self.settings.track_opens and request.test is None,
            track_clicks=self.settings.track_clicks and request.test is None,
        )
        return self._kits[request.channel].render(template, render_variables(request), context)

    # --- outcomes ------------------------------------------------------------------------------

    async def _conclude(
        self,
        request: SendRequest,
        outcome: Outcome,
        attempt: int,
        record: Record,
        address: str | None,
    ) -> None:
        """Carry out what the outcome comes to (`domain.conclude`); `address`: where the try
        went, when it went anywhere."""
        channel = request.channel
        now = self.clock.now()
        self.metrics.outcome(channel, outcome.kind)
        plan = conclude(request, outcome, attempt, address, self._policy, now)
        for waiting in plan.before:
            match waiting:
                case DeadLetter(reason=reason):
                    await self.dead_letters.send(record, reason)
                case PauseChannel(until=until, reason=reason):
                    self._pause(channel, until, reason)
                case Wait(attempt=next_attempt, due=due, reason=reason, delay_class=delay_class):
                    await self._enqueue(request, next_attempt, due, reason, delay_class)
                case _:
                    assert_never(waiting)
        if plan.state is None or plan.outcome is None:
            return  # the request waits on a retry topic
        final = plan.outcome
        first = await self.ledger.conclude(
            request.message_id,
            plan.state,
            now,
            reason=final.reason,
            code=final.code,
            provider_id=final.provider_id,
        )
        if not first:
            return  # already concluded by another copy
        for step in plan.after:
            if request.test is not None and isinstance(step, WithdrawConsent | Announce):
                continue  # the contact neither received a test nor answered it
            match step:
                case CountSend(rule=rule):
                    await self.stores.caps.count(
                        request.contact_key,
                        channel,
                        now,
                        lambda sends: kept_sends(rule, sends, now),
                    )
                case WithdrawConsent():
                    await self.stores.consent.record(request.contact_key, channel, False, now)
                    await self._emit(
                        request,
                        UNSUBSCRIBED,
                        f"{request.message_id}:provider-opt-out",
                        {"channel": channel, "method": "provider", "reason": final.reason},
                        now,
                    )
                case SuppressAddress(address=bad):
                    await self.stores.suppressions.add(channel, bad, final.reason or "", now)
                case Announce():
                    await self._announce(request, step, now)
                case FallBack(request=following):
                    await self._claimed(following, record)
                case _:
                    assert_never(step)

    async def _enqueue(
        self,
        request: SendRequest,
        attempt: int,
        due: datetime,
        reason: str,
        delay_class: str | None = None,
    ) -> None:
        """Hand the request to a retry topic, then mark the ledger. Holds (a paused channel)
        come here too: they wait for `due` without spending an attempt."""
        retry = SendRetry(request=request, attempt=attempt, due_at=due, reason=reason)
        await self._write_retry(retry, delay_class)
        await self.ledger.retrying(request.message_id, attempt, due, reason, self.clock.now())
        log.info("dispatcher.retry", message_id=request.message_id, attempt=attempt, due=due)

    async def _write_retry(self, retry: SendRetry, delay_class: str | None = None) -> None:
        """The retry record to its delay class's topic (by how far off it is due, unless
        named)."""
        if delay_class is None:
            delay = (retry.due_at - self.clock.now()).total_seconds()
            delay_class = class_for_delay(delay, self._delays)
        await self.producer.send(
            SEND_RETRIES[delay_class].name, retry.request.contact_key, retry.to_wire()
        )

    def _pause(self, channel: str, until: datetime, reason: str | None) -> None:
        if self._paused_until.get(channel, until) <= until or channel not in self._paused_until:
            self._paused_until[channel] = until
        self.metrics.paused(channel, until, reason)
        log.error("dispatcher.provider_paused", channel=channel, until=until, reason=reason)
        if self.pauses is not None:  # for the admin, off the send path: nothing waits on it
            task = asyncio.create_task(self._record_pause(self.pauses, channel, until, reason))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)

    async def _record_pause(
        self, pauses: PauseRecord, channel: str, until: datetime, reason: str | None
    ) -> None:
        try:
            await pauses.record(channel, until, reason, self.clock.now())
        except Exception:  # the pause holds anyway; only the admin's view lacks it
            log.exception("dispatcher.pause_unrecorded", channel=channel, until=until)

    async def _announce(self, request: SendRequest, announce: Announce, now: datetime) -> None:
        state, outcome = announce.state, announce.outcome
        properties: dict[str, Any] = {
            "channel": request.channel,
            "transactional": request.transactional,
        }
        for name, value in (
            ("reason", outcome.reason),
            ("code", outcome.code),
            ("provider_id", outcome.provider_id),
        ):
            if value:
                properties[name] = value
        if announce.address_invalid:
            properties["address_invalid"] = True
        if announce.address is not None:  # the segmenter takes it off the profile
            properties["address"] = announce.address
        await self._emit(
            request, EVENT_NAMES[state], f"{request.message_id}:{state}", properties, now
        )
        log_outcome(request.message_id, state, outcome.reason)

    async def _emit(
        self,
        request: SendRequest,
        name: str,
        event_id: str,
        properties: dict[str, Any],
        now: datetime,
    ) -> None:
        profile = request.profile
        event = Event(
            type="track",
            event=name,
            user_id=profile.user_id,
            anonymous_id=None if profile.user_id else request.contact_key,
            message_id=event_id,
            timestamp=now,
            received_at=now,
            properties={
                "message_id": request.message_id,
                "template_id": request.template_id,
                "journey_id": request.journey_id,
                "journey_version": request.journey_version,
                "step_id": request.step_id,
                **properties,
            },
            source="waypost-dispatcher",
        )
        await self.producer.send(EVENTS.name, event.contact_key, event.to_wire())

    # --- reports -------------------------------------------------------------------------------

    async def on_event(self, event: Event) -> None:
        label = event.label
        props = event.properties
        if label in (UNSUBSCRIBED, SUBSCRIBED):
            for channel, given in consent_changes(event).items():
                await self.stores.consent.record(event.contact_key, channel, given, event.timestamp)
            return
        message_id = props.get("message_id")
        if not isinstance(message_id, str):
            return
        if label == MESSAGE_UNDELIVERED:
            reason = f"undelivered: {props.get('status')} {props.get('error_code')}"
            await self.ledger.undelivered(
                message_id, event.timestamp, reason=reason, code=str(props.get("error_code"))
            )
            return
        state = TRACKED.get(label)
        if state is not None:
            await self.ledger.track(message_id, state, event.timestamp)

    async def _forget(self, contact_key: str) -> None:
        await self.stores.forgotten.record(contact_key, self.clock.now())
        await self.stores.caps.forget(contact_key)
        await self.stores.consent.forget(contact_key)
        await self.ledger.forget(contact_key)

    async def _skip_forgotten(self, request: SendRequest) -> bool:
        """A request or retry of an erased contact is never delivered: its ledger entry ends
        `skipped` without the contact's key, and no event is announced (no contact is left to
        hear it)."""
        if not await self.stores.forgotten.includes(request.contact_key):
            return False
        if await self.ledger.skip_forgotten(request, self.clock.now()):
            self.metrics.outcome(request.channel, "skipped")
            log_outcome(request.message_id, "skipped", FORGOTTEN_REASON)
        return True


class _CallSlot:
    """`Dispatcher._call_slot`: a class rather than a generator, for it is taken once per
    try."""

    __slots__ = ("_held", "_slots", "_wait")

    def __init__(self, slots: asyncio.Semaphore, wait: float) -> None:
        self._slots = slots
        self._wait = wait
        self._held = False

    async def __aenter__(self) -> None:
        if self._wait > 0:
            await asyncio.sleep(self._wait)
        await self._slots.acquire()
        self._held = True

    async def __aexit__(self, *_: object) -> None:
        if self._held:
            self._held = False
            self._slots.release()


class _CallTiming:
    """A call's time to its answer (`answered`, its done-callback), and the task's time from
    the answer until it is back in (`back`), as `DispatchMetrics.step` takes them."""

    def __init__(
        self,
        monotonic: Callable[[], float],
        channel: str,
        step: Callable[[str, str, float], None],
    ) -> None:
        self._monotonic = monotonic
        self._channel = channel
        self._step = step
        self._started = monotonic()
        self._answered: float | None = None

    def answered(self, call: asyncio.Future[Outcome]) -> None:
        if call.cancelled():
            return
        self._answered = self._monotonic()
        self._step(self._channel, "call", self._answered - self._started)

    def back(self) -> None:
        if self._answered is not None:
            self._step(self._channel, "back", self._monotonic() - self._answered)


@dataclass(frozen=True)
class _WholeCall:
    """A provider call made in one step (`Staged` with nothing staged)."""

    provider: Provider
    delivery: Delivery

    def start(self) -> None:
        pass  # an HTTP request needs its connection first: it all goes in `finish`

    async def finish(self) -> Outcome:
        return await self.provider.send(self.delivery)

    def abandon(self) -> None:
        pass


class LeaseLapsed(Fenced):
    """A call's last check found the worker's proof of ownership past its lease (the worker
    was stopped while the call waited to start): the call did not go out, and the batch ends
    as a fenced one does; the group says, when it is read again, whether the partitions are
    still this worker's."""


def _begun(staged: Staged, check: Callable[[], None]) -> asyncio.Future[Outcome]:
    """A call's last step, begun now once `check` passes: what can go out at once goes out in
    this turn of the event loop (`Staged.start`: an email's "."), the rest runs as a task, never
    checked again (its message may be out). When `check` raises (`LeaseLapsed`), the staged
    message is dropped unsent and the call's task fails with it as it starts."""
    try:
        check()
    except LeaseLapsed as exc:
        return asyncio.ensure_future(_lapsed(staged, exc))
    staged.start()
    return asyncio.ensure_future(staged.finish())


async def _lapsed(staged: Staged, lapsed: LeaseLapsed) -> Outcome:
    staged.abandon()
    raise lapsed


def _abandon_if_cut_off(staged: Staged, call: asyncio.Future[Outcome]) -> None:
    if call.cancelled():
        staged.abandon()


async def _answer(call: asyncio.Future[Outcome], channel: str) -> Outcome:
    """What a provider call answered; the call goes on when the waiting task is cancelled."""
    try:
        return await asyncio.shield(call)
    except ValueError as exc:
        return _unsendable(channel, exc)


def _unsendable(channel: str, exc: ValueError) -> Outcome:
    """The content or address cannot be written as this provider's request (a header the
    email library refuses, text it cannot encode): it never left, and never will."""
    return Outcome("skipped", f"unsendable: {channel}: {type(exc).__name__}: {exc}")


async def _outside_a_batch(*_: float) -> None:
    raise RuntimeError("a provider call outside a batch")


def email_route(settings: DispatcherSettings) -> str:
    """What names the way this worker's emails go and are looked up: the SMTP server and login,
    the Message-ID domain and the events log. A receipt written by a worker with another route
    (before a deploy that moved the mail) does not vouch for this worker's events log."""
    return stable_id(
        "email route",
        settings.smtp_host,
        settings.smtp_port,
        settings.smtp_username or "",
        settings.message_id_domain,
        settings.email_events_url or "",
        length=16,
    )


def retry_due(record: Record) -> datetime | None:
    """When a retry record is due (None, handled at once, when it cannot be read: then it is
    dead-lettered with the reason)."""
    try:
        return SendRetry.model_validate_json(record.value).due_at
    except ValidationError:
        return None
