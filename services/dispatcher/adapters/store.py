"""The dispatcher's documents: the message ledger, templates, caps, consent and suppressions.

The ledger's `_id` is the deterministic message id: the insert that claims a send is the unique
index that keeps a replayed request from reaching the provider twice. Every later move names the
states it may leave, so a stale worker cannot overwrite a newer state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect, DuplicateKeyError, OperationFailure
from tenacity import (
    retry,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from services.dispatcher.domain.policy import ConsentRecord
from shared.contracts import SendRequest

MESSAGES = "messages"
STEPS = "message_steps"
TEMPLATES = "templates"
CAPS = "frequency_caps"
CONSENT = "consent"
SUPPRESSIONS = "suppressions"

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

# An upsert whose filter is one `_id` can lose a race: two writers both find no document and
# both insert, and the second insert answers DuplicateKeyError (FerretDB always; MongoDB retries
# it on the server). Running the read-modify-write again finds the winner's document and
# updates it, so a lost race costs one more round trip, not the record.
RACE_ATTEMPTS = 5

P = ParamSpec("P")
R = TypeVar("R")


def _race_retried(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Re-run an upsert (with the reads it decides on) when it lost a race for its `_id`.

    Still losing after RACE_ATTEMPTS runs, the error leaves labelled retryable, so the record's
    guard waits it out like an outage (`shared.deadletter.is_outage`): a race is never poison.
    """
    retried = retry(
        retry=retry_if_exception_type(DuplicateKeyError),
        stop=stop_after_attempt(RACE_ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.01, max=0.2),
        reraise=True,
    )(fn)

    @wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await retried(*args, **kwargs)
        except DuplicateKeyError as exc:
            raise lost_race(exc) from exc

    return run


def lost_race(exc: DuplicateKeyError) -> DuplicateKeyError:
    """The same error, labelled `RetryableWriteError`: a lost race, not a refusal."""
    details = dict(exc.details or {})
    details["errorLabels"] = [*details.get("errorLabels", []), "RetryableWriteError"]
    return DuplicateKeyError(str(details.get("errmsg") or exc), exc.code, details)


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
    """One entry per message in `messages`; decisive steps are claimed by inserting a marker
    with a unique `_id` into `message_steps` (`<id>#<attempt>` before a provider call,
    `<id>#final` for the outcome), so of two competing copies exactly one goes on.

    Every read and write names one `_id` only: the unique index decides races, and the store
    finds each document by its key (FerretDB pushes only `_id` filters down to its backend).
    """

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._messages = db[MESSAGES]
        self._steps = db[STEPS]

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
            found = await self._messages.find_one({"_id": request.message_id})
            if found is None:  # deleted in between (a forgotten contact): nothing to resume
                return Claim(False, "skipped", 1)
            return Claim(False, str(found["state"]), int(found.get("attempt", 1)))

    @_retried
    async def get(self, message_id: str) -> dict[str, Any] | None:
        return await self._messages.find_one({"_id": message_id})

    async def begin(self, message_id: str, try_id: str, attempt: int, now: datetime) -> bool:
        """Claim one try (only one caller ever gets True for a `try_id`); mark it `sending`."""
        if not await self._mark(f"{message_id}#{try_id}", {"at": now}):
            return False
        await self._set(message_id, "sending", now, attempt=attempt)
        return True

    async def conclude(self, message_id: str, state: str, now: datetime, **fields: Any) -> bool:
        """Record the outcome once; True for the caller that should announce it.

        A worker that died between the marker and the entry update left the entry behind:
        the next caller copies the recorded outcome over and announces it again (its event id
        is the same, so readers de-duplicate it).
        """
        recorded = {"state": state, "at": now, **fields}
        if await self._mark(f"{message_id}#final", recorded):
            await self._set(message_id, state, now, **fields)
            return True
        marker = await self._find_step(f"{message_id}#final") or recorded
        entry = await self.get(message_id)
        if entry is None or entry.get("state") not in ("requested", "sending", "retrying"):
            return False
        extra = {k: v for k, v in marker.items() if k not in ("_id", "state", "at")}
        await self._set(message_id, str(marker["state"]), marker["at"], **extra)
        return True

    async def retrying(
        self, message_id: str, attempt: int, due_at: datetime, reason: str, now: datetime
    ) -> None:
        """The request waits on a retry topic for attempt `attempt`."""
        await self._set(message_id, "retrying", now, attempt=attempt, due_at=due_at, reason=reason)

    async def track(self, message_id: str, state: str, now: datetime, **fields: Any) -> bool:
        """A delivery report: moves forward only (sent → delivered → opened → clicked).

        Reports of one message arrive in order on its contact's partition, so reading and then
        writing by key is safe here.
        """
        entry = await self.get(message_id)
        if entry is None or entry.get("state") not in _TRACKING_ORDER:
            return False
        if _TRACKING_ORDER.index(str(entry["state"])) >= _TRACKING_ORDER.index(state):
            return False
        await self._set(message_id, state, now, **fields)
        return True

    async def undelivered(self, message_id: str, now: datetime, **fields: Any) -> bool:
        """A delivery report that the accepted message never arrived."""
        entry = await self.get(message_id)
        if entry is None or entry.get("state") not in ("sent", "delivered"):
            return False
        await self._set(message_id, "failed", now, **fields)
        return True

    @_retried
    async def forget(self, contact_key: str) -> None:
        """An erased contact's entries keep their ids (replays stay no-ops), not the key."""
        await self._messages.update_many(
            {"contact_key": contact_key},
            {"$set": {"contact_key": "forgotten"}, "$unset": {"history": ""}},
        )

    @_retried
    async def _mark(self, step_id: str, fields: dict[str, Any]) -> bool:
        try:
            await self._steps.insert_one({"_id": step_id, **fields})
        except DuplicateKeyError:
            return False
        return True

    @_retried
    async def _find_step(self, step_id: str) -> dict[str, Any] | None:
        return await self._steps.find_one({"_id": step_id})

    @_retried
    async def _set(self, message_id: str, state: str, now: datetime, **fields: Any) -> None:
        entry = {"state": state, "at": now, **{k: v for k, v in fields.items() if v is not None}}
        await self._messages.update_one(
            {"_id": message_id},
            {"$set": {"state": state, f"{state}_at": now, **fields}, "$push": {"history": entry}},
        )


