"""The dispatcher's documents: templates (read, cached) and suppressions (shared by every
contact with the address, so not partitioned by contact like the worker's tables).

The ledger, caps and consent live in the worker's tables (`adapters/tables.py`); the ledger's
`messages` collection is a view of them (`adapters/ledger_view.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
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

TEMPLATES = "templates"
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
