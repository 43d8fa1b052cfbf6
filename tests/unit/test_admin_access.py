"""Every admin route names the role it needs, and the door answers and audits as documented.

The app is built with only its settings, clock and an in-memory audit trail: the calls here are
all answered by the role check, before any route reaches a store or the broker (the rest is in
tests/e2e/test_admin_roles.py, on the real stack)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from structlog.testing import capture_logs
from uvicorn.protocols.utils import get_path_with_query_string

from services.admin.access import (
    ACCESS_LOGGER,
    UNREAD_PATH,
    AccessLogRedaction,
    RoleRequirement,
    redact_access_log,
)
from services.admin.app import create_app
from services.admin.domain.audit import (
    HIDDEN,
    AuditEntry,
    ContactDigest,
    logged_path,
    logged_query,
)
from services.admin.settings import AdminSettings
from services.admin.ui.pages import PageRole
from shared.clock import ManualClock
from shared.ids import stable_id

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
OPS = "9f1c2b7e4d5a6c8b0e3f1a2d4c6b8e0f9a1c3e5b"
ANA = "1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d"
ED = "e0d8b6f4a2c9e7d5b3f1a8c6e4d2b0f9a7c5e3d1"
KEYS = f"ops:publisher:{OPS},ana:viewer:{ANA},ed:editor:{ED}"
AUDIT_SECRET = "5c0e8a2f4b6d1e3a9c7f0b2d4e6a8c1f3b5d7e9a"
contact_digest = ContactDigest(AUDIT_SECRET.encode())

# Deliberately open to anyone who reaches the port: liveness, and the API's own description
# when the docs are on (WAYPOST_ADMIN_API_DOCS; off by default outside dev).
PUBLIC = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

# The role of every route. A new route, or a changed role, shows here.
ROLE_OF = {
    ("GET", "/v1/journeys"): "viewer",
    ("GET", "/v1/journeys/schema"): "viewer",
    ("GET", "/v1/journeys/{journey_id}"): "viewer",
    ("GET", "/v1/journeys/{journey_id}/draft"): "viewer",
    ("GET", "/v1/journeys/{journey_id}/conversion"): "viewer",
    ("GET", "/v1/templates/{template_id}"): "viewer",
    ("GET", "/v1/segments"): "viewer",
    ("GET", "/v1/segments/{segment_id}"): "viewer",
    ("GET", "/v1/segments/{segment_id}/members"): "viewer",
    ("GET", "/v1/segments/{segment_id}/history"): "viewer",
    ("POST", "/v1/segments/estimate"): "viewer",
    ("POST", "/v1/templates/{template_id}/preview"): "viewer",
    ("POST", "/v1/templates/{template_id}/test-send"): "editor",
    ("GET", "/v1/aggregates"): "viewer",
    ("GET", "/v1/contacts/{contact_key:path}"): "viewer",
    ("GET", "/v1/stats"): "viewer",
    ("GET", "/v1/journeys/{journey_id}/figures"): "viewer",
    ("GET", "/v1/journeys/{journey_id}/changes"): "viewer",
    ("GET", "/v1/journeys/{journey_id}/diff"): "viewer",
    ("GET", "/v1/contacts/{contact_key:path}/timeline"): "viewer",
    ("GET", "/v1/templates"): "viewer",
    ("GET", "/v1/contacts"): "viewer",
    ("GET", "/v1/journey-log"): "viewer",
    ("GET", "/v1/messages"): "viewer",
    ("GET", "/v1/delivery/funnel"): "viewer",
    ("GET", "/v1/delivery/paused-channels"): "viewer",
    ("PUT", "/v1/templates/{template_id}"): "editor",
    ("PUT", "/v1/journeys/{journey_id}/draft"): "editor",
    ("POST", "/v1/journeys/dry-run"): "editor",
    # Marking a template ready puts its content on the air for every journey that uses it.
    ("POST", "/v1/templates/{template_id}/ready"): "publisher",
    ("POST", "/v1/journeys/{journey_id}/publish"): "publisher",
    ("POST", "/v1/journeys/{journey_id}/pause"): "publisher",
    ("POST", "/v1/journeys/{journey_id}/resume"): "publisher",
    ("POST", "/v1/journeys/{journey_id}/archive"): "publisher",
    ("PUT", "/v1/segments"): "publisher",
    ("DELETE", "/v1/segments/{segment_id}"): "publisher",
    ("DELETE", "/v1/contacts/{contact_key:path}"): "publisher",
    ("PUT", "/v1/contacts/{contact_key:path}/consent"): "publisher",
    ("POST", "/v1/contacts/{contact_key:path}/changes"): "publisher",
    ("POST", "/v1/contacts/import"): "publisher",
    ("GET", "/v1/dead-letters"): "viewer",
    ("POST", "/v1/dead-letters/replay"): "publisher",
    ("GET", "/v1/audit"): "publisher",
}


# The web UI's pages: each needs a signed-in session of at least this role (PageRole); the
# sign-in form, the stylesheet and `/` (a redirect) are open.
UI_PUBLIC = {"/", "/sign-in", "/ui/style.css", "/ui/htmx.min.js"}
PAGE_ROLE_OF = {
    ("POST", "/sign-out"): "viewer",
    ("GET", "/journeys"): "viewer",
    ("GET", "/journeys/{journey_id}"): "viewer",
    ("GET", "/journeys/{journey_id}/diff"): "viewer",
    ("POST", "/journeys/{journey_id}/{action}"): "publisher",
    ("GET", "/new-draft"): "editor",
    ("GET", "/journeys/{journey_id}/draft"): "editor",
    ("POST", "/journeys/{journey_id}/draft"): "editor",
    ("POST", "/journeys/{journey_id}/draft/dry-run"): "editor",
    ("GET", "/segments"): "viewer",
    ("GET", "/segments/{segment_id}"): "viewer",
    ("GET", "/contacts"): "viewer",
    ("GET", "/contacts/{contact_key:path}"): "viewer",
    ("GET", "/templates"): "viewer",
    ("GET", "/templates/{template_id}"): "viewer",
    ("POST", "/templates/{template_id}"): "editor",
    ("POST", "/templates/{template_id}/ready"): "publisher",
    ("POST", "/templates/{template_id}/preview"): "viewer",
    ("POST", "/templates/{template_id}/test-send"): "editor",
    ("GET", "/segment-builder"): "viewer",
    ("POST", "/segment-builder"): "viewer",
    ("GET", "/segments/{segment_id}/count-chart.svg"): "viewer",
    ("POST", "/contacts/forget"): "publisher",
    ("POST", "/contacts/change"): "publisher",
    ("POST", "/contacts/import"): "publisher",
    ("GET", "/delivery"): "viewer",
    ("GET", "/audit"): "publisher",
    ("GET", "/dead-letters"): "viewer",
    ("POST", "/dead-letters/replay"): "publisher",
}


class MemoryTrail:
    """The audit trail in a list; `broken` makes every write fail as an unreachable store."""

    def __init__(self, broken: bool = False) -> None:
        self.entries: list[AuditEntry] = []
        self.broken = broken

    async def write(self, entry: AuditEntry) -> None:
        if self.broken:
            raise ConnectionError("the document store did not answer")
        self.entries.append(entry)

    async def page(
        self,
        *,
        key: str | None,
        contact: str | None,
        since: datetime | None,
        limit: int,
        offset: int,
    ) -> list[dict[str, Any]]:
        found = [
            e.as_document()
            for e in reversed(self.entries)
            if (key is None or e.key == key)
            and (contact is None or e.params.get("contact_key") == contact)
            and (since is None or e.at >= since)
        ]
        return found[offset : offset + limit]


def build(trail: MemoryTrail, **settings: Any) -> FastAPI:
    # Every other collaborator stays unset: nothing here gets past the role check to use one.
    unused: Any = None
    return create_app(
        AdminSettings(admin_api_keys=KEYS, admin_audit_secret=AUDIT_SECRET, **settings),
        unused,
        unused,
        unused,
        unused,
        drafts=unused,
        templates=unused,
        definitions=unused,
        segment_definitions=unused,
        segment_counts=unused,
        contacts=unused,
        contact_commands=unused,
        audit_trail=trail,
        clock=ManualClock(NOW),
        insights=unused,
        dead_letters=unused,
    )


@pytest.fixture
def trail() -> MemoryTrail:
    return MemoryTrail()


@pytest.fixture
async def client(trail: MemoryTrail) -> AsyncIterator[httpx.AsyncClient]:
    app = build(trail, admin_api_docs=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_declares_the_role_it_needs_or_is_deliberately_public() -> None:
    app = build(MemoryTrail(), admin_api_docs=True)
    found: dict[tuple[str, str], str] = {}
    pages: dict[tuple[str, str], str] = {}
    unguarded: list[str] = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if not isinstance(route, APIRoute):
            if path not in PUBLIC:
                unguarded.append(path)
            continue
        roles = [
            d.call.role for d in route.dependant.dependencies if isinstance(d.call, RoleRequirement)
        ]
        page_roles = [
            d.call.role for d in route.dependant.dependencies if isinstance(d.call, PageRole)
        ]
        if not route.include_in_schema:  # a page of the UI
            assert roles == [], f"{path} is a page but asks for an API key"
            if path in UI_PUBLIC:
                assert page_roles == [], f"{path} is listed as open but asks for {page_roles}"
            elif len(page_roles) != 1:
                unguarded.append(f"{sorted(route.methods)} {path}: {page_roles}")
            else:
                pages.update({(method, path): page_roles[0] for method in route.methods})
            continue
        if path in PUBLIC:
            assert roles == [], f"{path} is listed as public but asks for {roles}"
            continue
        if len(roles) != 1:
            unguarded.append(f"{sorted(route.methods)} {path}: {roles}")
            continue
        for method in route.methods:
            found[(method, path)] = roles[0]

    assert unguarded == []
    assert found == ROLE_OF
    assert pages == PAGE_ROLE_OF


def test_the_public_routes_are_served_without_a_key_docs_only_when_on(
    trail: MemoryTrail,
) -> None:
    on = {getattr(r, "path", "") for r in build(trail, admin_api_docs=True).routes}
    off = {getattr(r, "path", "") for r in build(trail, admin_api_docs=False).routes}

    assert on >= PUBLIC
    assert not (off & (PUBLIC - {"/health"}))


async def test_a_call_without_a_known_key_is_refused_and_names_nobody_in_the_audit(
    client: httpx.AsyncClient, trail: MemoryTrail
) -> None:
    missing = await client.put("/v1/templates/t1", json={"text": "Hi"})
    unknown = await client.put("/v1/templates/t1", json={"text": "Hi"}, headers=bearer("nope"))
    foreign = await client.get("/v1/stats", headers=[(b"authorization", b"Bearer \xc3\xa9")])

    assert [missing.status_code, unknown.status_code, foreign.status_code] == [401, 401, 401]
    assert unknown.headers["www-authenticate"] == "Bearer"
    assert trail.entries == []


async def test_a_role_below_the_call_is_refused_naming_the_role_and_the_key(
    client: httpx.AsyncClient, trail: MemoryTrail
) -> None:
    viewer_edits = await client.put("/v1/templates/t1", json={"text": "Hi"}, headers=bearer(ANA))
    editor_publishes = await client.post("/v1/journeys/j1/publish", headers=bearer(ED))
    editor_reads_audit = await client.get("/v1/audit", headers=bearer(ED))

    assert viewer_edits.status_code == 403
    assert viewer_edits.json() == {
        "detail": "this call needs the editor role; the key 'ana' has the viewer role",
        "required_role": "editor",
        "key": "ana",
        "role": "viewer",
    }
    assert editor_publishes.status_code == 403
    assert editor_publishes.json()["required_role"] == "publisher"
    assert editor_publishes.json()["key"] == "ed"
    assert editor_reads_audit.status_code == 403
    # Changes refused for their role are audited; reads are not.
    assert [(e.key, e.method, e.route, e.status) for e in trail.entries] == [
        ("ana", "PUT", "/v1/templates/{template_id}", 403),
        ("ed", "POST", "/v1/journeys/{journey_id}/publish", 403),
    ]
    first = trail.entries[0]
    assert first.at == NOW
    assert first.role == "viewer"
    assert first.required_role == "editor"
    assert first.params == {"template_id": "t1"}
    assert first.summary == "Save as a draft (template_id=t1): refused: needs the editor role"


async def test_an_audit_entry_holds_no_secret_and_no_body(
    client: httpx.AsyncClient, trail: MemoryTrail
) -> None:
    await client.put(
        "/v1/contacts/ann@example.com/consent",
        json={"channel": "email", "subscribed": False, "note": "private body"},
        headers=bearer(ED),
    )

    (entry,) = trail.entries
    text = repr(entry.as_document())
    assert entry.params == {"contact_key": contact_digest("ann@example.com")}
    for secret in (OPS, ANA, ED, "private body", "ann@example.com"):
        assert secret not in text


async def test_an_audit_entry_that_cannot_be_written_is_logged_whole_and_the_answer_stands() -> (
    None
):
    trail = MemoryTrail(broken=True)
    transport = httpx.ASGITransport(app=build(trail))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        with capture_logs() as logs:
            answer = await client.delete("/v1/segments/s1", headers=bearer(ANA))

    assert answer.status_code == 403
    (line,) = [entry for entry in logs if entry["event"] == "admin.audit_unwritten"]
    assert line["log_level"] == "error"
    assert line["entry"]["key"] == "ana"
    assert line["entry"]["route"] == "/v1/segments/{segment_id}"
    assert line["entry"]["status"] == 403
    assert line["entry"]["at"] == NOW.isoformat()
    assert ANA not in repr(line)


# --- the HTTP access log ----------------------------------------------------------------------


class Lines(logging.Handler):
    """The access log's lines as uvicorn's formatter would render their message."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_log() -> Iterator[Lines]:
    """uvicorn's access logger with the admin's redaction on it, as `__main__` installs it."""
    logger = logging.getLogger(ACCESS_LOGGER)
    lines = Lines()
    redaction = redact_access_log(build(MemoryTrail()).routes, contact_digest)
    logger.addHandler(lines)
    # Through setLevel, which also clears the logger's cache of levels it already asked about
    # (a server that logged before this test, at the level then in force, leaves one).
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.removeFilter(redaction)
        logger.setLevel(level)


