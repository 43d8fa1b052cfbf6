"""Suppressed addresses: those a provider called permanently bad (a hard bounce, an unknown
number, a dead push token or openid). No channel send goes to them again, whoever's address it is.

The list is the compacted topic `waypost.suppressions.v1`, which every dispatcher worker reads
whole into memory (`CompactedTopicView`): a send looks its address up without a round trip, and
a suppression one worker records reaches the others within moments. A record's key is an
HMAC-SHA256 of the channel and the normalised address under `WAYPOST_SUPPRESSION_SECRET`, and
its value holds the reason and time only, so the list keeps no address: erasing a contact
leaves nothing of theirs in it, while their address stays suppressed should it come back.
Rotating the secret starts an empty list.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import structlog
from pymongo.asynchronous.database import AsyncDatabase

from shared.ids import keyed_digest
from shared.kafka import AsyncProducer, CompactedTopicView
from shared.topics import SUPPRESSIONS

log = structlog.get_logger(__name__)

# Where suppressions were kept before the list moved to its topic (read once, then emptied).
LEGACY_COLLECTION = "suppressions"


class SuppressionList:
    def __init__(self, view: CompactedTopicView, producer: AsyncProducer, key: bytes) -> None:
        self._view = view
        self._producer = producer
        self._key = key
        # What this worker recorded, at once (the view sees it once its batch commits).
        self._recorded: dict[str, bytes] = {}

    def key_of(self, channel: str, address: str) -> str:
        return keyed_digest(self._key, "suppression", channel, address.strip().casefold()).hex()

    async def reason(self, channel: str, address: str) -> str | None:
        key = self.key_of(channel, address)
        raw = self._recorded.get(key) or self._view.get(key)
        if raw is None:
            return None
        return str(json.loads(raw).get("reason") or "suppressed")

    async def add(self, channel: str, address: str, reason: str, now: datetime) -> None:
        """Suppress the address (again: the newest reason is kept)."""
        key = self.key_of(channel, address)
        kept = without_address(reason, address)
        value = json.dumps({"channel": channel, "reason": kept, "at": now.isoformat()}).encode()
        await self._producer.send(SUPPRESSIONS.name, key, value)
        self._recorded[key] = value


def without_address(reason: str, address: str) -> str:
    """The provider's reason as the list keeps it: a bounce often quotes the address it
    refused, which the list must not hold."""
    bare = address.strip()
    if not bare:
        return reason
    return re.sub(re.escape(bare), "<address>", reason, flags=re.IGNORECASE)


async def move_legacy_suppressions(
    db: AsyncDatabase[dict[str, Any]], suppressions: SuppressionList, producer: AsyncProducer
) -> int:
    """Suppressions an earlier version kept in the document store (`_id` = `channel:address`)
    onto the list, then out of the store; returns how many moved. Idempotent: a crash between
    the two repeats the move."""
    collection = db[LEGACY_COLLECTION]
    moved = 0
    async for doc in collection.find({}):
        channel, _, address = str(doc["_id"]).partition(":")
        if not address:
            continue
        value = {
            "channel": channel,
            "reason": str(doc.get("reason") or "suppressed"),
            "at": doc["at"].isoformat() if isinstance(doc.get("at"), datetime) else None,
        }
        key = suppressions.key_of(channel, address)
        await producer.send(SUPPRESSIONS.name, key, json.dumps(value).encode())
        moved += 1
    if moved:
        await collection.delete_many({})
        log.info("dispatcher.suppressions_moved", count=moved)
    return moved
