"""Orchestrator shell: decode a stimulus, load the contact's state, decide, publish, store.

Outputs are acknowledged by Kafka before the new state is written, so a crash can only repeat
work (de-duplicated downstream by deterministic ids), never lose it. The same agent keeps the
segmenter's per-contact clock and forgets contacts, in order with the contact's other stimuli.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from datetime import timedelta
from typing import Protocol

import faust
import structlog
from faust.exceptions import ConsumerNotStarted
from faust.types import TP

from services.orchestrator.adapters.audience_schedule import AudienceSchedule, Progress
from services.orchestrator.adapters.definitions import CatalogSource, DefinitionsCatalog
from services.orchestrator.adapters.timers import TimerStore
from services.orchestrator.adapters.webhooks import Webhooks
from services.orchestrator.domain.engine import decide
from services.orchestrator.domain.segment_clock import SEGMENT_CLOCK, reevaluation, segment_timer
from services.orchestrator.domain.state import (
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
from services.orchestrator.settings import OrchestratorSettings
from shared.clock import Clock
from shared.contracts import ContactEvent, SegmentTimerRequest, TimerFired, WebhookResult
from shared.deadletter import DeadLetters
from shared.faust_app import record_of
from shared.kafka import AsyncProducer, DeliveryFailed, ProducerBusy
from shared.profiles import CONTACT_FORGOTTEN
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
    async def send_all(self, records: Iterable[tuple[str, str | None, bytes]]) -> None: ...


class Journeys:
    """One contact's stimulus at a time: load its row, decide, publish, then store.

    `contacts` and the timers' table are any mutable mappings of bytes: Faust tables in the
    worker, dicts in tests.
    """

    def __init__(
        self,
        contacts: MutableMapping[bytes, bytes],
        timers: TimerStore,
        catalog: CatalogSource,
        producer: Publisher,
        clock: Clock,
        webhooks: Webhooks,
    ) -> None:
        self.contacts = contacts
        self.timers = timers
        self.catalog = catalog
        self.producer = producer
        self.clock = clock
        self.webhooks = webhooks

    async def handle(self, incoming: Incoming) -> None:
        if isinstance(incoming, SegmentTimerRequest):
            self.timers.apply(segment_timer(incoming))  # replaces the contact's row, or drops it
            return
        if isinstance(incoming, TimerDue) and incoming.timer.instance_id == SEGMENT_CLOCK:
            await self._segment_clock_fired(incoming.timer)
            return
        if isinstance(incoming, EventArrived) and incoming.contact_event.event.label == (
            CONTACT_FORGOTTEN
        ):
            self._forget(incoming.contact_event.contact_key)
            return
        await self._decide(incoming)

    async def _decide(self, stimulus: Stimulus) -> None:
        key = _contact_key(stimulus)
        raw = self.contacts.get(key.encode())
        state = ContactState.model_validate_json(raw) if raw else None
        if isinstance(stimulus, TimerDue) and (
            state is None or stimulus.timer.instance_id not in state.instances
        ):
            self._drop_stray_timer(stimulus.timer)
            return
        decision = decide(state, stimulus, self.catalog.current(), self.clock.now())
        unchanged = decision.state == (state or ContactState(contact_key=key))
        if not decision.commands and unchanged:
            return  # nothing to publish and nothing to store (a stale timer, an ignored event)
        records: list[tuple[str, str | None, bytes]] = []
        for command in decision.commands:
            if isinstance(command, RequestSend):
                records.append((SEND_REQUESTS.name, key, command.request.to_wire()))
            elif isinstance(command, AppendLog):
                records.append((JOURNEY_LOG.name, key, command.record.to_wire()))
            elif isinstance(command, ChangeContact):
                records.append((CONTACT_COMMANDS.name, key, command.command.to_wire()))
        await self.producer.send_all(records)
        # Timer rows before the contact row: should a crash keep only the first writes, a timer
        # without its instance is dropped when it fires, while the event that is then
        # redelivered to the old contact row decides (and schedules) the same again.
        for command in decision.commands:
            if isinstance(command, ScheduleTimer | CancelTimer):
                self.timers.apply(command)
        self.contacts[key.encode()] = decision.state.model_dump_json().encode()
        for command in decision.commands:
            if isinstance(command, CallWebhook):
                self.webhooks.start(command.call)

    def _drop_stray_timer(self, fired: TimerFired) -> None:
        """A timer of an instance the contact does not have (its row outlived a crash between
        the two writes, or its contact was forgotten): the engine would ignore it, so drop its
        row instead of letting it fire again forever. If the instance comes back (the stimulus
        that scheduled it is redelivered), it schedules the row again."""
        if self.timers.timer_id(fired.contact_key, fired.instance_id) == fired.timer_id:
            self.timers.apply(CancelTimer(fired.contact_key, fired.instance_id))

    async def _segment_clock_fired(self, fired: TimerFired) -> None:
        stored = self.timers.timer_id(fired.contact_key, SEGMENT_CLOCK)
        command = reevaluation(fired, stored)
        if command is None:
            return  # stale: the row was replaced or cancelled since this firing
        await self.producer.send_all(
            [(CONTACT_COMMANDS.name, fired.contact_key, command.to_wire())]
        )
        # Only after the acknowledgement: a crash before this line fires it (and asks) again.
        self.timers.apply(CancelTimer(fired.contact_key, SEGMENT_CLOCK))

    def _forget(self, contact_key: str) -> None:
        """Drop every row the orchestrator keeps for the contact; nothing is decided or logged."""
        raw = self.contacts.get(contact_key.encode())
        if raw is not None:
            state = ContactState.model_validate_json(raw)
            for instance_id in state.instances:
                self.timers.apply(CancelTimer(contact_key, instance_id))
            del self.contacts[contact_key.encode()]
        self.timers.apply(CancelTimer(contact_key, SEGMENT_CLOCK))
        log.info("orchestrator.contact_forgotten", had_state=raw is not None)


class Orchestrator:
    """Wires the shell to Faust: one agent over contact events, timers, webhook answers and
    segment timer requests (so one contact's stimuli apply in order), the timer ticker and the
    audience schedule's ticker."""

    def __init__(
        self,
        app: faust.App,
        settings: OrchestratorSettings,
        clock: Clock,
        catalog: DefinitionsCatalog,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
        audience_progress: Progress,
    ) -> None:
        self.app = app
        self.clock = clock
        self.producer = producer
        self.dead_letters = dead_letters
        # One compact row per waiting instance, on the same partitions as the contact's row.
        self.timers = TimerStore(
            app.Table(
                "timers",
                partitions=settings.topic_partitions,
                key_type=bytes,
                value_type=bytes,
                on_recover=self._rebuild_timer_index,
            ),
            refire_after=timedelta(seconds=settings.timer_refire_seconds),
            refire_max=timedelta(seconds=settings.timer_refire_max_seconds),
        )
        contacts = app.Table(
            "contacts",
            partitions=settings.topic_partitions,
            key_type=bytes,
            value_type=bytes,
        )
        self.journeys = Journeys(
            contacts, self.timers, catalog, producer, clock, Webhooks(producer, clock)
        )
        self.timer_fire_batch = settings.timer_fire_batch
        source = app.topic(
            CONTACT_EVENTS.name,
            TIMERS.name,
            WEBHOOK_RESULTS.name,
            SEGMENT_TIMERS.name,
            key_serializer="raw",
            value_serializer="raw",
        )
        app.agent(source, name="journeys")(self._process)
        app.timer(interval=settings.timer_tick_seconds)(self._fire_due_timers)
        self.audience_schedule = AudienceSchedule(
            catalog=catalog,
            progress=audience_progress,
            producer=producer,
            clock=clock,
            partitions=settings.topic_partitions,
            owns_schedule=self._owns_schedule,
        )
        app.timer(interval=settings.audience_tick_seconds)(self.audience_schedule.tick)

    async def _process(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            record = record_of(event)
            await self.dead_letters.guard(
                record,
                lambda record=record: self.journeys.handle(_decode(record.topic, record.value)),
                "orchestrator",
            )

    def _owns_schedule(self) -> bool:
        """Whether this worker holds partition 0 of the contact events: the schedule's owner."""
        try:
            assigned = self.app.consumer.assignment()
        except ConsumerNotStarted:
            return False
        return TP(CONTACT_EVENTS.name, 0) in assigned

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

    async def _rebuild_timer_index(self) -> None:
        started = self.clock.now()
        pending = self.timers.rebuild()
        log.info(
            "orchestrator.timers_recovered",
            pending=pending,
            seconds=round((self.clock.now() - started).total_seconds(), 3),
            index_bytes=self.timers.index_bytes(),
        )


def _decode(topic: str, value: bytes) -> Incoming:
    if topic == TIMERS.name:
        return TimerDue(TimerFired.model_validate_json(value))
    if topic == WEBHOOK_RESULTS.name:
        return WebhookAnswered(WebhookResult.model_validate_json(value))
    if topic == SEGMENT_TIMERS.name:
        return SegmentTimerRequest.model_validate_json(value)
    return EventArrived(ContactEvent.model_validate_json(value))


def _contact_key(stimulus: Stimulus) -> str:
    if isinstance(stimulus, TimerDue):
        return stimulus.timer.contact_key
    if isinstance(stimulus, WebhookAnswered):
        return stimulus.result.contact_key
    return stimulus.contact_event.contact_key
