"""Admin roles and the audit log on the real stack: a second admin process with three named keys
(viewer, editor, publisher) and its API docs off, on the session's Kafka and FerretDB."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.admin.domain.audit import ContactDigest
from services.admin.settings import AdminSettings
from shared.docstore import connect_blocking
from shared.settings import CommonSettings
from tests.e2e.helpers import unique

pytestmark = pytest.mark.e2e
PROCESS = "admin-2"


@dataclass(frozen=True)
class Key:
    name: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


@dataclass(frozen=True)
class RolesAdmin:
    url: str
    viewer: Key
    editor: Key
    publisher: Key
    audit_secret: str  # its own, so the digests it writes are its own


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def roles_admin(stack: Any) -> Iterator[RolesAdmin]:
    viewer, editor, publisher = (
        Key(unique(name), secrets.token_hex(32)) for name in ("ana", "ed", "ops")
    )
    port = _free_port()
    audit_secret = secrets.token_hex(32)
    stack.start_service(
        "admin",
        worker=2,
        env={
            "WAYPOST_ADMIN_AUDIT_SECRET": audit_secret,
            "WAYPOST_ADMIN_PORT": str(port),
            "WAYPOST_ADMIN_API_KEYS": f"{viewer.name}:viewer:{viewer.secret},"
            f"{editor.name}:editor:{editor.secret},{publisher.name}:publisher:{publisher.secret}",
            "WAYPOST_ADMIN_API_DOCS": "false",
            # Its own journey-log follower: the session's admin keeps every partition.
            "WAYPOST_GROUP_ID": unique("waypost-admin-roles"),
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{url}/health")
        yield RolesAdmin(url, viewer, editor, publisher, audit_secret)
    finally:
        stack.stop(PROCESS)


def _call(
    admin: RolesAdmin, key: Key | None, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    headers = key.headers if key else {}
    return httpx.request(method, f"{admin.url}{path}", headers=headers, timeout=30, **kwargs)


def _audit(admin: RolesAdmin, **params: Any) -> dict[str, Any]:
    answer = _call(admin, admin.publisher, "GET", "/v1/audit", params=params)
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


def _trail(admin: RolesAdmin, key: Key) -> list[tuple[str, str, int]]:
    """The key's audit entries, oldest first: (method, route, status)."""
    entries = _audit(admin, key=key.name, limit=500)["entries"]
    return [(e["method"], e["route"], e["status"]) for e in reversed(entries)]


def test_each_role_does_what_it_may_and_every_change_is_audited(roles_admin: RolesAdmin) -> None:
    admin = roles_admin
    viewer, editor, publisher = admin.viewer, admin.editor, admin.publisher
    journey, template = unique("roles-journey"), unique("roles-template")
    definition = {
        "journey": {
            "id": journey,
            "name": "Roles test",
            "trigger": {"type": "event", "event": f"Enter {journey}"},
            "steps": [{"id": "hello", "type": "send", "template": template}],
        }
    }
    content = {"subject": "Hello", "text": "Hello {{ contact.first_name }}"}

    # The viewer reads, and may change nothing.
    assert _call(admin, viewer, "GET", "/v1/journeys").status_code == 200
    refused = _call(admin, viewer, "PUT", f"/v1/templates/{template}", json=content)
    assert refused.status_code == 403
    assert refused.json()["required_role"] == "editor"
    assert refused.json()["key"] == viewer.name
    assert viewer.name in refused.json()["detail"]

    # The editor saves drafts; what goes on the air is the publisher's.
    saved = _call(admin, editor, "PUT", f"/v1/templates/{template}", json=content)
    assert saved.status_code == 200, saved.text
    assert _call(admin, editor, "POST", f"/v1/templates/{template}/ready").status_code == 403
    ready = _call(admin, publisher, "POST", f"/v1/templates/{template}/ready")
    assert ready.status_code == 200, ready.text
    draft = _call(admin, editor, "PUT", f"/v1/journeys/{journey}/draft", json=definition)
    assert draft.status_code == 200, draft.text
    assert _call(admin, viewer, "GET", f"/v1/journeys/{journey}/draft").status_code == 200
    not_published = _call(admin, editor, "POST", f"/v1/journeys/{journey}/publish")
    assert not_published.status_code == 403
    assert not_published.json()["required_role"] == "publisher"
    assert not_published.json()["key"] == editor.name

    published = _call(admin, publisher, "POST", f"/v1/journeys/{journey}/publish")
    assert published.status_code == 201, published.text
    assert published.json()["journey"]["version"] == 1

    # Every change, done or refused, is in the audit log under the key that asked for it.
    assert _trail(admin, viewer) == [("PUT", "/v1/templates/{template_id}", 403)]
    assert _trail(admin, editor) == [
        ("PUT", "/v1/templates/{template_id}", 200),
        ("POST", "/v1/templates/{template_id}/ready", 403),
        ("PUT", "/v1/journeys/{journey_id}/draft", 200),
        ("POST", "/v1/journeys/{journey_id}/publish", 403),
    ]
    assert _trail(admin, publisher) == [
        ("POST", "/v1/templates/{template_id}/ready", 200),
        ("POST", "/v1/journeys/{journey_id}/publish", 201),
    ]
    newest = _audit(admin, key=publisher.name, limit=1)
    assert newest["count"] == 1
    assert newest["next_offset"] == 1
    (entry,) = newest["entries"]
    assert entry["role"] == "publisher"
    assert entry["params"] == {"journey_id": journey}
    assert entry["summary"].endswith(f"(journey_id={journey}): done")
    later = _audit(admin, key=publisher.name, since=entry["at"].replace("+00:00", "Z"))
    assert [e["_id"] for e in later["entries"]] == [entry["_id"]]
    assert _audit(admin, key=publisher.name, offset=1, limit=1)["next_offset"] is None