class Templates:
    """Ready templates, each read at most once per `ttl` seconds: a campaign renders the same
    template for every contact, and an edit marked ready is live within `ttl`."""

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

    async def ready(self, template_id: str, channel: str) -> Mapping[str, Any] | None:
        """The live content of a ready template for the channel, else None."""
        now = self._monotonic()
        cached = self._cache.get(template_id)
        if cached is not None and cached[0] > now:
            doc = cached[1]
        else:
            doc = await self._read(template_id)
            self._cache[template_id] = (now + self._ttl, doc)
        if doc is None or doc.get("status") != "ready" or doc.get("channel", "email") != channel:
            return None
        return doc

    @_retried
    async def _read(self, template_id: str) -> dict[str, Any] | None:
        return await self._templates.find_one({"_id": template_id})


class Caps:
    """Provider-accepted sends per contact and channel, for frequency caps."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._caps = db[CAPS]

    @_retried
    async def sends(self, contact_key: str, channel: str) -> list[datetime]:
        doc = await self._caps.find_one({"_id": f"{channel}|{contact_key}"})
        return list(doc.get("sends", [])) if doc else []

    @_retried
    @_race_retried
    async def count(
        self,
        contact_key: str,
        channel: str,
        at: datetime,
        keep: Callable[[list[datetime]], list[datetime]],
    ) -> None:
        """Count one accepted send at `at`; `keep` drops the sends no cap can count any more.

        Read and write run again together when the write lost a race for the document.
        """
        key = f"{channel}|{contact_key}"
        doc = await self._caps.find_one({"_id": key})
        sends = list(doc.get("sends", [])) if doc else []
        await self._caps.replace_one(
            {"_id": key},
            {"contact_key": contact_key, "channel": channel, "sends": keep([*sends, at])},
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
    @_race_retried
    async def record(self, contact_key: str, channel: str, given: bool, at: datetime) -> None:
        """Keep the newest word per channel (an older, late event changes nothing).

        Reports are handled concurrently, and a provider opt-out is recorded by the send that
        met it, so two writers can race. The write replaces only an older word; when a newer
        one landed since the read, the filter misses, the upsert's insert meets the key and
        raises DuplicateKeyError, and the run again reads the newer word and stops.
        """
        key = f"{channel}|{contact_key}"
        current = await self._consent.find_one({"_id": key})
        if current is not None and current["at"] >= at:
            return
        await self._consent.replace_one(
            {"_id": key, "at": {"$lt": at}},
            {"contact_key": contact_key, "given": given, "at": at},
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
    @_race_retried
    async def add(self, channel: str, address: str, reason: str, now: datetime) -> None:
        """Two contacts can share an address, so two sends can suppress it at once."""
        await self._suppressions.replace_one(
            {"_id": self._key(channel, address)},
            {"channel": channel, "reason": reason, "at": now},
            upsert=True,
        )

    @_retried
    async def reason(self, channel: str, address: str) -> str | None:
        doc = await self._suppressions.find_one({"_id": self._key(channel, address)})
        return str(doc.get("reason")) if doc else None
