"""Poison records go to the dead-letter topic with the reason; the stream moves on."""

from __future__ import annotations

import structlog

from shared.clock import Clock
from shared.contracts import DeadLetter
from shared.kafka import AsyncProducer, Record
from shared.topics import DEAD_LETTER

log = structlog.get_logger(__name__)


class DeadLetters:
    """Writes `DeadLetter` records for one service."""

    def __init__(self, producer: AsyncProducer, service: str, clock: Clock) -> None:
        self._producer = producer
        self._service = service
        self._clock = clock

    async def send(self, record: Record, reason: str) -> None:
        letter = DeadLetter(
            service=self._service,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value.decode("utf-8", errors="replace"),
            reason=reason,
            at=self._clock.now(),
        )
        log.warning(
            "dead_letter",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )
        await self._producer.send(DEAD_LETTER.name, record.key, letter.to_wire())
