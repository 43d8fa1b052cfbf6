"""The receipts topic of a dispatcher's partitions, in memory, for unit tests: the same contract
as `services.dispatcher.adapters.receipts.CallReceipts` (`handlers.Receipts`), whose Kafka side
the e2e tests cover."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from services.dispatcher.domain.outcomes import Outcome, Receipt


class Log:
    """The receipts topic of one worker's partitions, in memory: its records in order, intents
    and receipts alike, and the message ids whose receipts were looked for (`asked`).
    `fail_intents` refuses the next intents; `lose_receipts` drops receipts (a call still on
    the wire when its worker died)."""

    def __init__(self) -> None:
        self.records: dict[int, list[tuple[Any, ...]]] = {}
        self.read_from: list[int | None] = []
        self.asked: list[str] = []
        self.fail_intents: list[BaseException] = []
        self.lose_receipts = False
        # When a receipt is written (its record time); a test may put its own clock here.
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

    def record(
        self,
        partition: int,
        message_id: str,
        try_id: str,
        outcome: Outcome,
        route: str | None = None,
    ) -> None:
        if not self.lose_receipts:
            kept = self.records.setdefault(partition, [])
            kept.append(("receipt", message_id, try_id, outcome, route, self.now()))

    async def find(
        self, partition: int, message_id: str, try_id: str, marked_at: datetime
    ) -> Receipt | None:
        self.asked.append(message_id)
        found = None
        for record in self.records.get(partition, []):
            if record[0] == "receipt" and record[1] == message_id:
                found = Receipt(record[3], record[4]) if record[2] == try_id else None
        return found

    def accepted(self, partition: int, route: str) -> tuple[str, datetime] | None:
        found = None
        for record in self.records.get(partition, []):
            if record[0] != "receipt" or record[4] != route:
                continue
            outcome: Outcome = record[3]
            if outcome.kind == "sent" and outcome.provider_id:
                found = (outcome.provider_id, record[5])
        return found

    def forget(self, partitions: frozenset[int]) -> None:
        pass

    async def intend(self, partition: int, message_id: str, rev: int, entry: bytes) -> int:
        if self.fail_intents:
            raise self.fail_intents.pop()
        kept = self.records.setdefault(partition, [])
        kept.append(("intent", message_id, rev, entry))
        return len(kept) - 1

    async def intents(
        self, partition: int, start: int | None
    ) -> tuple[dict[str, tuple[int, bytes]], int]:
        self.read_from.append(start)
        kept = self.records.get(partition, [])
        found = {
            record[1]: (record[2], record[3])
            for record in kept[start or 0 :]
            if record[0] == "intent"
        }
        return found, len(kept)

    def intents_of(self, message_id: str, partition: int = 0) -> int:
        return sum(1 for r in self.records.get(partition, []) if r[:2] == ("intent", message_id))

    def receipts(self, partition: int = 0) -> list[tuple[str, str, Outcome]]:
        """The receipts written in `partition`, in order: message id, try id, outcome."""
        return [(r[1], r[2], r[3]) for r in self.records.get(partition, []) if r[0] == "receipt"]
