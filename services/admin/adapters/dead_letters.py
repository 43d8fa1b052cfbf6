"""The dead-letter topic as the admin reads and replays it: the same reader and replay as the
`waypost dead-letters` command, run off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from shared.deadletter import StoredLetter, read_dead_letters, replay_dead_letters
from shared.kafka_connection import KafkaConnection


class DeadLetterTopic:
    def __init__(self, kafka: KafkaConnection | str) -> None:
        self._kafka = kafka

    async def letters(self) -> list[StoredLetter]:
        """Every letter the topic holds now."""
        return await asyncio.to_thread(read_dead_letters, self._kafka)

    async def replay(self, letters: Iterable[StoredLetter]) -> int:
        """Write each letter's record back to its topic; returns once Kafka acknowledged them."""
        return await asyncio.to_thread(replay_dead_letters, self._kafka, list(letters))
