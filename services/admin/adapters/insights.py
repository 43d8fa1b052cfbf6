"""What the admin's read-only views fetch from the document store: a journey's log records, a
contact's log and messages, delivery counts from the message ledger, the template list, and
contacts found by key, e-mail or phone, and the channels the dispatcher paused."""

from __future__ import annotations

from typing import Any

import structlog
from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase

from services.admin.adapters.analytics import JOURNEY_LOG
from services.admin.adapters.journeys import TEMPLATES
from services.admin.adapters.recent_events import RECENT_EVENTS
from services.admin.adapters.segments import PROFILES
from shared.channel_pauses import CHANNEL_PAUSES, ChannelPause
from shared.contracts import JourneyLogRecord

log = structlog.get_logger(__name__)

MESSAGES = "messages"  # the dispatcher's ledger view, one document per message id
# A journey's figures fold at most this many log records (the newest are kept).
MAX_LOG_RECORDS = 200_000
_LOG_FIELDS = {
    "kind": 1,
    "journey_id": 1,
    "journey_version": 1,
    "instance_id": 1,
    "step_id": 1,
    "reason": 1,
    "detail": 1,
    "at": 1,
    "holdout": 1,
    "why": 1,
}
_MESSAGE_FIELDS = {"history": 0, "try": 0}
# What a journey-log document leaves out when the record holds its default
# (`JourneyLogStore.write`): put back, so every record read has every field.
_LOG_DEFAULTS: dict[str, Any] = {
    name: field.default
    for name, field in JourneyLogRecord.model_fields.items()
    if name in _LOG_FIELDS and not field.is_required()
}


class Insights:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._log = db[JOURNEY_LOG]
        self._messages = db[MESSAGES]
        self._templates = db[TEMPLATES]
        self._profiles = db[PROFILES]
        self._pauses = db[CHANNEL_PAUSES]
        self._recent_events = db[RECENT_EVENTS]

    async def recent_events(self, contact_key: str) -> list[dict[str, Any]]:
        """The contact's newest events as the recent-events view keeps them, oldest first."""
        found = await self._recent_events.find_one({"_id": contact_key}, {"events": 1})
        return list(found.get("events") or []) if found else []

    async def journey_records(self, journey_id: str) -> list[dict[str, Any]]:
        cursor = (
            self._log.find({"journey_id": journey_id}, _LOG_FIELDS)
            .sort("at", -1)
            .limit(MAX_LOG_RECORDS)
        )
        return [{**_LOG_DEFAULTS, **doc} for doc in await cursor.to_list()]

    async def contact_records(self, contact_key: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._log.find({"contact_key": contact_key}, _LOG_FIELDS).sort("at", -1)
        return [{**_LOG_DEFAULTS, **doc} for doc in await cursor.limit(limit).to_list()]

    async def messages(
        self, *, contact_key: str | None, journey_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if contact_key is not None:
            query["contact_key"] = contact_key
        if journey_id is not None:
            query["journey_id"] = journey_id
        cursor = self._messages.find(query, _MESSAGE_FIELDS).sort("requested_at", -1)
        return await cursor.limit(limit).to_list()

    async def delivery_counts(self, journey_id: str | None = None) -> list[dict[str, Any]]:
        """Messages counted by journey, step, template, channel, state and reason."""
        match: list[dict[str, Any]] = [{"$match": {"journey_id": journey_id}}] if journey_id else []
        group = {
            "$group": {
                "_id": {
                    "journey_id": "$journey_id",
                    "step_id": "$step_id",
                    "template_id": "$template_id",
                    "channel": "$channel",
                    "state": "$state",
                    "reason": "$reason",
                },
                "count": {"$sum": 1},
            }
        }
        cursor = await self._messages.aggregate([*match, group])
        return [{**row["_id"], "count": int(row["count"])} async for row in cursor]

    async def templates(self) -> list[dict[str, Any]]:
        return await self._templates.find({}).sort("_id", 1).to_list()

    async def find_contacts(self, text: str, limit: int) -> list[dict[str, Any]]:
        """Contacts whose key, user id, anonymous id, e-mail or phone is `text` (e-mail also in
        lower case)."""
        wanted = list(dict.fromkeys([text, text.lower()]))
        query = {
            "$or": [
                {"_id": {"$in": wanted}},
                {"user_id": text},
                {"anonymous_ids": text},
                {"traits.email": {"$in": wanted}},
                {"traits.phone": text},
            ]
        }
        return await self._profiles.find(query).limit(limit).to_list()

    async def channel_pauses(self) -> list[ChannelPause]:
        """Every channel's latest pause, running or over (one document per channel)."""
        pauses = []
        async for document in self._pauses.find({}):
            try:
                pauses.append(ChannelPause.from_document(document))
            except ValidationError as exc:
                log.error("admin.bad_channel_pause", channel=document.get("_id"), error=str(exc))
        return pauses
