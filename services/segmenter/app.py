"""Segmenter shell: fold each event into the contact's profile and publish the result.

The contact-event and profile records are acknowledged before the profile is stored, so a crash
repeats an event at worst; the orchestrator and the dispatcher are idempotent on its ids.
"""

from __future__ import annotations

import faust
import structlog
from pydantic import ValidationError

from services.segmenter.domain.profile import apply_event
from services.segmenter.settings import SegmenterSettings
from shared.clock import Clock
from shared.contracts import ContactEvent, Event, Profile
from shared.deadletter import DeadLetters
from shared.faust_app import record_of
from shared.kafka import AsyncProducer
from shared.topics import CONTACT_EVENTS, EVENTS, PROFILES

log = structlog.get_logger(__name__)


class Segmenter:
    """One agent over `waypost.events.v1` with a RocksDB-backed profile table."""

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
        source = app.topic(EVENTS.name, key_serializer="raw", value_serializer="raw")
        app.agent(source, name="profiles")(self._process)

    async def _process(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            record = record_of(event)
            try:
                incoming = Event.model_validate_json(record.value)
                incoming.contact_key  # noqa: B018 - raises when the event has no contact key
            except (ValidationError, ValueError) as exc:
                await self.dead_letters.send(record, f"undecodable event: {exc}")
                continue
            try:
                await self.handle(incoming)
            except Exception as exc:
                log.exception("segmenter.event_failed", key=record.key)
                await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")

    async def handle(self, event: Event) -> None:
        key = event.contact_key.encode()
        raw = self.profiles.get(key)
        current = Profile.model_validate_json(raw) if raw else None
        applied = apply_event(current, event, self.clock.now())
        if not applied.accepted:
            log.debug("segmenter.duplicate", message_id=event.message_id)
            return
        profile = applied.profile
        contact_event = ContactEvent(contact_key=profile.contact_key, event=event, profile=profile)
        await self.producer.send_all(
            [
                (CONTACT_EVENTS.name, profile.contact_key, contact_event.to_wire()),
                (PROFILES.name, profile.contact_key, profile.to_wire()),
            ]
        )
        self.profiles[key] = profile.model_dump_json().encode()
