"""The admin web UI in a real browser (Debian's headless Chromium, driven by selenium) on the
real stack: sign in through the form, watch a journey's step figures and a segment's count move
as events come in through ingest, open a contact and tag it, import tags and a trait from a CSV
file (a row problem first), edit a template and mark it ready, write the next version in the
draft editor and publish it, forget a contact, pause the journey from its page; a viewer sees no
control that changes anything, and a forged POST (no CSRF token, or a viewer's session) is
refused.

Every page visited is saved as a screenshot: into WAYPOST_UI_SCREENSHOTS when it is set (the
README's come from `WAYPOST_UI_SCREENSHOTS=docs/screenshots`), else into the test's tmp dir."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

# deploy/local is on the path (tests/conftest.py): the stack's own check for the browser.
import stack as local_stack
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from shared.contracts import DeadLetter
from shared.topics import DEAD_LETTER
from tests.e2e.helpers import post, publish_inline, read_topic, unique, wait_for

pytestmark = pytest.mark.e2e
NAV = ["Journeys", "Segments", "Templates", "Contacts", "Delivery"]

# A live refresh (htmx) may replace an element between finding it and reading it.
STALE_READS = 5


@dataclass(frozen=True)
class UiAdmin:
    url: str
    publisher: tuple[str, str]  # name, key
    viewer: tuple[str, str]
    log: Path  # the admin process's log, its HTTP access log included


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def own_admin(
    stack: Any, worker: int, group: str, env: dict[str, str] | None = None
) -> Iterator[UiAdmin]:
    """An admin process of its own (worker `worker`) with a publisher key and a viewer key."""
    publisher = (unique("ops"), secrets.token_hex(32))
    viewer = (unique("ana"), secrets.token_hex(32))
    port = _free_port()
    stack.start_service(
        "admin",
        worker=worker,
        env={
            "WAYPOST_ADMIN_PORT": str(port),
            "WAYPOST_ADMIN_API_KEYS": f"{publisher[0]}:publisher:{publisher[1]},"
            f"{viewer[0]}:viewer:{viewer[1]}",
            "WAYPOST_GROUP_ID": unique(group),
            **(env or {}),
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(f"{url}/health")
        yield UiAdmin(url, publisher, viewer, stack.logfile(f"admin-{worker}"))
    finally:
        stack.stop(f"admin-{worker}")


@pytest.fixture(scope="module")
def ui_admin(stack: Any) -> Iterator[UiAdmin]:
    with own_admin(stack, 3, "waypost-admin-ui") as admin:
        yield admin


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    found = local_stack.browser_paths()
    if found is None:  # never a silent skip: the browser is part of the test set-up
        pytest.fail(
            "Chromium and chromedriver are not on the PATH; `make setup` installs them on "
            "Debian (apt-get install chromium chromium-driver), see the README"
        )
    chromium, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("WAYPOST_UI_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Pages:
    """The browser on the UI: opens pages and saves a screenshot of each."""

    def __init__(self, driver: WebDriver, url: str, shots: Path) -> None:
        self.driver = driver
        self.url = url
        self.shots = shots

    def open(self, path: str, shot: str | None = None) -> None:
        self.driver.get(f"{self.url}{path}")
        if shot:
            self.shot(shot)

    def shot(self, name: str) -> None:
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(900, min(int(height) + 200, 4000)))
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))
        self.driver.set_window_size(1280, 900)

    def text(self, css: str) -> str:
        """The element's text; found again when a live refresh or a page load replaced it while
        it was read (Chromium then says the element is stale, or that its node no longer
        belongs to the document)."""
        for _ in range(STALE_READS):
            try:
                return str(self.driver.find_element(By.CSS_SELECTOR, css).text)
            except StaleElementReferenceException:
                continue
            except WebDriverException as exc:
                if "does not belong to the document" not in str(exc):
                    raise
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def shown(self, css: str) -> str:
        """The element's text, or "" while the page does not hold it (for waits after a click:
        the answer may still be loading, with no such element yet)."""
        try:
            return self.text(css)
        except NoSuchElementException:
            return ""

    def number(self, css: str) -> int:
        return int(self.text(css) or 0)

    def sign_in(self, key: str) -> None:
        self.open("/sign-in")
        self.driver.find_element(By.NAME, "key").send_keys(key)
        self.driver.find_element(By.CSS_SELECTOR, "form[action='/sign-in'] button").click()

    def sign_out(self) -> None:
        self.driver.find_element(By.CSS_SELECTOR, "form[action='/sign-out'] button").click()

    def has(self, css: str) -> bool:
        try:
            self.driver.find_element(By.CSS_SELECTOR, css)
        except NoSuchElementException:
            return False
        return True


def _dead_letter_replayed_from_the_page(stack: Any, pages: Pages) -> None:
    """A dead letter of a scratch topic of this test is listed, ticked and replayed: its record
    is back on that topic."""
    scratch = unique("ui-scratch")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    for future in admin.create_topics([NewTopic(scratch, num_partitions=1)]).values():
        future.result(timeout=30)
    key = unique("letter")
    letter = DeadLetter(
        service="segmenter",
        topic=scratch,
        partition=0,
        offset=0,
        key=key,
        value='{"replayed": true}',
        reason="a record made by the UI test",
        at=datetime.now(UTC),
    )
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(DEAD_LETTER.name, key=key.encode(), value=letter.model_dump_json().encode())
    assert producer.flush(30) == 0

    def listed() -> bool:
        pages.open("/dead-letters")
        return key in pages.text("main")

    wait_for(listed, timeout=60, what="the dead letter on the page")
    row = pages.driver.find_element(By.XPATH, f"//tr[td[contains(., '{key}')]]")
    row.find_element(By.CSS_SELECTOR, "input[name=position]").click()
    pages.shot("08-dead-letters")
    pages.driver.find_element(By.ID, "replay").click()
    wait_for(lambda: "Replayed 1 record" in pages.shown("main"), timeout=60, what="the replay")
    replayed = wait_for(
        lambda: [v for k, v in read_topic(stack.bootstrap, scratch) if k == key],
        timeout=60,
        what="the replayed record on its topic",
    )
    assert replayed == [b'{"replayed": true}']


def _newest_status(admin: UiAdmin, api: dict[str, str], journey: str) -> str:
    """The journey's status: its newest version's."""
    answer = httpx.get(f"{admin.url}/v1/journeys/{journey}", headers=api, timeout=30)
    versions = answer.json()["versions"]
    newest = max(versions, key=lambda v: v["journey"]["version"])
    return str(newest["status"])


def test_a_marketer_watches_a_journey_and_a_segment_move_and_pauses_the_journey(
    stack: Any, ui_admin: UiAdmin, browser: WebDriver, shots: Path, tmp_path: Path
) -> None:
    pages = Pages(browser, ui_admin.url, shots)
    api = {"Authorization": f"Bearer {ui_admin.publisher[1]}"}
    journey = unique("ui-welcome")
    trigger = f"UI Signed Up {journey}"
    plan = unique("plan").replace("-", "")
    segment = f"{plan}-members"
    publish_inline(
        stack,
        tmp_path,
        journey,
        {"type": "event", "event": trigger},
        [
            {"id": "welcome", "type": "send", "template": f"{journey}-welcome"},
            {"id": "pause", "type": "wait", "duration": "2h"},
            {"id": "reminder", "type": "send", "template": f"{journey}-welcome"},
        ],
        {f"{journey}-welcome": {"subject": "Welcome {{ contact.first_name }}", "text": "Hello"}},
    )
    published = httpx.put(
        f"{ui_admin.url}/v1/segments",
        headers=api,
        json={
            "segments": [
                {
                    "id": segment,
                    "name": f"Plan {plan}",
                    "condition": {"field": "traits.plan", "op": "eq", "value": plan},
                }
            ]
        },
        timeout=30,
    )
    assert published.status_code in (200, 201), published.text

    # Signed out, every page leads to the sign-in form.
    pages.open("/journeys")
    assert "/sign-in" in browser.current_url
    pages.shot("01-sign-in")
    pages.sign_in(ui_admin.publisher[1])
    wait_for(lambda: browser.current_url.endswith("/journeys"), timeout=30, what="signed in")
    nav = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "nav[aria-label=Main] a")]
    assert nav[:5] == NAV
    session = browser.get_cookie("waypost_session")
    assert session is not None
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert ui_admin.publisher[1] not in session["value"]

    # The journey is listed; its page draws the flow with figures at zero.
    wait_for(
        lambda: pages.open("/journeys") or browser.find_elements(By.LINK_TEXT, journey),
        timeout=30,
        what="the journey in the list",
    )
    pages.open(f"/journeys/{journey}")
    assert [
        b.get_attribute("data-step")
        for b in browser.find_elements(By.CSS_SELECTOR, ".flow .box[data-step]")
    ] == [
        "welcome",
        "pause",
        "reminder",
    ]
    assert pages.number("#step-welcome .moved-on") == 0

    # Contacts come in through ingest: they join the segment and enter the journey.
    contacts = []
    for name in ("Ada", "Grace"):
        user = unique(name.lower())
        email = f"{user}@example.com"
        identified = post(
            stack,
            "identify",
            {"userId": user, "traits": {"email": email, "first_name": name, "plan": plan}},
        )
        assert identified.status_code == 200, identified.text
        tracked = post(stack, "track", {"userId": user, "event": trigger})
        assert tracked.status_code == 200, tracked.text
        contacts.append((user, email))

    def figures_moved() -> bool:
        pages.open(f"/journeys/{journey}")
        return (
            pages.number("#step-welcome .moved-on") >= 2
            and pages.number("#step-pause .waiting") >= 2
            and pages.number("#entered") >= 2
        )

    wait_for(figures_moved, timeout=120, what="the journey's step figures to move")
    pages.shot("03-journey")
    pages.open("/journeys", "02-journeys")
    row = browser.find_element(By.LINK_TEXT, journey).find_element(By.XPATH, "./ancestor::tr")
    assert int(row.find_elements(By.CSS_SELECTOR, "td.num")[1].text) >= 2  # entered

    def count_moved() -> bool:
        pages.open("/segments")
        cells = browser.find_elements(By.CSS_SELECTOR, f"tr[data-segment='{segment}'] .members")
        return bool(cells) and int(cells[0].text) >= 2

    wait_for(count_moved, timeout=120, what="the segment's count to move")
    # The counts refresh on their own (htmx polls; without scripts, a meta refresh).
    assert browser.find_element(By.ID, "segment-rows").get_attribute("hx-trigger") == "every 5s"
    assert browser.execute_script("return typeof htmx") == "object"
    pages.shot("04-segments")
    pages.open(f"/segments/{segment}", "05-segment")

    # A contact, found by e-mail: traits, segments, the journey and step, the message.
    user, email = contacts[0]

    # The answer is a new page, and the contact reaches the profile view in the next bulk write:
    # search again until the result page lists the contact.
    def found() -> list[Any]:
        pages.open("/contacts")
        browser.find_element(By.ID, "q").send_keys(email)
        browser.find_element(By.CSS_SELECTOR, "form.search button").click()
        wait_for(lambda: "q=" in browser.current_url, timeout=30, what="the search's answer")
        return browser.find_elements(By.LINK_TEXT, user)

    wait_for(found, timeout=60, what="the contact found by e-mail")[0].click()

    def contact_shown() -> bool:
        pages.open(f"/contacts/{user}")
        text = browser.find_element(By.TAG_NAME, "main").text
        return segment in text and journey in text and f"{journey}-welcome" in text

    wait_for(contact_shown, timeout=120, what="the contact's segments, journey and message")
    journeys_table = pages.text("#contact-journeys")
    assert "waiting" in journeys_table
    assert "pause" in journeys_table

    # The timeline: the contact's events, the journey's steps and the message, newest first.
    def timeline_shown() -> bool:
        pages.open(f"/contacts/{user}")
        rows = [
            str(row.get_attribute("class"))
            for row in browser.find_elements(By.CSS_SELECTOR, "#contact-timeline tbody tr")
        ]
        return "timeline-event" in rows and "timeline-message" in rows

    wait_for(timeline_shown, timeout=60, what="the contact's timeline")
    pages.shot("06-contact-timeline")

    # A tag added and a trait set from the contact's page reach the profile through the segmenter.
    browser.find_element(By.ID, "add-tag").send_keys("vip")
    browser.find_element(By.ID, "trait-name").send_keys("tier")
    browser.find_element(By.ID, "trait-value").send_keys("gold")
    browser.find_element(By.ID, "change").click()

    def changed() -> bool:
        pages.open(f"/contacts/{user}")
        return "vip" in pages.text("#contact-tags") and "gold" in pages.text("main")

    wait_for(changed, timeout=120, what="the tag and the trait on the contact's page")
    pages.shot("06-contact")

    # A CSV file uploaded from the Contacts page: a row problem is named, then it imports.
    upload = tmp_path / "contacts.csv"
    upload.write_text(f"contact_key,tags,tier\n{user},imported;csv,platinum\n,x,\n")
    pages.open("/contacts")
    browser.find_element(By.ID, "import-file").send_keys(str(upload))
    browser.find_element(By.ID, "import-submit").click()
    # The answer is a new page: read once it has loaded, not from the page it replaces.
    wait_for(lambda: pages.has("#import-problems"), timeout=30, what="the import's problems")
    assert "3 contact_key empty" in pages.text("#import-problems")
    upload.write_text(f"contact_key,tags,tier\n{user},imported;csv,platinum\n")
    browser.find_element(By.ID, "import-file").send_keys(str(upload))
    browser.find_element(By.ID, "import-submit").click()
    wait_for(lambda: pages.has("#import-result"), timeout=30, what="the import's result")
    assert "1 contact: 2 tags added, 1 trait set" in pages.text("#import-result")
    pages.shot("16-contacts-import")

    def imported() -> bool:
        pages.open(f"/contacts/{user}")
        return "imported" in pages.text("#contact-tags") and "platinum" in pages.text("main")

    wait_for(imported, timeout=120, what="the imported tags and trait on the contact's page")

    pages.open("/delivery", "07-delivery")
    _dead_letter_replayed_from_the_page(stack, pages)
    pages.open("/templates", "09-templates")
    # A template edited from its page is saved as a draft, then marked ready, through the API.
    template = f"{journey}-welcome"
    pages.open(f"/templates/{template}")
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Hello again, {{ contact.first_name }}")
    browser.find_element(By.ID, "save").click()
    wait_for(lambda: pages.has("#ready"), timeout=30, what="the edit saved as a draft")
    pages.shot("10-template")
    stored = httpx.get(f"{ui_admin.url}/v1/templates/{template}", headers=api, timeout=30).json()
    assert stored["status"] == "draft"
    assert stored["content"]["text"] == "Hello again, {{ contact.first_name }}"
    browser.find_element(By.ID, "ready").click()
    wait_for(lambda: not pages.has("#ready"), timeout=30, what="the template marked ready")
    stored = httpx.get(f"{ui_admin.url}/v1/templates/{template}", headers=api, timeout=30).json()
    assert stored["status"] == "ready"
    assert stored["sending"]["text"] == "Hello again, {{ contact.first_name }}"

    # The next version is written in the draft editor: a draft naming a template that does not
    # exist is refused by step and rule, the fixed one is saved, published, and its change shown.
    pages.open(f"/journeys/{journey}")
    browser.find_element(By.ID, "edit-draft").click()
    editor = wait_for(
        lambda: browser.find_elements(By.ID, "definition"), timeout=30, what="the draft editor"
    )[0]
    written = str(editor.get_attribute("value"))
    assert "version: 2" in written
    assert "duration: 2h" in written

    def save(text: str) -> None:
        field = browser.find_element(By.ID, "definition")
        browser.execute_script("arguments[0].value = arguments[1]", field, text)
        browser.find_element(By.ID, "save-draft").click()

    save(written.replace(f"template: {template}", "template: no-such-template", 1))
    problems = wait_for(
        lambda: pages.shown("#draft-problems"),
        timeout=30,
        what="the draft's problems",
    )
    assert "welcome" in problems
    assert "no-such-template" in problems
    pages.shot("11-draft-problems")
    save(written.replace("duration: 2h", "duration: 3h"))
    wait_for(lambda: pages.has("#publish-draft"), timeout=30, what="the draft saved")
    browser.find_element(By.ID, "publish-draft").click()
    wait_for(lambda: pages.has("#changes-2"), timeout=30, what="version 2 and its changes")
    browser.find_element(By.CSS_SELECTOR, "#changes-2 summary").click()
    changes = pages.text("#changes-2")
    assert "Version 2 against 1: 1 change" in changes
    assert "step pause" in changes
    assert "duration" in changes

    def marked(css: str) -> list[str]:
        return [str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, css)]

    # The text diff of the two definitions: the changed line removed and added.
    assert any("duration: 2h" in line for line in marked("#changes-2 del"))
    assert any("duration: 3h" in line for line in marked("#changes-2 ins"))
    assert not pages.has("#publish")  # the draft is the published version 2 now
    pages.shot("12-journey-version-2")
    # Any two versions, from the form's two selects (a plain GET form).
    browser.find_element(By.CSS_SELECTOR, "#diff-form button").click()
    wait_for(lambda: pages.has("#version-diff"), timeout=30, what="the text diff page")
    assert "/diff?from=1&to=2" in browser.current_url
    assert any("duration: 3h" in line for line in marked("#version-diff ins"))
    pages.shot("12-journey-diff")

    # The second contact is forgotten from its page, once the box is ticked.
    forgotten = contacts[1][0]
    pages.open(f"/contacts/{forgotten}")
    browser.find_element(By.ID, "confirm-forget").click()
    browser.find_element(By.ID, "forget").click()
    wait_for(lambda: "/contacts?forgotten=" in browser.current_url, timeout=30, what="forget")
    assert pages.has("#forgotten")
    # The confirmation's address is in the access log; the forgotten key is nowhere in the log.
    wait_for(
        lambda: "GET /contacts?forgotten=" in ui_admin.log.read_text(),
        timeout=30,
        what="the confirmation in the admin's access log",
    )
    assert forgotten not in ui_admin.log.read_text()

    def erased() -> bool:
        found = httpx.get(f"{ui_admin.url}/v1/contacts/{forgotten}", headers=api, timeout=30)
        return found.status_code == 404

    wait_for(erased, timeout=120, what="the forgotten contact's profile to go")

    # Paused from the journey's page, through the same API route, and audited under the key.
    pages.open(f"/journeys/{journey}")
    browser.find_element(By.ID, "pause").click()
    wait_for(lambda: pages.shown("#journey-status") == "paused", timeout=30, what="paused")
    assert pages.has("#resume")
    pages.shot("13-journey-paused")
    assert _newest_status(ui_admin, api, journey) == "paused"
    audit = httpx.get(
        f"{ui_admin.url}/v1/audit", headers=api, params={"key": ui_admin.publisher[0]}, timeout=30
    ).json()["entries"]
    assert any(
        e["route"] == "/v1/journeys/{journey_id}/pause" and e["params"] == {"journey_id": journey}
        for e in audit
    )
    pages.open("/audit", "14-audit")
    pages.sign_out()
    wait_for(lambda: "/sign-in" in browser.current_url, timeout=30, what="signed out")

    # A viewer reads the same page without any lifecycle control ...
    pages.sign_in(ui_admin.viewer[1])
    wait_for(lambda: browser.current_url.endswith("/journeys"), timeout=30, what="viewer in")
    pages.open(f"/journeys/{journey}", "15-journey-as-viewer")
    for control in ("#pause", "#resume", "#archive", "#publish", "form[action$='/resume']"):
        assert not pages.has(control), control
    pages.open(f"/contacts/{user}")
    assert not pages.has("#forget")
    assert not pages.has("#change")
    pages.open("/contacts")
    assert not pages.has("#import-submit")
    pages.open("/dead-letters")
    assert not pages.has("#replay")
    assert not pages.has("input[name=position]")
    pages.open(f"/templates/{template}")
    assert not pages.has("#save")
    assert not pages.has("#ready")
    viewer_cookie = browser.get_cookie("waypost_session")
    assert viewer_cookie is not None
    viewer_csrf = browser.find_element(
        By.CSS_SELECTOR, "form[action='/sign-out'] input[name=csrf_token]"
    ).get_attribute("value")

    # ... and forged POSTs change nothing: no token, a viewer's session, no session at all.
    cookies = {"waypost_session": viewer_cookie["value"]}
    resume = f"{ui_admin.url}/journeys/{journey}/resume"
    no_token = httpx.post(resume, cookies=cookies, data={}, timeout=30)
    as_viewer = httpx.post(resume, cookies=cookies, data={"csrf_token": viewer_csrf}, timeout=30)
    no_session = httpx.post(resume, data={"csrf_token": viewer_csrf}, timeout=30)
    assert (no_token.status_code, as_viewer.status_code, no_session.status_code) == (403, 403, 403)
    assert "csrf_token" in no_token.text
    assert re.search(r"needs the publisher role", as_viewer.text)
    forged_import = httpx.post(
        f"{ui_admin.url}/contacts/import",
        cookies=cookies,
        data={"csrf_token": viewer_csrf},
        files={"file": ("contacts.csv", f"contact_key,tags\n{user},forged\n", "text/csv")},
        timeout=30,
    )
    assert forged_import.status_code == 403, forged_import.text
    assert re.search(r"needs the publisher role", forged_import.text)
    assert _newest_status(ui_admin, api, journey) == "paused"