def _answered(method: str, path: str, query: bytes = b"") -> None:
    """Log one answered request exactly as uvicorn's HTTP protocol does."""
    scope: Any = {"path": path, "query_string": query}
    logging.getLogger(ACCESS_LOGGER).info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:50000",
        method,
        get_path_with_query_string(scope),
        "1.1",
        202,
    )


def test_a_logged_path_names_a_contact_by_its_audit_digest() -> None:
    params = {"contact_key": "ada@example.com"}
    assert logged_path("/v1/contacts/{contact_key}/consent", params, contact_digest) == (
        f"/v1/contacts/{contact_digest('ada@example.com')}/consent"
    )
    assert logged_path("/v1/journeys/{journey_id}", {"journey_id": "win back"}, contact_digest) == (
        "/v1/journeys/win%20back"
    )


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("GET", "/v1/contacts/{key}", "/v1/contacts/{digest}"),
        ("DELETE", "/v1/contacts/{key}", "/v1/contacts/{digest}"),
        ("PUT", "/v1/contacts/{key}/consent", "/v1/contacts/{digest}/consent"),
        ("POST", "/v1/contacts/{key}", "/v1/contacts/{digest}"),  # no such method: still hidden
    ],
)
@pytest.mark.parametrize("key", ["ada@example.com", "ópal/ünïcode key", "+15551234567"])
def test_the_access_log_shows_a_contact_key_only_as_its_digest(
    access_log: Lines, method: str, path: str, route: str, key: str
) -> None:
    _answered(method, path.format(key=key))

    (line,) = access_log.lines
    shown = route.format(digest=contact_digest(key))
    assert line == f'127.0.0.1:50000 - "{method} {shown} HTTP/1.1" 202'
    for part in [key, *key.split("/"), quote(key)]:
        assert part not in line


