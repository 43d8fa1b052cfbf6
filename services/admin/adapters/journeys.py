"""Where the journey lifecycle is kept: drafts and templates in the document store, published
versions on the compacted definitions topic."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import structlog
from pymongo.asynchronous.database import AsyncDatabase

from shared.definitions import PublishedJourneys
from shared.journeys import PublishedJourney, TemplateDefinition
from shared.kafka import AsyncProducer
from shared.lifecycle import shipped_template_document
from shared.topics import DEFINITIONS

log = structlog.get_logger(__name__)

DRAFTS = "journey_drafts"
TEMPLATES = "templates"  # read by the dispatcher by `_id`


class JourneyDrafts:
    """One draft per journey, as the marketer sent it."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._drafts = db[DRAFTS]

    async def get(self, journey_id: str) -> dict[str, Any] | None:
        document = await self._drafts.find_one({"_id": journey_id})
        if document is None:
            return None
        # Kept as JSON text: property names chosen by marketers may hold '.' or start with '$'.
        definition: dict[str, Any] = json.loads(document["definition"])
        return {"definition": definition, "updated_at": document["updated_at"]}

    async def put(self, journey_id: str, definition: Any, now: datetime) -> None:
        await self._drafts.replace_one(
            {"_id": journey_id},
            {"definition": json.dumps(definition), "updated_at": now},
            upsert=True,
        )


class TemplateStore:
    """The `templates` collection: what the dispatcher renders, and pending edits."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._templates = db[TEMPLATES]

    async def get(self, template_id: str) -> dict[str, Any] | None:
        return await self._templates.find_one({"_id": template_id})

    async def replace(self, template_id: str, document: Mapping[str, Any]) -> None:
        await self._templates.replace_one({"_id": template_id}, dict(document), upsert=True)

    async def ids(self) -> set[str]:
        return {str(doc["_id"]) async for doc in self._templates.find({}, {"_id": 1})}

    async def documents(self, template_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored documents of these templates (those that exist)."""
        cursor = self._templates.find({"_id": {"$in": list(template_ids)}})
        return {str(doc["_id"]): doc async for doc in cursor}

    async def write_shipped(
        self, templates: Mapping[str, TemplateDefinition], now: datetime
    ) -> None:
        for template_id, template in templates.items():
            await self.replace(template_id, shipped_template_document(template, now))


class Definitions:
    """Writes published journey records and waits until the admin's own follower has them, so
    the next request (pause after publish, say) decides on what was just written."""

    def __init__(
        self, producer: AsyncProducer, journeys: PublishedJourneys, timeout: float = 15.0
    ) -> None:
        self._producer = producer
        self._journeys = journeys
        self._timeout = timeout

    def all(self) -> list[PublishedJourney]:
        return self._journeys.all()

    async def write(self, record: PublishedJourney) -> None:
        """Returns once Kafka acknowledged the record (acks=all) and the follower read it."""
        await self._producer.send(DEFINITIONS.name, record.key, record.model_dump_json().encode())
        seen = await asyncio.to_thread(self._journeys.wait_for, record, self._timeout)
        if not seen:
            log.warning("admin.definition_not_followed_yet", key=record.key)
