"""The web UI's sessions and CSRF tokens (pure), and the door of its pages in-process: sign-in
through the form, a forged or foreign form refused, roles holding on pages."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from services.admin.app import create_app
from services.admin.domain.ui_session import (
    COOKIE,
    Session,
    csrf_holds,
    csrf_token,
    issue,
    read,
    session_secret,
)
from services.admin.settings import AdminSettings
from shared.clock import ManualClock
from tests.unit.test_admin_access import ANA, ED, KEYS, NOW, OPS, MemoryTrail

SECRET = session_secret(None, ["a-key-of-enough-length-for-a-test-1"])
LATER = NOW + timedelta(hours=1)


def _session(key: str | None = "ops") -> Session:
    return Session("sid-1", key, LATER)


def test_a_session_reads_back_as_issued_until_it_expires() -> None:
    token = issue(SECRET, _session())

    assert read(SECRET, token, NOW) == _session()
    assert read(SECRET, token, LATER) is None


def test_a_tampered_foreign_or_malformed_cookie_is_no_session() -> None:
    token = issue(SECRET, _session("ana"))
    payload, signature = token.split(".")
    forged_payload = issue(SECRET, _session("ops")).split(".")[0]
    other = session_secret("another-secret", [])

    assert read(SECRET, f"{forged_payload}.{signature}", NOW) is None
    assert read(other, token, NOW) is None
    for bad in ("", "x", "a.b.c", f"{payload}.", "!!!.???", "é.é", "a" * 600):
        assert read(SECRET, bad, NOW) is None


def test_the_signing_secret_changes_with_the_keys_or_the_configured_secret() -> None:
    assert session_secret(None, ["k1", "k2"]) == session_secret(None, ["k2", "k1"])
    assert session_secret(None, ["k1"]) != session_secret(None, ["k1", "k2"])
    assert session_secret("s", ["k1"]) == session_secret("s", ["k9"])
    assert session_secret("s", []) != session_secret("t", [])


def test_a_csrf_token_holds_for_its_own_session_only() -> None:
    signed = _session()
    before_sign_in = Session("sid-1", None, LATER)
    other = Session("sid-2", "ops", LATER)
    token = csrf_token(SECRET, signed)

    assert csrf_holds(SECRET, signed, token)
    assert not csrf_holds(SECRET, other, token)
    assert not csrf_holds(SECRET, signed, csrf_token(SECRET, before_sign_in))
    assert not csrf_holds(SECRET, signed, "")
    assert not csrf_holds(SECRET, signed, None)
    assert not csrf_holds(SECRET, None, token)
    assert not csrf_holds(SECRET, signed, token + "é")


# --- the pages' door, in-process ------------------------------------------------------------


def _ui_app(contact_commands: Any = None) -> Any:
    """The admin app with nothing behind it but an audit trail in memory (and, when a test
    needs them, contact commands that record what was asked)."""
    unused: Any = None
    return create_app(
        AdminSettings(admin_api_keys=KEYS),
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
        contact_commands=contact_commands,
        audit_trail=MemoryTrail(),
        clock=ManualClock(NOW),
        insights=unused,
        dead_letters=unused,
    )


@pytest.fixture
async def browser() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_ui_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


async def _sign_in(browser: httpx.AsyncClient, key: str) -> httpx.Response:
    form = await browser.get("/sign-in")
    return await browser.post("/sign-in", data={"key": key, "csrf_token": _csrf(form)})


async def test_pages_send_a_browser_without_a_session_to_the_sign_in_form(
    browser: httpx.AsyncClient,
) -> None:
    home = await browser.get("/")
    page = await browser.get("/journeys")
    form = await browser.get("/sign-in")

    assert (home.status_code, home.headers["location"]) == (303, "/sign-in")
    assert (page.status_code, page.headers["location"]) == (303, "/sign-in?next=/journeys")
    assert form.status_code == 200
    assert 'name="key"' in form.text
    cookie = form.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()


async def test_signing_in_sets_a_new_session_that_never_holds_the_key(
    browser: httpx.AsyncClient,
) -> None:
    before = (await browser.get("/sign-in")).cookies[COOKIE]
    answer = await _sign_in(browser, OPS)

    assert (answer.status_code, answer.headers["location"]) == (303, "/journeys")
    after = answer.cookies[COOKIE]
    assert after != before
    assert OPS not in answer.headers["set-cookie"]
    session = read(_secret(), after, NOW)
    assert session is not None
    assert session.key_name == "ops"


def _secret() -> bytes:
    """The pages' signing secret: derived from every configured key (none is configured)."""
    return session_secret(None, [entry.split(":", 2)[2] for entry in KEYS.split(",")])


async def test_an_unknown_key_or_a_form_without_its_token_signs_nobody_in(
    browser: httpx.AsyncClient,
) -> None:
    unknown = await _sign_in(browser, "not-a-key")
    forged = await browser.post("/sign-in", data={"key": OPS})

    assert unknown.status_code == 401
    assert "key: not a configured admin key" in unknown.text
    assert forged.status_code == 403
    assert "csrf_token" in forged.text
    assert COOKIE not in forged.cookies


