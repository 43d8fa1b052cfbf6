"""Segmenter shell: fold each event or contact command into the contact's profile, publish it.

Events and contact commands go through one agent, so one contact's changes apply in order and a
profile never sees two writers at once.

The contact-event and profile records are acknowledged before the profile is stored, so a crash
repeats an event at worst; the orchestrator and the dispatcher are idempotent on its ids.
"""

from __future__ import annotations

from collections.abc import Iterable

import faust
import structlog
from pydantic import ValidationError

from services.segmenter.settings import SegmenterSettings
from shared.clock import Clock
from shared.contracts import ContactCommand, ContactEvent, Event, Profile
from shared.deadletter import DeadLetters
from shared.faust_app import record_of
from shared.kafka import AsyncProducer
from shared.profiles import apply_command, apply_event
from shared.topics import CONTACT_COMMANDS, CONTACT_EVENTS, EVENTS, PROFILES

log = structlog.get_logger(__name__)


class Segmenter:
    """One agent over events and contact commands with a RocksDB-backed profile table."""

    def __init__(
        self,
        app: faust.App,
        settings: SegmenterSettings,
        clock: Clock,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
    ) -> None:
        self.clock = clock
        self.producer = producer
        self.dead_letters = dead_letters
        self.profiles = app.Table(
            "profiles",
            partitions=settings.topic_partitions,
            key_type=bytes,
            value_type=bytes,
        )
        source = app.topic(
            EVENTS.name, CONTACT_COMMANDS.name, key_serializer="raw", value_serializer="raw"
        )
        app.agent(source, name="profiles")(self._process)

    async def _process(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            record = record_of(event)
            try:
                if record.topic == CONTACT_COMMANDS.name:
                    incoming: Event | ContactCommand = ContactCommand.model_validate_json(
                        record.value
                    )
                else:
                    incoming = Event.model_validate_json(record.value)
                    incoming.contact_key  # noqa: B018 - raises when the event has no contact key
            except (ValidationError, ValueError) as exc:
                await self.dead_letters.send(record, f"undecodable: {exc}")
                continue
            try:
                if isinstance(incoming, ContactCommand):
                    await self.handle_command(incoming)
                else:
                    await self.handle(incoming)
            except Exception as exc:
                log.exception("segmenter.event_failed", key=record.key)
                await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")

    async def handle(self, event: Event) -> None:
        current = self._load(event.contact_key)
        applied = apply_event(current, event, self.clock.now())
        if not applied.accepted:
            log.debug("segmenter.duplicate", message_id=event.message_id)
            return
        # The event first, then the attribute changes it caused, in the contact's order.
        await self._publish(applied.profile, (event, *applied.announcements))

    async def handle_command(self, command: ContactCommand) -> None:
        current = self._load(command.contact_key)
        changed = apply_command(current, command, self.clock.now())
        if changed.profile != current:
            await self._publish(changed.profile, changed.events)

    def _load(self, contact_key: str) -> Profile | None:
        raw = self.profiles.get(contact_key.encode())
        return Profile.model_validate_json(raw) if raw else None

    async def _publish(self, profile: Profile, events: Iterable[Event]) -> None:
        """Each event with the profile after it, then the profile; stored once Kafka acked."""
        key = profile.contact_key
        records = [
            (
                CONTACT_EVENTS.name,
                key,
                ContactEvent(contact_key=key, event=e, profile=profile).to_wire(),
            )
            for e in events
        ]
        records.append((PROFILES.name, key, profile.to_wire()))
        await self.producer.send_all(records)
        self.profiles[key.encode()] = profile.model_dump_json().encode()
