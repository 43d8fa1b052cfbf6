"""Segment counts over time: the admin reads every segment's live count at a steady interval
and keeps one reading per segment and interval (`segment_count_history`), so a segment's page
can draw how its count moved. Several admin processes write the same reading, not one each."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from shared.clock import Clock

log = structlog.get_logger(__name__)

HISTORY = "segment_count_history"


class CountHistory:
    def __init__(self, db: AsyncDatabase[dict[str, Any]], interval: float) -> None:
        self._history = db[HISTORY]
        self.interval = interval

    async def prepare(self) -> None:
        """A segment's page reads its readings by time."""
        await self._history.create_index([("segment", 1), ("at", 1)])

    async def record(self, members: Mapping[str, int], now: datetime) -> None:
        """One reading per segment for the interval `now` falls in (idempotent)."""
        step = int(self.interval)
        slot = datetime.fromtimestamp(int(now.timestamp()) // step * step, UTC)
        writes = [
            ReplaceOne(
                {"_id": f"{segment_id}@{slot.isoformat()}"},
                {"segment": segment_id, "at": slot, "members": count},
                upsert=True,
            )
            for segment_id, count in members.items()
        ]
        if writes:
            await self._history.bulk_write(writes, ordered=False)

    async def readings(
        self, segment_id: str, since: datetime, limit: int = 2000
    ) -> list[tuple[datetime, int]]:
        cursor = (
            self._history.find({"segment": segment_id, "at": {"$gte": since}})
            .sort("at", -1)
            .limit(limit)
        )
        found = [(d["at"], int(d["members"])) async for d in cursor]
        return sorted((at if at.tzinfo else at.replace(tzinfo=UTC), n) for at, n in found)


async def keep_recording(
    history: CountHistory,
    latest: Callable[[], Mapping[str, int]],
    clock: Clock,
    stop: asyncio.Event,
) -> None:
    """Record the live counts every interval until `stop`; a store that is away is tried again
    at the next interval (a missing reading is a gap in the chart, nothing more)."""
    prepared = False
    while not stop.is_set():
        try:
            if not prepared:
                await history.prepare()
                prepared = True
            await history.record(latest(), clock.now())
        except PyMongoError as exc:
            log.warning("admin.count_history_unwritten", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=history.interval)


def since(now: datetime, hours: float) -> datetime:
    return now - timedelta(hours=hours)