def test_other_paths_and_query_strings_are_logged_as_they_came(access_log: Lines) -> None:
    _answered("GET", "/v1/segments/vips/members", b"limit=5")
    _answered("GET", "/v1/journeys/win back")

    assert access_log.lines == [
        '127.0.0.1:50000 - "GET /v1/segments/vips/members?limit=5 HTTP/1.1" 202',
        '127.0.0.1:50000 - "GET /v1/journeys/win%20back HTTP/1.1" 202',
    ]


@pytest.mark.parametrize("key", ["ada@example.com", "+15551234567"])
def test_a_path_no_route_matches_shows_only_the_segments_the_routes_have(
    access_log: Lines, key: str
) -> None:
    """A mistyped route holds a contact key as surely as the right one."""
    _answered("GET", f"/v1/contact/{key}/consent", b"limit=5")
    _answered("GET", "/nowhere")

    assert access_log.lines == [
        f'127.0.0.1:50000 - "GET /v1/{contact_digest("contact")}/{contact_digest(key)}/consent'
        '?limit=5 HTTP/1.1" 202',
        f'127.0.0.1:50000 - "GET /{contact_digest("nowhere")} HTTP/1.1" 202',
    ]
    assert key not in access_log.lines[0]
    assert quote(key) not in access_log.lines[0]


