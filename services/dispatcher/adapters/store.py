"""The dispatcher's documents: the message ledger, templates, caps, consent and suppressions.

The ledger's `_id` is the deterministic message id: the insert that claims a send is the unique
index that keeps a replayed request from reaching the provider twice. Every later move names the
states it may leave, so a stale worker cannot overwrite a newer state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect, DuplicateKeyError, OperationFailure
from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential

from services.dispatcher.domain.policy import ConsentRecord
from shared.contracts import SendRequest

MESSAGES = "messages"
TEMPLATES = "templates"
CAPS = "frequency_caps"
CONSENT = "consent"
SUPPRESSIONS = "suppressions"

# Server codes that mean "try again": a primary stepping down or shutting down, an interrupted
# operation, and InternalError (1), which is how a locked SQLite under FerretDB answers.
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


# Every store call rides out short outages (a failover, a busy lock) instead of failing the
# send: the calls are idempotent, and a ledger step lost to a hiccup would turn a good send
# into an unknown one.
_retried = retry(
    retry=retry_if_exception(_transient),
    wait=wait_random_exponential(multiplier=0.05, max=2.0),
    stop=stop_after_delay(60),
    reraise=True,
)

# After a send, what delivery reports may move the entry to, in order.
_TRACKING_ORDER = ("sent", "delivered", "opened", "clicked")


async def ensure_indexes(db: AsyncDatabase[dict[str, Any]]) -> None:
    """The lookups the dispatcher makes besides `_id` (erasure by contact)."""
    for name in (MESSAGES, CAPS, CONSENT):
        await db[name].create_index("contact_key")


@dataclass(frozen=True)
class Claim:
    new: bool
    state: str
    attempt: int


class Ledger:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._messages = db[MESSAGES]

    @_retried
    async def claim(self, request: SendRequest, now: datetime) -> Claim:
        """Insert the entry as `requested`, or report the state a previous delivery left."""
        doc = {
            "_id": request.message_id,
            "state": "requested",
            "attempt": 1,
            "contact_key": request.contact_key,
            "channel": request.channel,
            "template_id": request.template_id,
            "journey_id": request.journey_id,
            "journey_version": request.journey_version,
            "instance_id": request.instance_id,
            "step_id": request.step_id,
            "transactional": request.transactional,
            "requested_at": request.requested_at,
            "history": [{"state": "requested", "at": now}],
        }
        try:
            await self._messages.insert_one(doc)
            return Claim(True, "requested", 1)
        except DuplicateKeyError:
            found = await self._messages.find_one(
                {"_id": request.message_id}, {"state": 1, "attempt": 1}
            )
            if found is None:  # deleted in between (a forgotten contact): nothing to resume
                return Claim(False, "skipped", 1)
            return Claim(False, str(found["state"]), int(found.get("attempt", 1)))

    @_retried
    async def get(self, message_id: str) -> dict[str, Any] | None:
        return await self._messages.find_one({"_id": message_id})

    @_retried
    async def move(
        self,
        message_id: str,
        state: str,
        now: datetime,
        *,
        leaving: Iterable[str] | None = None,
        **fields: Any,
    ) -> bool:
        """Set `state` (and `fields`), only from one of `leaving` when given; True if moved."""
        query: dict[str, Any] = {"_id": message_id}
        if leaving is not None:
            query["state"] = {"$in": list(leaving)}
        entry = {"state": state, "at": now, **{k: v for k, v in fields.items() if v is not None}}
        result = await self._messages.update_one(
            query,
            {"$set": {"state": state, f"{state}_at": now, **fields}, "$push": {"history": entry}},
        )
        return result.modified_count == 1

    @_retried
    async def forget(self, contact_key: str) -> None:
        """An erased contact's entries keep their ids (replays stay no-ops), not the key."""
        await self._messages.update_many(
            {"contact_key": contact_key},
            {"$set": {"contact_key": "forgotten"}, "$unset": {"history": ""}},
        )

    @_retried
    async def track(self, message_id: str, state: str, now: datetime, **fields: Any) -> bool:
        """A delivery report: moves forward only (sent → delivered → opened → clicked)."""
        earlier = _TRACKING_ORDER[: _TRACKING_ORDER.index(state)]
        return await self.move(message_id, state, now, leaving=earlier, **fields)


class Templates:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._templates = db[TEMPLATES]

    @_retried
    async def ready(self, template_id: str, channel: str) -> Mapping[str, Any] | None:
        """The live content of a ready template for the channel, else None."""
        doc = await self._templates.find_one({"_id": template_id})
        if doc is None or doc.get("status") != "ready" or doc.get("channel", "email") != channel:
            return None
        return doc


class Caps:
    """Provider-accepted sends per contact and channel, for frequency caps."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._caps = db[CAPS]

    @_retried
    async def sends(self, contact_key: str, channel: str) -> list[datetime]:
        doc = await self._caps.find_one({"_id": f"{channel}|{contact_key}"})
        return list(doc.get("sends", [])) if doc else []

    @_retried
    async def store(self, contact_key: str, channel: str, sends: list[datetime]) -> None:
        await self._caps.replace_one(
            {"_id": f"{channel}|{contact_key}"},
            {"contact_key": contact_key, "channel": channel, "sends": sends},
            upsert=True,
        )

    @_retried
    async def forget(self, contact_key: str) -> None:
        await self._caps.delete_many({"contact_key": contact_key})


class Consent:
    """(Un)subscribes the dispatcher saw on the events topic: fresher than a request's profile."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._consent = db[CONSENT]

    @_retried
    async def get(self, contact_key: str, channel: str) -> ConsentRecord | None:
        doc = await self._consent.find_one({"_id": f"{channel}|{contact_key}"})
        return ConsentRecord(bool(doc["given"]), doc["at"]) if doc else None

    @_retried
    async def record(self, contact_key: str, channel: str, given: bool, at: datetime) -> None:
        """Keep the newest word per channel (an older, late event changes nothing)."""
        key = f"{channel}|{contact_key}"
        # A newer record makes the filter miss and the upsert's insert collide: keep it.
        with contextlib.suppress(DuplicateKeyError):
            await self._consent.update_one(
                {"_id": key, "at": {"$lt": at}},
                {"$set": {"contact_key": contact_key, "given": given, "at": at}},
                upsert=True,
            )

    @_retried
    async def forget(self, contact_key: str) -> None:
        await self._consent.delete_many({"contact_key": contact_key})


class Suppressions:
    """Addresses a provider called permanently bad (a hard bounce, an unknown number or openid)."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._suppressions = db[SUPPRESSIONS]

    @staticmethod
    def _key(channel: str, address: str) -> str:
        return f"{channel}:{address.strip().casefold()}"

    @_retried
    async def add(self, channel: str, address: str, reason: str, now: datetime) -> None:
        await self._suppressions.replace_one(
            {"_id": self._key(channel, address)},
            {"channel": channel, "reason": reason, "at": now},
            upsert=True,
        )

    @_retried
    async def reason(self, channel: str, address: str) -> str | None:
        doc = await self._suppressions.find_one({"_id": self._key(channel, address)})
        return str(doc.get("reason")) if doc else None
