"""The template editor and the segment builder in a real browser on the real stack: the preview
follows what is typed (htmx) and names an undefined variable with its field, a test e-mail goes
through the dispatcher into the SMTP sandbox's outbox, and a segment built as YAML shows its
estimated count, is published from the builder, and its page draws its count over time.

Screenshots go where tests/e2e/test_ui.py puts its own (WAYPOST_UI_SCREENSHOTS, else tmp)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.e2e.helpers import outbox, post, unique, wait_for
from tests.e2e.test_ui import Pages, UiAdmin, own_admin
from tests.e2e.test_ui import browser as browser
from tests.e2e.test_ui import shots as shots

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workbench_admin(stack: Any) -> Iterator[UiAdmin]:
    """An admin process of its own, recording segment counts every second."""
    env = {"WAYPOST_ADMIN_COUNT_INTERVAL_SECONDS": "1"}
    with own_admin(stack, 4, "waypost-admin-workbench", env) as admin:
        yield admin


def test_a_marketer_previews_a_template_sends_a_test_and_builds_a_segment(
    stack: Any,
    workbench_admin: UiAdmin,
    browser: WebDriver,
    shots: Path,
) -> None:
    admin = workbench_admin
    pages = Pages(browser, admin.url, shots)
    api = {"Authorization": f"Bearer {admin.publisher[1]}"}
    template = unique("offer")
    plan = unique("plan").replace("-", "")
    user = unique("lin")
    saved = httpx.put(
        f"{admin.url}/v1/templates/{template}",
        headers=api,
        json={"subject": "Hello {{ traits.first_name }}", "text": "Your plan: {{ traits.plan }}"},
        timeout=30,
    )
    assert saved.status_code == 200, saved.text
    identified = post(
        stack,
        "identify",
        {
            "userId": user,
            "traits": {"email": f"{user}@example.com", "first_name": "Lin", "plan": plan},
        },
    )
    assert identified.status_code == 200, identified.text
    wait_for(
        lambda: (
            httpx.get(f"{admin.url}/v1/contacts/{user}", headers=api, timeout=30).status_code == 200
        ),
        timeout=120,
        what="the contact's stored profile",
    )

    # The API renders for a contact and a sample event, and names what is not defined.
    previewed = httpx.post(
        f"{admin.url}/v1/templates/{template}/preview",
        headers={"Authorization": f"Bearer {admin.viewer[1]}"},
        json={
            "contact_key": user,
            "event": {"event": "Order Completed", "properties": {"total": 42}},
            "content": {"subject": "Hi {{ traits.first_name }}", "text": "{{ event.total }}"},
        },
        timeout=30,
    )
    assert previewed.status_code == 200, previewed.text
    assert previewed.json()["fields"] == [
        {"field": "subject", "output": "Hi Lin"},
        {"field": "text", "output": "42"},
    ]
    missing = httpx.post(
        f"{admin.url}/v1/templates/{template}/preview",
        headers=api,
        json={"contact_key": unique("nobody")},
        timeout=30,
    )
    assert missing.status_code == 404
    assert missing.json()["detail"].startswith("contact_key: ")

    # The editor: the preview follows the text as it is typed.
    pages.sign_in(admin.publisher[1])
    wait_for(lambda: browser.current_url.endswith("/journeys"), timeout=30, what="signed in")
    pages.open(f"/templates/{template}?contact_key={user}")

    def preview() -> str:
        # Read in one script: htmx may swap the section between a find and a read.
        return str(browser.execute_script("return document.getElementById('preview').innerText"))

    assert "Hello Lin" in preview()
    listed = browser.find_element(By.CSS_SELECTOR, "details.variables")
    assert "event.properties.<name>" in str(listed.get_attribute("textContent"))
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Dear {{ contact.first_name }}, {{ traits.nickname }}")
    wait_for(
        lambda: "this contact or event has no 'traits.nickname'" in preview(),
        timeout=30,
        what="the preview to name the undefined variable",
    )
    assert "text: this contact or event has no 'traits.nickname'" in preview()
    text.clear()
    text.send_keys("{{ journey.name }}")
    wait_for(
        lambda: "text: reads 'journey.name', which is not defined" in preview(),
        timeout=30,
        what="the preview to refuse a name no template can read",
    )
    text.clear()
    text.send_keys("Dear {{ contact.first_name }}, you are on {{ traits.plan }}.")
    wait_for(
        lambda: f"Dear Lin, you are on {plan}." in preview(),
        timeout=30,
        what="the preview to follow the text",
    )
    listed.find_element(By.TAG_NAME, "summary").click()  # the variables, for the screenshot
    pages.shot("21-template-preview")

    # A test e-mail of what is typed (not saved, not ready) reaches the SMTP sandbox.
    me = f"{unique('marketer')}@example.org"
    browser.find_element(By.ID, "address").send_keys(me)
    browser.find_element(By.ID, "test-send").click()
    wait_for(lambda: pages.has("#test-sent"), timeout=30, what="the test send's notice")
    mail = wait_for(lambda: outbox(stack, to=me), timeout=120, what="the test e-mail")
    assert mail[0]["subject"] == "Hello Lin"
    assert f"Dear Lin, you are on {plan}." in str(mail[0])
    assert outbox(stack, to=f"{user}@example.com") == []  # the contact gets nothing
    pages.shot("22-template-test-send")
    # A bad address is refused naming the field, nothing is sent.
    refused = httpx.post(
        f"{admin.url}/v1/templates/{template}/test-send",
        headers=api,
        json={"contact_key": user, "address": "not-an-address"},
        timeout=30,
    )
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("address: ")
    # A viewer may preview but not send a test.
    viewer_sends = httpx.post(
        f"{admin.url}/v1/templates/{template}/test-send",
        headers={"Authorization": f"Bearer {admin.viewer[1]}"},
        json={"contact_key": user, "address": me},
        timeout=30,
    )
    assert viewer_sends.status_code == 403

    # The segment builder: an estimate before publishing, then publish and watch the chart.
    segment = f"{plan}-members"
    pages.open("/segments")
    browser.find_element(By.ID, "build-segment").click()
    definition = wait_for(
        lambda: browser.find_elements(By.ID, "definition"), timeout=30, what="the segment builder"
    )[0]
    definition.clear()
    definition.send_keys(
        "segments:\n"
        f"  - id: {segment}\n"
        f"    name: Plan {plan}\n"
        "    condition:\n"
        f"      field: traits.plan\n"
        f"      op: eq\n"
        f"      value: {plan}\n"
    )
    browser.find_element(By.ID, "estimate-button").click()
    wait_for(
        lambda: pages.has(f"#estimate tr[data-segment='{segment}']"),
        timeout=60,
        what="the estimate",
    )
    row = pages.text(f"#estimate tr[data-segment='{segment}']")
    assert "≈ " in row
    assert "estimate" in pages.text("#estimate").lower()
    assert "stored profiles" in pages.text("#estimate")
    estimated = httpx.post(
        f"{admin.url}/v1/segments/estimate",
        headers=api,
        json={
            "segments": [
                {
                    "id": segment,
                    "condition": {"field": "traits.plan", "op": "eq", "value": plan},
                }
            ]
        },
        timeout=30,
    ).json()
    assert estimated["segments"][0]["matched"] >= 1  # Lin is stored, and on this plan
    assert estimated["segments"][0]["sampled"] == estimated["sampled"] >= 1
    pages.shot("23-segment-builder")
    bad = httpx.post(
        f"{admin.url}/v1/segments/estimate",
        headers=api,
        json={"segments": [{"id": segment, "condition": {"field": "traits.plan"}}]},
        timeout=30,
    )
    assert bad.status_code == 422
    assert bad.json()["problems"]

    browser.find_element(By.ID, "publish").click()
    wait_for(lambda: pages.has("#published"), timeout=60, what="the segment published")
    browser.find_element(By.CSS_SELECTOR, f"#published a[href='/segments/{segment}']").click()

    def charted() -> bool:
        found = httpx.get(
            f"{admin.url}/v1/segments/{segment}/history", headers=api, timeout=30
        ).json()
        return any(r["members"] >= 1 for r in found["readings"])

    wait_for(charted, timeout=120, what="a recorded count of at least one member")
    pages.open(f"/segments/{segment}")
    chart = browser.execute_script(
        "const i = document.getElementById('count-chart');return i.complete && i.naturalWidth > 0;"
    )
    assert chart is True
    pages.shot("24-segment-chart")
    svg = httpx.get(f"{admin.url}/segments/{segment}/count-chart.svg", timeout=30)
    assert svg.status_code == 303  # no session: sign in first


def test_a_test_send_reaches_a_contact_who_unsubscribed_but_never_a_suppressed_address(
    stack: Any, workbench_admin: UiAdmin
) -> None:
    admin = workbench_admin
    api = {"Authorization": f"Bearer {admin.publisher[1]}"}
    template = unique("notice")
    user = unique("uma")
    me = f"{unique('marketer')}@example.org"
    bounces = f"{unique('bounces')}@example.org"
    assert (
        httpx.put(
            f"{admin.url}/v1/templates/{template}",
            headers=api,
            json={"subject": "For {{ traits.first_name }}", "text": "Hello"},
            timeout=30,
        ).status_code
        == 200
    )
    identified = post(
        stack,
        "identify",
        {"userId": user, "traits": {"email": f"{user}@example.com", "first_name": "Uma"}},
    )
    assert identified.status_code == 200, identified.text

    def profile() -> dict[str, Any] | None:
        answer = httpx.get(f"{admin.url}/v1/contacts/{user}", headers=api, timeout=30)
        return answer.json() if answer.status_code == 200 else None

    wait_for(profile, timeout=120, what="the contact's stored profile")
    withdrawn = httpx.put(
        f"{admin.url}/v1/contacts/{user}/consent",
        headers=api,
        json={"channel": "email", "subscribed": False},
        timeout=30,
    )
    assert withdrawn.status_code == 200, withdrawn.text
    wait_for(
        lambda: (profile() or {}).get("consent", {}).get("email") is False,
        timeout=120,
        what="the contact's withdrawn consent",
    )

    def test_send(address: str) -> str:
        answer = httpx.post(
            f"{admin.url}/v1/templates/{template}/test-send",
            headers=api,
            json={"contact_key": user, "address": address},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["message_id"])

    def ledger(message_id: str) -> dict[str, Any] | None:
        found = httpx.get(
            f"{admin.url}/v1/messages",
            headers=api,
            params={"contact_key": user, "journey_id": "test-send"},
            timeout=30,
        ).json()["messages"]
        return next((m for m in found if m["message_id"] == message_id), None)

    # The contact said no to e-mail, but the test goes to the marketer, not to them.
    test_send(me)
    mail = wait_for(lambda: outbox(stack, to=me), timeout=120, what="the test e-mail")
    assert mail[0]["subject"] == "For Uma"

    # An address the mail server refuses for good is suppressed: the next test is not sent.
    httpx.post(
        f"{stack.outbox_url}/control/smtp/refuse",
        json={"address": bounces, "code": 550},
        timeout=10,
    ).raise_for_status()
    bounced = test_send(bounces)
    wait_for(
        lambda: (ledger(bounced) or {}).get("state") == "failed",
        timeout=120,
        what="the refused test",
    )
    again = test_send(bounces)
    skipped = wait_for(
        lambda: (found := ledger(again)) and found.get("state") == "skipped" and found,
        timeout=120,
        what="the second test skipped",
    )
    assert str(skipped["reason"]).startswith("suppressed: ")
    assert outbox(stack, to=bounces) == []
    assert outbox(stack, to=f"{user}@example.com") == []