def test_the_audit_log_is_for_publishers_and_unknown_keys_are_neither_served_nor_audited(
    roles_admin: RolesAdmin,
) -> None:
    admin = roles_admin
    for key in (admin.viewer, admin.editor):
        answer = _call(admin, key, "GET", "/v1/audit")
        assert answer.status_code == 403
        assert answer.json()["required_role"] == "publisher"
    stranger = Key("stranger", secrets.token_hex(32))
    for key in (None, stranger):
        answer = _call(admin, key, "DELETE", "/v1/segments/nothing")
        assert answer.status_code == 401
    # The session admin's dev key is not one of this admin's keys.
    legacy = Key("dev", "wp_dev_admin_key")
    assert _call(admin, legacy, "GET", "/v1/journeys").status_code == 401
    assert _audit(admin, key="stranger")["entries"] == []


def test_the_stored_audit_entries_hold_no_key_and_no_body(
    stack: Any, roles_admin: RolesAdmin
) -> None:
    admin = roles_admin
    body = {"channel": "email", "subscribed": False}
    contact = unique("audited-contact")
    answer = _call(admin, admin.editor, "PUT", f"/v1/contacts/{contact}/consent", json=body)
    assert answer.status_code == 403

    digest = ContactDigest(admin.audit_secret.encode())(contact)
    elsewhere = AdminSettings().contact_digest()(contact)  # under the dev default secret
    client = connect_blocking(CommonSettings(mongo_url=stack.mongo_url), "tests")
    try:
        stored = list(client["waypost"]["audit_log"].find({"params.contact_key": digest}))
        guessed = list(client["waypost"]["audit_log"].find({"params.contact_key": elsewhere}))
        everything = repr(list(client["waypost"]["audit_log"].find({})))
    finally:
        client.close()
    # A publisher finds the entry by the contact's key; the admin computes the digest.
    searched = _call(admin, admin.publisher, "GET", "/v1/audit", params={"contact": contact})
    assert searched.status_code == 200, searched.text
    assert [e["params"] for e in searched.json()["entries"]] == [{"contact_key": digest}]
    assert guessed == []
    assert [(e["key"], e["status"], e["required_role"]) for e in stored] == [
        (admin.editor.name, 403, "publisher")
    ]
    for key in (admin.viewer, admin.editor, admin.publisher):
        assert key.secret not in everything
    assert "subscribed" not in repr(stored)
    assert contact not in everything


def test_the_api_docs_are_off_when_set_off_and_on_in_dev_by_default(
    stack: Any, roles_admin: RolesAdmin
) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{roles_admin.url}{path}", timeout=10).status_code == 404
    # The session's admin runs with WAYPOST_ENV=dev and no docs setting: its docs are served.
    assert httpx.get(f"{stack.admin_url}/openapi.json", timeout=10).status_code == 200
    assert httpx.get(f"{stack.ingest_url}/openapi.json", timeout=10).status_code == 200