def test_a_path_the_redaction_cannot_read_is_not_shown() -> None:
    class Unreadable(BaseRoute):
        def matches(self, scope: Any) -> tuple[Match, Any]:
            raise ValueError("cannot read this path")

    record = logging.LogRecord(
        ACCESS_LOGGER,
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:50000", "GET", "/v1/contacts/ada", "1.1", 200),
        None,
    )

    assert AccessLogRedaction([Unreadable()], contact_digest).filter(record)
    assert record.getMessage() == f'127.0.0.1:50000 - "GET {UNREAD_PATH} HTTP/1.1" 200'


def test_a_search_term_and_a_contact_key_in_the_query_never_reach_the_access_log(
    access_log: Lines,
) -> None:
    _answered("GET", "/v1/contacts", b"q=ada%40example.com&limit=5")
    _answered("GET", "/v1/messages", b"contact_key=%2B15551234567")

    digest = contact_digest("+15551234567")
    assert access_log.lines == [
        f'127.0.0.1:50000 - "GET /v1/contacts?q={HIDDEN}&limit=5 HTTP/1.1" 202',
        f'127.0.0.1:50000 - "GET /v1/messages?contact_key={quote(digest)} HTTP/1.1" 202',
    ]
    for part in ("ada", "example.com", "15551234567"):
        assert all(part not in line for line in access_log.lines)


