"""Poison records go to the dead-letter topic with the reason; the stream moves on."""

from __future__ import annotations

import structlog

from shared.clock import Clock
from shared.contracts import DeadLetter
from shared.kafka import AsyncProducer
from shared.topics import DEAD_LETTER

log = structlog.get_logger(__name__)


class DeadLetters:
    """Writes `DeadLetter` records for one service."""

    def __init__(self, producer: AsyncProducer, service: str, clock: Clock) -> None:
        self._producer = producer
        self._service = service
        self._clock = clock

    async def send(
        self, *, topic: str, partition: int, offset: int, key: str | None, value: bytes, reason: str
    ) -> None:
        record = DeadLetter(
            service=self._service,
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value.decode("utf-8", errors="replace"),
            reason=reason,
            at=self._clock.now(),
        )
        log.warning("dead_letter", topic=topic, partition=partition, offset=offset, reason=reason)
        await self._producer.send(DEAD_LETTER.name, key, record.to_wire())
