"""Publishes accepted events to Kafka, keyed by contact key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.contracts import Event
from shared.kafka import AsyncProducer
from shared.topics import EVENTS


class EventPublisher(Protocol):
    async def publish(self, events: Sequence[Event]) -> None:
        """Return only after the broker acknowledged every event."""


class KafkaEventPublisher:
    def __init__(self, producer: AsyncProducer) -> None:
        self._producer = producer

    async def publish(self, events: Sequence[Event]) -> None:
        await self._producer.send_all((EVENTS.name, e.contact_key, e.to_wire()) for e in events)