def test_a_query_parameter_not_known_to_be_harmless_is_hidden_name_and_value(
    access_log: Lines,
) -> None:
    _answered("GET", "/contacts", b"forgotten=ada%40example.com")  # the UI's notice, as it was
    _answered("GET", "/sign-in", b"next=%2Fcontacts%2Fada%40example.com")
    _answered("GET", "/v1/messages", b"contact_kye=ada%40example.com&limit=5")
    _answered("GET", "/nowhere", b"ada%40example.com")
    _answered("GET", "/v1/audit", b"key=ana&since=2026-03-01T00%3A00%3A00Z&offset=50")

    assert access_log.lines == [
        f'127.0.0.1:50000 - "GET /contacts?forgotten={HIDDEN} HTTP/1.1" 202',
        f'127.0.0.1:50000 - "GET /sign-in?next={HIDDEN} HTTP/1.1" 202',
        f'127.0.0.1:50000 - "GET /v1/messages?{HIDDEN}={HIDDEN}&limit=5 HTTP/1.1" 202',
        f'127.0.0.1:50000 - "GET /{contact_digest("nowhere")}?{HIDDEN}={HIDDEN} HTTP/1.1" 202',
        '127.0.0.1:50000 - "GET /v1/audit?key=ana&since=2026-03-01T00%3A00%3A00Z&offset=50 '
        'HTTP/1.1" 202',
    ]
    assert all("ada" not in line for line in access_log.lines)