async def test_a_forged_post_or_a_viewer_session_cannot_pause_a_journey(
    browser: httpx.AsyncClient,
) -> None:
    signed_in = await _sign_in(browser, ANA)
    session = read(_secret(), signed_in.cookies[COOKIE], NOW)
    assert session is not None
    token = csrf_token(_secret(), session)  # what every form of the viewer's pages carries
    without_token = await browser.post("/journeys/j1/pause", data={})
    as_viewer = await browser.post("/journeys/j1/pause", data={"csrf_token": token})

    assert without_token.status_code == 403
    assert "csrf_token" in without_token.text
    assert as_viewer.status_code == 403
    refusal = html.unescape(as_viewer.text)
    assert "needs the publisher role; the key 'ana' has the viewer role" in refusal


async def test_a_viewer_session_is_refused_a_publisher_page_by_role(
    browser: httpx.AsyncClient,
) -> None:
    await _sign_in(browser, ANA)
    audit = await browser.get("/audit")
    signed_out = await browser.post("/sign-out", data={})

    assert audit.status_code == 403
    assert "needs the publisher role" in audit.text
    assert signed_out.status_code == 403  # sign-out is a form too: its token is needed


async def test_signing_out_ends_the_session(browser: httpx.AsyncClient) -> None:
    signed_in = await _sign_in(browser, ANA)
    session = read(_secret(), signed_in.cookies[COOKIE], NOW)
    assert session is not None
    answer = await browser.post("/sign-out", data={"csrf_token": csrf_token(_secret(), session)})
    after = await browser.get("/journeys")

    assert (answer.status_code, answer.headers["location"]) == (303, "/sign-in")
    assert after.status_code == 303


async def test_signing_in_logs_the_key_s_name_never_the_key(browser: httpx.AsyncClient) -> None:
    with capture_logs() as logs:
        await _sign_in(browser, OPS)
        browser.cookies.clear()
        await _sign_in(browser, ANA + "x")

    assert [entry["event"] for entry in logs] == ["admin.ui_signed_in", "admin.ui_sign_in_refused"]
    assert logs[0]["key"] == "ops"
    assert OPS not in repr(logs)
    assert ANA not in repr(logs)


async def test_a_signed_in_browser_is_sent_on_from_the_sign_in_form(
    browser: httpx.AsyncClient,
) -> None:
    await _sign_in(browser, ANA)
    again = await browser.get("/sign-in", params={"next": "/segments"})
    elsewhere = await browser.get("/sign-in", params={"next": "//evil.example/x"})

    assert (again.status_code, again.headers["location"]) == (303, "/segments")
    assert elsewhere.headers["location"] == "/journeys"  # never to another site


def _form_token(answer: httpx.Response) -> str:
    session = read(_secret(), answer.cookies[COOKIE], NOW)
    assert session is not None
    return csrf_token(_secret(), session)


async def test_a_viewer_cannot_save_a_template_and_forgetting_needs_the_box_ticked(
    browser: httpx.AsyncClient,
) -> None:
    viewer = _form_token(await _sign_in(browser, ANA))
    saved = await browser.post("/templates/t1", data={"csrf_token": viewer, "text": "Hi"})
    browser.cookies.clear()
    publisher = _form_token(await _sign_in(browser, OPS))
    unconfirmed = await browser.post(
        "/contacts/forget", data={"csrf_token": publisher, "contact_key": "c1"}
    )
    no_key = await browser.post("/contacts/forget", data={"csrf_token": publisher})

    assert saved.status_code == 403
    assert "needs the editor role" in saved.text
    assert unconfirmed.status_code == 422
    assert "confirm: tick the box" in unconfirmed.text
    assert no_key.status_code == 422
    assert "contact_key" in no_key.text


async def test_a_draft_that_is_not_yaml_is_shown_back_with_its_line_and_a_viewer_may_not_edit(
    browser: httpx.AsyncClient,
) -> None:
    viewer = _form_token(await _sign_in(browser, ANA))
    as_viewer = await browser.post(
        "/journeys/j1/draft", data={"csrf_token": viewer, "definition": "journey: {}"}
    )
    browser.cookies.clear()
    editor = _form_token(await _sign_in(browser, ED))
    broken = await browser.post(
        "/journeys/j1/draft",
        data={"csrf_token": editor, "definition": "journey:\n  id: j1\n  steps: [\n"},
    )

    assert as_viewer.status_code == 403
    assert broken.status_code == 422
    assert "line 4" in broken.text
    assert "  steps: [" in html.unescape(broken.text)  # the text is kept to be fixed


class RecordedCommands:
    """Contact commands kept in a list, as Kafka would have acknowledged them."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, command: Any) -> None:
        self.sent.append(command)


async def test_forgetting_from_the_ui_names_the_contact_nowhere_in_the_next_address() -> None:
    commands = RecordedCommands()
    transport = httpx.ASGITransport(app=_ui_app(contact_commands=commands))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as browser:
        token = _form_token(await _sign_in(browser, OPS))
        answer = await browser.post(
            "/contacts/forget",
            data={"csrf_token": token, "contact_key": "ada@example.com", "confirm": "yes"},
        )
        shown = await browser.get(answer.headers["location"])

    assert [c.contact_key for c in commands.sent] == ["ada@example.com"]
    # The address the browser goes on to is what uvicorn's access log writes down.
    assert (answer.status_code, answer.headers["location"]) == (303, "/contacts?forgotten=1")
    assert "The contact is being forgotten" in shown.text
    assert "ada" not in shown.text
