"""Orchestrator shell: decode a stimulus, load the contact's state, decide, publish, store.

Outputs are acknowledged by Kafka before the new state is written, so a crash can only repeat
work (de-duplicated downstream by deterministic ids), never lose it. The same agent keeps the
segmenter's per-contact clock and forgets contacts, in order with the contact's other stimuli.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Protocol

import structlog

from services.orchestrator.adapters.audience_schedule import AudienceSchedule, Progress
from services.orchestrator.adapters.definitions import CatalogSource, DefinitionsCatalog
from services.orchestrator.adapters.timers import TimerStore, timer_key
from services.orchestrator.adapters.webhooks import Webhooks
from services.orchestrator.domain.segment_clock import SEGMENT_CLOCK, reevaluation, segment_timer
from services.orchestrator.settings import OrchestratorSettings
from shared.batching import Focus, Overlay, no_focus
from shared.clock import Clock
from shared.contracts import (
    ContactEvent,
    JourneyLogRecord,
    SegmentTimerRequest,
    TimerFired,
    WebhookResult,
    wire_json,
)
from shared.deadletter import DeadLetters, failure_reason, through_outages
from shared.ids import stable_id
from shared.journey_engine.engine import decide
from shared.journey_engine.state import (
    AppendLog,
    CallWebhook,
    CancelTimer,
    ChangeContact,
    ContactState,
    EventArrived,
    RequestSend,
    ScheduleTimer,
    Stimulus,
    TimerDue,
    WebhookAnswered,
)
from shared.kafka import AsyncProducer, DeliveryFailed, ProducerBusy, Record
from shared.profiles import CONTACT_FORGOTTEN
from shared.streams import StreamWorker, focus
from shared.system_events import forged
from shared.topics import (
    CONTACT_COMMANDS,
    CONTACT_EVENTS,
    JOURNEY_LOG,
    SEGMENT_TIMERS,
    SEND_REQUESTS,
    TIMERS,
    WEBHOOK_RESULTS,
)

log = structlog.get_logger(__name__)

# What the agent handles: the engine's stimuli, and the segmenter's requests for its clock.
Incoming = Stimulus | SegmentTimerRequest


class Publisher(Protocol):
    async def send_all(self, records: Iterable[tuple[str, str | None, bytes | None]]) -> None: ...


CONTACTS, TIMERS_TABLE = "contacts", "timers"


class Journeys:
    """Folds batches of stimuli: load each contact's row, decide, publish, then store.

    A batch is folded in offset order against an `Overlay` (a later stimulus of a contact sees
    the earlier one's state and timers); its outputs are produced without a wait per stimulus
    and acknowledged once; then timer rows are stored, then contact rows, then webhook calls
    start. A stimulus that fails on its own is dead-lettered and leaves nothing in the batch; a
    batch whose publish fails for another reason than an outage is folded again one stimulus
    at a time. `contacts` and the timers' table are any mutable mappings of bytes: the worker's
    tables (addressed by the stimulus's partition through `focus`), dicts in tests.
    """

    def __init__(
        self,
        contacts: MutableMapping[bytes, bytes],
        timers: TimerStore,
        catalog: CatalogSource,
        producer: Publisher,
        clock: Clock,
        webhooks: Webhooks,
        dead_letters: DeadLetters | None = None,
        *,
        coupon_key: bytes,
    ) -> None:
        self.contacts = contacts
        self.timers = timers
        self.catalog = catalog
        self.producer = producer
        self.clock = clock
        self.webhooks = webhooks
        self.dead_letters = dead_letters
        self.coupon_key = coupon_key
        self._batch = Overlay()
        self._focus: Focus = no_focus

    async def process(self, records: Sequence[Record], focus: Focus | None = None) -> None:
        """Handle a batch of records (offset order per partition); returns once their outputs
        are acknowledged and their rows stored."""
        self._focus = focus or no_focus
        if records:
            await self._run(list(records))

    async def handle(self, incoming: Incoming, partition: int = 0) -> None:
        """One decoded stimulus as a batch of its own (failures are raised, not dead-lettered)."""
        try:
            self._fold(incoming, partition)
        except Exception:
            self._batch.discard()
            raise
        self._batch.keep()
        await self.producer.send_all(self._batch.to_send())
        self._store()

    async def _run(self, chunk: list[Record]) -> None:
        batch = self._batch
        for record in chunk:
            self._focus(record.partition)
            try:
                for incoming in _decode(record.topic, record.value):
                    self._fold(incoming, record.partition)
            except Exception as exc:
                batch.discard()
                if self.dead_letters is None:
                    raise
                batch.emit(
                    self.dead_letters.letter(record, failure_reason(exc, record, "orchestrator"))
                )
            batch.keep()
        try:
            await through_outages(
                lambda: self.producer.send_all(batch.to_send()),
                what="orchestrator",
                record=chunk[0],
            )
        except Exception as exc:
            batch.abandon()
            if len(chunk) > 1:
                for record in chunk:
                    await self._run([record])
                return
            if self.dead_letters is None:
                raise
            await self.dead_letters.send(chunk[0], failure_reason(exc, chunk[0], "orchestrator"))
            return
        self._store()

    def _store(self) -> None:
        """Timer rows before contact rows (the worker's `contacts` table is its primary one, so
        its changelog is written after the timers'): should a crash keep only the first writes,
        a timer without its instance is dropped when it fires, while the stimulus that is then
        redelivered to the old contact row decides (and schedules) the same again."""
        batch = self._batch
        writes = list(batch.writes())
        for write in writes:
            if write.table == TIMERS_TABLE:
                self._focus(write.partition)
                self.timers.apply(write.value)
        for write in writes:
            if write.table == CONTACTS:
                self._focus(write.partition)
                if write.value is None:
                    self.contacts.pop(write.key, None)
                else:
                    self.contacts[write.key] = wire_json(write.value)
        batch.stored()

    # --- deciding one stimulus into the batch ----------------------------------------------

    def _fold(self, incoming: Incoming, partition: int) -> None:
        if isinstance(incoming, SegmentTimerRequest):
            self._timer(
                partition, segment_timer(incoming)
            )  # replaces the contact's row or drops it
            return
        if isinstance(incoming, TimerDue) and incoming.timer.instance_id == SEGMENT_CLOCK:
            self._segment_clock_fired(incoming.timer, partition)
            return
        if isinstance(incoming, EventArrived) and incoming.contact_event.event.label == (
            CONTACT_FORGOTTEN
        ):
            self._forget(incoming.contact_event, partition)
            return
        self._decide(incoming, partition)

    def _decide(self, stimulus: Stimulus, partition: int) -> None:
        key = _contact_key(stimulus)
        state = self._state(key)
        if isinstance(stimulus, TimerDue) and (
            state is None or stimulus.timer.instance_id not in state.instances
        ):
            self._drop_stray_timer(stimulus.timer, partition)
            return
        decision = decide(
            state, stimulus, self.catalog.current(), self.clock.now(), coupon_key=self.coupon_key
        )
        unchanged = decision.state == (state or ContactState(contact_key=key))
        if not decision.commands and unchanged:
            return  # nothing to publish and nothing to store (a stale timer, an ignored event)
        batch = self._batch
        for command in decision.commands:
            if isinstance(command, RequestSend):
                batch.emit((SEND_REQUESTS.name, key, command.request.to_wire()))
            elif isinstance(command, AppendLog):
                batch.emit((JOURNEY_LOG.name, key, command.record.to_wire()))
            elif isinstance(command, ChangeContact):
                batch.emit((CONTACT_COMMANDS.name, key, command.command.to_wire()))
            elif isinstance(command, ScheduleTimer | CancelTimer):
                self._timer(partition, command)
            elif isinstance(command, CallWebhook):
                batch.after_store(partial(self.webhooks.start, command.call))
        batch.put(CONTACTS, key.encode(), partition, decision.state)

    def _drop_stray_timer(self, fired: TimerFired, partition: int) -> None:
        """A timer of an instance the contact does not have (its row outlived a crash between
        the two writes, or its contact was forgotten): the engine would ignore it, so drop its
        row instead of letting it fire again forever. If the instance comes back (the stimulus
        that scheduled it is redelivered), it schedules the row again."""
        if self._timer_id(fired.contact_key, fired.instance_id) == fired.timer_id:
            self._timer(partition, CancelTimer(fired.contact_key, fired.instance_id))

    def _segment_clock_fired(self, fired: TimerFired, partition: int) -> None:
        stored = self._timer_id(fired.contact_key, SEGMENT_CLOCK)
        command = reevaluation(fired, stored)
        if command is None:
            return  # stale: the row was replaced or cancelled since this firing
        self._batch.emit((CONTACT_COMMANDS.name, fired.contact_key, command.to_wire()))
        # Stored only after the acknowledgement: a crash before it fires (and asks) again.
        self._timer(partition, CancelTimer(fired.contact_key, SEGMENT_CLOCK))

    def _forget(self, forgotten: ContactEvent, partition: int) -> None:
        """Drop every row the orchestrator keeps for the contact; nothing is decided. One
        journey-log record, `forgotten`, follows the contact's others on the partition, so the
        admin's journey log deletes their documents once it has written every one of them."""
        contact_key = forgotten.contact_key
        at = forgotten.event.timestamp
        self._batch.emit(
            (
                JOURNEY_LOG.name,
                contact_key,
                JourneyLogRecord(
                    record_id=stable_id(forgotten.event.message_id, "journey-log"),
                    kind="forgotten",
                    journey_id="",
                    journey_version=0,
                    instance_id="",
                    contact_key=contact_key,
                    at=at,
                ).to_wire(),
            )
        )
        state = self._state(contact_key)
        if state is not None:
            for instance_id in state.instances:
                self._timer(partition, CancelTimer(contact_key, instance_id))
            self._batch.delete(CONTACTS, contact_key.encode(), partition)
        self._timer(partition, CancelTimer(contact_key, SEGMENT_CLOCK))
        log.info("orchestrator.contact_forgotten", had_state=state is not None)

    # --- the batch's view of the tables ----------------------------------------------------

    def _state(self, key: str) -> ContactState | None:
        raw_key = key.encode()

        def stored() -> ContactState | None:
            raw = self.contacts.get(raw_key)
            return ContactState.model_validate_json(raw) if raw else None

        state: ContactState | None = self._batch.get(CONTACTS, raw_key, stored)
        return state

    def _timer(self, partition: int, command: ScheduleTimer | CancelTimer) -> None:
        slot = timer_key(command.contact_key, command.instance_id)
        self._batch.put(TIMERS_TABLE, slot, partition, command)

    def _timer_id(self, contact_key: str, instance_id: str) -> str | None:
        def stored() -> ScheduleTimer | CancelTimer | None:
            timer_id = self.timers.timer_id(contact_key, instance_id)
            if timer_id is None:
                return None
            return ScheduleTimer(contact_key, instance_id, timer_id, self.clock.now())

        pending = self._batch.get(TIMERS_TABLE, timer_key(contact_key, instance_id), stored)
        return pending.timer_id if isinstance(pending, ScheduleTimer) else None


class Orchestrator:
    """Wires the shell to its stream worker: one processor over contact events, timers, webhook
    answers and segment timer requests (so one contact's stimuli apply in order), the timer
    ticker and the audience schedule's ticker."""

    def __init__(
        self,
        worker: StreamWorker,
        settings: OrchestratorSettings,
        clock: Clock,
        catalog: DefinitionsCatalog,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        audience_progress: Progress,
        *,
        coupon_key: bytes,
    ) -> None:
        self.worker = worker
        self.clock = clock
        self.producer = producer
        self.dead_letters = dead_letters
        # One compact row per waiting instance, on the same partitions as the contact's row.
        self.timers = TimerStore(
            worker.table(TIMERS_TABLE),
            refire_after=timedelta(seconds=settings.timer_refire_seconds),
            refire_max=timedelta(seconds=settings.timer_refire_max_seconds),
        )
        self.journeys = Journeys(
            worker.table(CONTACTS, primary=True),
            self.timers,
            catalog,
            producer,
            clock,
            Webhooks(
                producer,
                clock,
                settings.webhook_destinations(),
                deadline_seconds=settings.webhook_deadline_seconds,
                max_in_flight=settings.webhook_max_in_flight,
            ),
            dead_letters,
            coupon_key=coupon_key,
        )
        self.timer_fire_batch = settings.timer_fire_batch
        worker.consume(
            [CONTACT_EVENTS.name, TIMERS.name, WEBHOOK_RESULTS.name, SEGMENT_TIMERS.name],
            self._process,
        )
        worker.on_assigned(self._rebuild_timer_index)
        worker.every(settings.timer_tick_seconds, self._fire_due_timers)
        self.audience_schedule = AudienceSchedule(
            catalog=catalog,
            progress=audience_progress,
            producer=producer,
            clock=clock,
            partitions=settings.topic_partitions,
            owns_schedule=self._owns_schedule,
        )
        worker.every(settings.audience_tick_seconds, self.audience_schedule.tick)

    async def _process(self, records: list[Record]) -> None:
        await self.journeys.process(records, focus)

    def _owns_schedule(self) -> bool:
        """Whether this worker holds partition 0 of the contact events: the schedule's owner."""
        return 0 in self.worker.owned()

    async def _fire_due_timers(self) -> None:
        # Fired entries are re-armed, not dropped (see adapters/timers.py), so this loop ends, and
        # a round whose publish fails is sent again at the re-arm time.
        self.timers.compact_if_needed()
        try:
            while fired := self.timers.pop_due(self.clock.now(), self.timer_fire_batch):
                await self.producer.send_all(
                    (TIMERS.name, t.contact_key, t.to_wire()) for t in fired
                )
        except (DeliveryFailed, ProducerBusy) as exc:
            log.warning("orchestrator.timers_publish_failed", error=str(exc))

    def _rebuild_timer_index(self, _owned: frozenset[int]) -> None:
        started = self.clock.now()
        pending = self.timers.rebuild()
        log.info(
            "orchestrator.timers_recovered",
            pending=pending,
            seconds=round((self.clock.now() - started).total_seconds(), 3),
            index_bytes=self.timers.index_bytes(),
        )


def _decode(topic: str, value: bytes) -> list[Incoming]:
    """The stimuli of one record: a contact event holds a change and everything it announced,
    each a stimulus of its own (in order, all with the change's profile)."""
    if topic == TIMERS.name:
        return [TimerDue(TimerFired.model_validate_json(value))]
    if topic == WEBHOOK_RESULTS.name:
        return [WebhookAnswered(WebhookResult.model_validate_json(value))]
    if topic == SEGMENT_TIMERS.name:
        return [SegmentTimerRequest.model_validate_json(value)]
    stimuli: list[Incoming] = []
    for single in ContactEvent.model_validate_json(value).each():
        event = single.event
        if forged(event):
            # Only Waypost announces erasures, segment, tag and attribute changes: the segmenter
            # dead-letters such names from other sources, so one here came by another route.
            log.warning("orchestrator.forged_event", name=event.event, source=event.source)
            continue
        stimuli.append(EventArrived(single))
    return stimuli


def _contact_key(stimulus: Stimulus) -> str:
    if isinstance(stimulus, TimerDue):
        return stimulus.timer.contact_key
    if isinstance(stimulus, WebhookAnswered):
        return stimulus.result.contact_key
    return stimulus.contact_event.contact_key