def test_the_contact_digest_is_keyed_by_the_audit_secret() -> None:
    other = ContactDigest(b"another-secret-of-enough-length-for-a-test")

    digest = contact_digest("ada@example.com")
    assert digest == contact_digest("ada@example.com")  # the same contact, the same name
    assert digest != other("ada@example.com")  # without the secret, a guess cannot be tested
    assert digest != "contact:" + stable_id("audit", "ada@example.com", length=24)  # as it was
    assert digest.startswith("contact:")
    assert len(digest) == len("contact:") + 24
    assert AUDIT_SECRET not in repr(contact_digest)
    assert (
        AdminSettings(admin_audit_secret=AUDIT_SECRET).contact_digest()("ada@example.com") == digest
    )


async def test_the_audit_log_is_searched_by_contact_key_and_the_digest_computed_by_the_admin(
    client: httpx.AsyncClient, trail: MemoryTrail
) -> None:
    for key in ("ann@example.com", "bob@example.com"):
        await client.put(
            f"/v1/contacts/{key}/consent",
            json={"channel": "email", "subscribed": False},
            headers=bearer(ANA),  # refused for its role, and audited
        )

    found = await client.get(
        "/v1/audit", params={"contact": "ann@example.com"}, headers=bearer(OPS)
    )
    everyone = await client.get("/v1/audit", headers=bearer(OPS))
    empty = await client.get("/v1/audit", params={"contact": ""}, headers=bearer(OPS))

    assert found.status_code == 200, found.text
    assert [e["params"] for e in found.json()["entries"]] == [
        {"contact_key": contact_digest("ann@example.com")}
    ]
    assert everyone.json()["count"] == 2
    assert empty.status_code == 422
    assert "ann@example.com" not in everyone.text


def test_a_contact_searched_for_in_the_audit_log_is_logged_by_its_digest(
    access_log: Lines,
) -> None:
    _answered("GET", "/v1/audit", b"contact=ada%40example.com&limit=5")

    digest = quote(contact_digest("ada@example.com"))
    assert access_log.lines == [
        f'127.0.0.1:50000 - "GET /v1/audit?contact={digest}&limit=5 HTTP/1.1" 202'
    ]
    assert logged_query("contact=ada", contact_digest) == f"contact={quote(contact_digest('ada'))}"


def test_the_csv_import_is_documented_with_its_body_and_answers(trail: MemoryTrail) -> None:
    operation = build(trail).openapi()["paths"]["/v1/contacts/import"]["post"]
    assert list(operation["requestBody"]["content"]) == ["text/csv"]
    assert [p["name"] for p in operation["parameters"]] == ["dry_run"]
    assert {"200", "202", "415", "422"} <= set(operation["responses"])
