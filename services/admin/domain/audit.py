"""What the audit log keeps of one change asked of the admin API: who (the key's name and role),
what (method, route template, path parameters), when, and how it ended. Never a key's secret,
never a request body: a body may hold a contact's personal data. Nor a contact key: the entry
names the contact by a keyed digest of it, so an erasure leaves the key nowhere in the log and
the log alone cannot confirm a guessed key or address."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from services.admin.domain.roles import Role
from shared.ids import keyed_digest

# A path parameter is an id (a journey, a template, a segment); kept whole up to this.
MAX_PARAM_CHARS = 200
# Path and query parameters that name a contact: kept as its `ContactDigest`.
CONTACT_PARAMS = frozenset({"contact_key", "contact"})
# Query parameters shown as they came in the access log: ids, figures, times, switches and the
# UI's notices, never a person's data.
SHOWN_QUERY = frozenset(
    {
        "by",
        "done",
        "dry_run",
        "from",
        "hours",
        "journey_id",
        "key",  # an admin key's name, as the audit log shows it
        "limit",
        "offset",
        "replayed",
        "sample",
        "saved",
        "segment_id",
        "service",
        "since",
        "template_id",
        "to",
    }
)
# Query parameters that routes read and that may hold personal data: value hidden. A contact
# search (key, e-mail or phone); the page to return to after signing in, which may be a
# contact's; the UI's notice of a forget, which named the contact before it said only `1`.
PERSONAL_QUERY = frozenset({"q", "email", "phone", "next", "forgotten"})
HIDDEN = "hidden"


@dataclass(frozen=True)
class ContactDigest:
    """How the audit log and the access log name a contact: `contact:` and an HMAC-SHA256 of
    its key under the admin's audit secret (`WAYPOST_ADMIN_AUDIT_SECRET`), 96 bits of it. The
    admin computes it for `GET /v1/audit?contact=`; who reads only the logs cannot test guessed
    keys or e-mail addresses against them."""

    secret: bytes = field(repr=False)

    def __call__(self, contact_key: str) -> str:
        return "contact:" + keyed_digest(self.secret, "audit", contact_key).hex()[:24]


def logged_path(path_format: str, params: Mapping[str, Any], digest: ContactDigest) -> str:
    """A request path as the HTTP access log shows it: its route (`/v1/contacts/{contact_key}`)
    with the parameters filled in, a contact named by its digest as in the audit log."""
    path = path_format
    for name, value in params.items():
        shown = digest(str(value)) if name in CONTACT_PARAMS else quote(str(value))
        path = path.replace("{" + name + "}", shown)
    return path


def logged_unmatched_path(path: str, known: frozenset[str], digest: ContactDigest) -> str:
    """A path no route matches, as the access log shows it: each segment some route has
    (`v1`, `contacts`, `consent`) as it came, any other as its digest. A mistyped route
    (`/v1/contact/ada@example.com`) holds a contact key as surely as the right one, so no
    unknown segment is shown; one that is a key is named as the audit log names it."""
    return "/".join(part if not part or part in known else digest(part) for part in path.split("/"))


def route_segments(path_formats: Iterable[str]) -> frozenset[str]:
    """The fixed segments of the routes' paths (`/v1/contacts/{contact_key}`: `v1`,
    `contacts`)."""
    return frozenset(
        part for shape in path_formats for part in shape.split("/") if part and "{" not in part
    )


def logged_query(query: str, digest: ContactDigest) -> str:
    """A query string as the HTTP access log shows it: a contact key as its digest, ids,
    figures and switches (`SHOWN_QUERY`) as they came, a search term (which may be an e-mail
    address or a phone number) hidden. Any other parameter is hidden name and value: what no
    route reads is not known to be harmless, and a mistyped `contact_kye` holds a key too."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if all(name in SHOWN_QUERY for name, _value in pairs):
        return query
    shown = [_logged_pair(name, value, digest) for name, value in pairs]
    return urlencode(shown, quote_via=quote)


def _logged_pair(name: str, value: str, digest: ContactDigest) -> tuple[str, str]:
    if name in SHOWN_QUERY:
        return name, value
    if name in CONTACT_PARAMS:
        return name, digest(value)
    if name in PERSONAL_QUERY:
        return name, HIDDEN
    return HIDDEN, HIDDEN


@dataclass(frozen=True)
class AuditEntry:
    """One change asked by an authenticated key, done or refused."""

    at: datetime
    key: str
    role: Role
    method: str
    route: str
    params: Mapping[str, str]
    status: int
    required_role: Role
    summary: str
    # Figures a route gives of what it did (an import's rows and contacts), never contents.
    counts: Mapping[str, int] = field(default_factory=dict)

    def as_document(self) -> dict[str, Any]:
        counts = {"counts": dict(self.counts)} if self.counts else {}
        return {
            "at": self.at,
            "key": self.key,
            "role": self.role,
            "method": self.method,
            "route": self.route,
            "params": dict(self.params),
            "status": self.status,
            "required_role": self.required_role,
            "summary": self.summary,
            **counts,
        }


def audit_entry(
    *,
    at: datetime,
    key: str,
    role: Role,
    required_role: Role,
    method: str,
    route: str,
    action: str,
    params: Mapping[str, Any],
    status: int,
    refused_for_role: bool,
    digest: ContactDigest,
    counts: Mapping[str, int] | None = None,
) -> AuditEntry:
    """The entry of one call; `action` is the route's own short description, `counts` what
    the route counted of its work (shown in the summary too)."""
    kept = {
        name: digest(str(value)) if name in CONTACT_PARAMS else _clipped(str(value))
        for name, value in params.items()
    }
    target = ", ".join(f"{name}={value}" for name, value in kept.items())
    if refused_for_role:
        outcome = f"refused: needs the {required_role} role"
    elif 200 <= status < 300:
        outcome = "done"
    else:
        outcome = f"not done ({status})"
    summary = f"{action} ({target}): {outcome}" if target else f"{action}: {outcome}"
    if counts:
        summary += " (" + ", ".join(f"{name} {n}" for name, n in counts.items()) + ")"
    return AuditEntry(
        at=at,
        key=key,
        role=role,
        method=method,
        route=route,
        params=kept,
        status=status,
        required_role=required_role,
        summary=summary,
        counts=dict(counts or {}),
    )


def _clipped(value: str) -> str:
    return value if len(value) <= MAX_PARAM_CHARS else value[: MAX_PARAM_CHARS - 1] + "…"
