"""The admin API's door: which key calls (401 without a known one), whether its role may make
the call (403 naming the role needed and the key), and the audit entry of every change.

Each route names the role it needs with one dependency, `Depends(keys.require(role))`; a unit
test walks every route of the app and fails on one without it (tests/unit/test_admin_access.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the annotations of
# `RoleRequirement.__call__` at runtime, and an instance has no module globals to resolve
# annotations written as strings against.

import logging
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import unquote

import structlog
from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute, Match

from services.admin.adapters.audit import AuditTrail
from services.admin.domain.audit import (
    AuditEntry,
    ContactDigest,
    audit_entry,
    logged_path,
    logged_query,
    logged_unmatched_path,
    route_segments,
)
from services.admin.domain.roles import AdminKey, Role, allows
from shared.clock import Clock

log = structlog.get_logger(__name__)
# The logger uvicorn writes one line per answered request to.
ACCESS_LOGGER = "uvicorn.access"
# Shown instead of a path the redaction could not read (never the path itself).
UNREAD_PATH = "[path not shown]"

_bearer = HTTPBearer(auto_error=False)
# Reads are not audited; every other method asks for a change.
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Where a change being made keeps what the audit entry needs, from the role check to the answer.
AUDIT_SCOPE = "waypost.audited_call"


@dataclass
class AuditedCall:
    """Filled in by the role check: who calls, which route, what it needed."""

    key: AdminKey | None = None
    required_role: Role | None = None
    route: str = ""
    action: str = ""
    params: dict[str, str] = field(default_factory=dict)
    refused_for_role: bool = False
    counts: dict[str, int] = field(default_factory=dict)


def audit_counts(request: Request, counts: Mapping[str, int]) -> None:
    """Keep a route's figures of what it did (never its contents) in the call's audit entry."""
    call = request.scope.get(AUDIT_SCOPE)
    if isinstance(call, AuditedCall):
        call.counts = dict(counts)


class RoleRefused(Exception):
    """A known key whose role is below what the call needs."""

    def __init__(self, key: AdminKey, needed: Role) -> None:
        self.key = key
        self.needed = needed
        super().__init__(f"key {key.name} ({key.role}) needs {needed}")


async def role_refused_answer(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RoleRefused)
    return JSONResponse(
        status_code=status.HTTP_403_FORBIDDEN,
        content={
            "detail": f"this call needs the {exc.needed} role; the key '{exc.key.name}' has "
            f"the {exc.key.role} role",
            "required_role": exc.needed,
            "key": exc.key.name,
            "role": exc.key.role,
        },
    )


class AdminKeys:
    """The configured keys, found by comparing in constant time."""

    def __init__(self, keys: Iterable[AdminKey]) -> None:
        self._keys = [(key.secret.encode(), key) for key in keys]

    def find(self, presented: str) -> AdminKey | None:
        # As bytes: compare_digest refuses str that is not ASCII, and a header may hold any.
        candidate = presented.encode("utf-8", "replace")
        found = None
        for secret, key in self._keys:  # every key is compared: no early way out
            if secrets.compare_digest(candidate, secret):
                found = key
        return found

    def require(self, role: Role) -> "RoleRequirement":
        return RoleRequirement(role, self)


class RoleRequirement:
    """A route's dependency: the call needs a known key of at least `role`."""

    def __init__(self, role: Role, keys: AdminKeys) -> None:
        self.role = role
        self._keys = keys

    def __repr__(self) -> str:
        return f"RoleRequirement({self.role!r})"

    async def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> AdminKey:
        key = self._keys.find(credentials.credentials if credentials else "")
        if key is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or unknown admin API key (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        call = request.scope.get(AUDIT_SCOPE)
        if isinstance(call, AuditedCall):
            route = request.scope.get("route")
            call.key = key
            call.required_role = self.role
            call.route = getattr(route, "path", request.url.path)
            call.action = str(getattr(route, "summary", None) or getattr(route, "name", ""))
            call.params = {name: str(value) for name, value in request.path_params.items()}
        if not allows(key.role, self.role):
            if isinstance(call, AuditedCall):
                call.refused_for_role = True
            raise RoleRefused(key, self.role)
        return key


# Reads that take a body, so are posted: a template's preview, a segment's estimate. They
# change nothing, and the editor asks for a preview as the marketer types.
POSTED_READS = re.compile(r"^/v1/(templates/[^/]+/preview|segments/estimate)$")


class AuditedChanges:
    """ASGI middleware: every change asked by a known key (any method but GET, HEAD, OPTIONS),
    done or refused, is written to the audit trail once its status is known and before its
    answer goes out. A call refused before its key was known (401, a body refused at the door)
    names nobody and is not written.

    When the entry cannot be written, the answer stands (the change was made or refused
    already; turning it into an error would invite a retry of what is done) and the entry is
    logged whole, as JSON, at error level (`admin.audit_unwritten`)."""

    def __init__(self, app: Any, trail: AuditTrail, clock: Clock, digest: ContactDigest) -> None:
        self.app = app
        self._trail = trail
        self._clock = clock
        self._digest = digest

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in READS
            or POSTED_READS.match(scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        call = AuditedCall()
        scope = {**scope, AUDIT_SCOPE: call}
        answered = False

        async def audited(message: Any) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                await self._record(call, scope["method"], message["status"])
            await send(message)

        try:
            await self.app(scope, receive, audited)
        except Exception:
            if not answered:  # the server answers 500
                await self._record(call, scope["method"], status.HTTP_500_INTERNAL_SERVER_ERROR)
            raise

    async def _record(self, call: AuditedCall, method: str, code: int) -> None:
        if call.key is None or call.required_role is None:
            return
        entry = audit_entry(
            at=self._clock.now(),
            key=call.key.name,
            role=call.key.role,
            required_role=call.required_role,
            method=method,
            route=call.route,
            action=call.action,
            params=call.params,
            status=code,
            refused_for_role=call.refused_for_role,
            digest=self._digest,
            counts=call.counts,
        )
        try:
            await self._trail.write(entry)
        except Exception:
            log.exception("admin.audit_unwritten", entry=_as_json(entry))


def _as_json(entry: AuditEntry) -> dict[str, Any]:
    """The entry as the JSON log line holds it: the time as ISO 8601."""
    return {**entry.as_document(), "at": entry.at.isoformat()}


class AccessLogRedaction(logging.Filter):
    """Rewrites the path of each access log line as its route with the parameters filled in,
    a contact key as the audit log's digest of it (`logged_path`), so the key of a contact,
    forgotten or not, never reaches the log; in the query, a contact key is its digest and only
    what is known to be harmless is shown (`logged_query`). A path no route matches shows only
    the segments the routes have; any other is shown as its digest (`logged_unmatched_path`)."""

    def __init__(self, routes: Iterable[BaseRoute], digest: ContactDigest) -> None:
        super().__init__()
        self._routes = list(routes)
        self._digest = digest
        self._known = route_segments(_path_formats(self._routes))

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's line: '%s - "%s %s HTTP/%s" %d' (client, method, path?query, version, status)
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            try:
                shown = self.path(str(args[1]), args[2])
            except Exception:  # noqa: BLE001 - a log line must not fail; show no path then
                shown = UNREAD_PATH
            record.args = (args[0], args[1], shown, args[3], args[4])
        return True

    def path(self, method: str, path_and_query: str) -> str:
        """The path as logged: matched the way the app's router matches a request."""
        path, mark, query = path_and_query.partition("?")
        scope = {"type": "http", "method": method, "path": unquote(path), "root_path": ""}
        found = None
        for route in self._routes:
            match, child = route.matches(scope)
            if match == Match.FULL or (match == Match.PARTIAL and found is None):
                found = (route, child)  # a PARTIAL match: the path's route, another method
                if match == Match.FULL:
                    break
        shown_query = logged_query(query, self._digest)
        if found is None:
            return logged_unmatched_path(unquote(path), self._known, self._digest) + (
                mark + shown_query
            )
        route, child = found
        shape = str(getattr(route, "path_format", path))
        return logged_path(shape, child.get("path_params", {}), self._digest) + mark + shown_query


def _path_formats(routes: Iterable[BaseRoute]) -> Iterator[str]:
    """The path shapes of the routes, those of mounted apps' routes included."""
    for route in routes:
        shape = getattr(route, "path_format", None)
        if isinstance(shape, str):
            yield shape
        yield from _path_formats(getattr(route, "routes", None) or ())


def redact_access_log(routes: Iterable[BaseRoute], digest: ContactDigest) -> AccessLogRedaction:
    """Install the redaction on uvicorn's access logger (after uvicorn set up its logging)."""
    redaction = AccessLogRedaction(routes, digest)
    logging.getLogger(ACCESS_LOGGER).addFilter(redaction)
    return redaction
