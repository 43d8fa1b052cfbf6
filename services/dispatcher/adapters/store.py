"""The dispatcher's documents: templates (read, cached), and the record of a paused channel.

The ledger, caps and consent live in the worker's tables (`adapters/tables.py`); the ledger's
`messages` collection is a view of them (`adapters/ledger_view.py`); suppressions are a
compacted topic (`adapters/suppressions.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect, DuplicateKeyError, OperationFailure
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from shared.channel_pauses import CHANNEL_PAUSES, ChannelPause, next_pause

TEMPLATES = "templates"

# Server codes that mean "try again": a primary stepping down or shutting down, an interrupted
# operation, and InternalError (1), which is how FerretDB answers when its backend is away.
_TRANSIENT_CODES = frozenset({1, 91, 189, 10107, 11600, 11602, 13435, 13436})


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, DuplicateKeyError):
        return False  # the unique index speaking: an answer, not a hiccup
    if isinstance(exc, AutoReconnect):
        return True
    return isinstance(exc, OperationFailure) and (
        exc.code in _TRANSIENT_CODES
        or exc.has_error_label("RetryableWriteError")
        or exc.has_error_label("TransientTransactionError")
    )


# Every store call rides out short outages (a failover, a restart) instead of failing the
# send: the calls are idempotent, and a ledger step lost to a hiccup would turn a good send
# into an unknown one. A longer outage reaches the record's guard, which waits it out.
_retried = retry(
    retry=retry_if_exception(_transient),
    wait=wait_random_exponential(multiplier=0.05, max=2.0),
    stop=stop_after_delay(60),
    reraise=True,
)


class Templates:
    """Ready templates, each read at most once per `ttl` seconds: a campaign renders the same
    template for every contact, and an edit marked ready is live within `ttl`. A batch's sends
    that find the entry expired share one read (hundreds of reads of one document at once
    would queue for the store's few connections)."""

    def __init__(
        self,
        db: AsyncDatabase[dict[str, Any]],
        monotonic: Callable[[], float],
        ttl: float = 5.0,
    ) -> None:
        self._templates = db[TEMPLATES]
        self._monotonic = monotonic
        self._ttl = ttl
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._reading: dict[str, asyncio.Future[dict[str, Any] | None]] = {}

    async def ready(self, template_id: str, channel: str) -> Mapping[str, Any] | None:
        """The live content of a ready template for the channel, else None."""
        now = self._monotonic()
        cached = self._cache.get(template_id)
        if cached is not None and cached[0] > now:
            doc = cached[1]
        else:
            doc = await self._shared_read(template_id)
            self._cache[template_id] = (now + self._ttl, doc)
        if doc is None or doc.get("status") != "ready" or doc.get("channel", "email") != channel:
            return None
        return doc

    async def _shared_read(self, template_id: str) -> dict[str, Any] | None:
        reading = self._reading.get(template_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(template_id))
            self._reading[template_id] = reading
            reading.add_done_callback(lambda _done: self._reading.pop(template_id, None))
        # A waiter cancelled (its batch fenced) must not cancel the read the others share.
        return await asyncio.shield(reading)

    @_retried
    async def _read(self, template_id: str) -> dict[str, Any] | None:
        return await self._templates.find_one({"_id": template_id})


class ChannelPauses:
    """Where a channel's pause is recorded for the admin (`shared.channel_pauses`): one document
    per channel. Pauses are rare; the dispatcher writes them off the send path."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], worker: str, gap: timedelta) -> None:
        self._pauses = db[CHANNEL_PAUSES]
        self._worker = worker
        self._gap = gap

    @_retried
    async def record(
        self, channel: str, until: datetime, reason: str | None, now: datetime
    ) -> ChannelPause:
        found = await self._pauses.find_one({"_id": channel})
        previous = ChannelPause.from_document(found) if found is not None else None
        pause = next_pause(previous, channel, until, reason, now, self._worker, self._gap)
        await self._pauses.replace_one({"_id": channel}, pause.document(), upsert=True)
        return pause
