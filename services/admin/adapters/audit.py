"""The audit log: one document per change asked of the admin API, in `audit_log`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.admin.domain.audit import AuditEntry

AUDIT_LOG = "audit_log"


class AuditTrail(Protocol):
    """Where audit entries go, and how a page of them is read back."""

    async def write(self, entry: AuditEntry) -> None: ...

    async def page(
        self,
        *,
        key: str | None,
        contact: str | None,
        since: datetime | None,
        limit: int,
        offset: int,
    ) -> list[dict[str, Any]]:
        """Entries newest first; `contact` is a contact's digest (`ContactDigest`)."""
        ...


class AuditLog:
    """Entries are only ever added; readers see the newest first."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._log = db[AUDIT_LOG]

    async def write(self, entry: AuditEntry) -> None:
        await self._log.insert_one(entry.as_document())

    async def page(
        self,
        *,
        key: str | None,
        contact: str | None,
        since: datetime | None,
        limit: int,
        offset: int,
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if key is not None:
            query["key"] = key
        if contact is not None:
            query["params.contact_key"] = contact
        if since is not None:
            query["at"] = {"$gte": since}
        cursor = (
            self._log.find(query)
            .sort([("at", DESCENDING), ("_id", DESCENDING)])
            .skip(offset)
            .limit(limit)
        )
        return [{**document, "_id": str(document["_id"])} async for document in cursor]
