"""The message ledger and the templates, in the document store.

The ledger's `_id` is the deterministic message id: the insert that claims a send is the unique
index that keeps a replayed request from reaching the provider twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.dispatcher.domain.rendering import EmailTemplate
from shared.contracts import SendRequest

MESSAGES = "messages"
TEMPLATES = "templates"


class Ledger:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._messages = db[MESSAGES]

    async def claim(self, request: SendRequest, now: datetime) -> tuple[bool, str]:
        """Insert the entry as `requested`; returns (new, current state)."""
        doc = {
            "_id": request.message_id,
            "state": "requested",
            "contact_key": request.contact_key,
            "channel": request.channel,
            "template_id": request.template_id,
            "journey_id": request.journey_id,
            "journey_version": request.journey_version,
            "instance_id": request.instance_id,
            "step_id": request.step_id,
            "requested_at": request.requested_at,
            "history": [{"state": "requested", "at": now}],
        }
        try:
            await self._messages.insert_one(doc)
            return True, "requested"
        except DuplicateKeyError:
            existing = await self._messages.find_one({"_id": request.message_id}, {"state": 1})
            return False, str(existing["state"]) if existing else "requested"

    async def move(self, message_id: str, state: str, now: datetime, **fields: str | None) -> None:
        await self._messages.update_one(
            {"_id": message_id},
            {
                "$set": {"state": state, f"{state}_at": now, **fields},
                "$push": {"history": {"state": state, "at": now, **fields}},
            },
        )


class Templates:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._templates = db[TEMPLATES]

    async def email(self, template_id: str) -> EmailTemplate | None:
        doc = await self._templates.find_one({"_id": template_id, "channel": "email"})
        if doc is None or doc.get("status") != "ready":
            return None
        return EmailTemplate(
            subject=doc.get("subject") or "", text=doc["text"], html=doc.get("html")
        )
