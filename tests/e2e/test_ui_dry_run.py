"""The "why (not)" and the dry run in a real browser, on the real stack: a contact's page shows
what the engine decided for it and the values that decided it (a branch's else, a refused
re-entry), and the draft editor's Dry run plays a draft for that contact in virtual time
without sending anything. Screenshots go where tests/e2e/test_ui.py puts its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.e2e.helpers import outbox, post, publish_inline, unique, wait_for
from tests.e2e.test_ui import (  # noqa: F401  (fixtures, used by name)
    Pages,
    UiAdmin,
    browser,
    own_admin,
    shots,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ui_admin(stack: Any) -> Iterator[UiAdmin]:
    """An admin of this module's own (worker 9): `make test` may run tests/e2e/test_ui.py, whose
    admin is worker 3, at the same time."""
    with own_admin(stack, 9, "waypost-admin-dry-run") as admin:
        yield admin


def test_a_contact_page_says_why_and_a_draft_dry_runs_for_that_contact(
    stack: Any,
    ui_admin: UiAdmin,
    browser: WebDriver,  # noqa: F811
    shots: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    pages = Pages(browser, ui_admin.url, shots)
    api = {"Authorization": f"Bearer {ui_admin.publisher[1]}"}
    journey = unique("ui-coupon")
    trigger = f"UI Order {journey}"
    coupon = f"{journey}-coupon"
    publish_inline(
        stack,
        tmp_path,
        journey,
        {
            "type": "event",
            "event": trigger,
            "where": {"field": "event.properties.total", "op": "gte", "value": 50},
        },
        [
            {
                "id": "plan",
                "type": "branch",
                "arms": [
                    {"if": {"field": "traits.plan", "op": "eq", "value": "pro"}, "next": "coupon"}
                ],
                "else": "done",
            },
            {"id": "coupon", "type": "send", "template": coupon},
            {"id": "done", "type": "exit"},
        ],
        {coupon: {"subject": "A coupon for you", "text": "Here it is"}},
    )
    user = unique("ines")
    email = f"{user}@example.com"
    answer = post(stack, "identify", {"userId": user, "traits": {"email": email, "plan": "free"}})
    assert answer.status_code == 200, answer.text
    for total in (80, 90):  # the second is refused: re-entry never
        tracked = post(
            stack, "track", {"userId": user, "event": trigger, "properties": {"total": total}}
        )
        assert tracked.status_code == 200, tracked.text

    pages.sign_in(ui_admin.publisher[1])
    wait_for(lambda: browser.current_url.endswith("/journeys"), timeout=30, what="signed in")

    def explained() -> bool:
        pages.open(f"/contacts/{user}")
        text = pages.text("main") if pages.has("#contact-why") else ""
        return "branch else: traits.plan = free" in text and "re-entry never" in text

    wait_for(explained, timeout=120, what="the why texts on the contact's page")
    why = pages.text("#contact-why")
    assert (
        "trigger event " + trigger + "; where event.properties.total ≥ 50 held"
        " (event.properties.total = 80)"
    ) in why
    assert "not entered: re-entry never, entered " in why
    pages.shot("31-contact-why")
    assert outbox(stack, to=email) == []  # no coupon: the else arm

    # The draft editor dry-runs the next version for her with a plan changed by a pasted event.
    pages.open(f"/journeys/{journey}/draft")
    pages.driver.find_element(By.ID, "dry-contact-key").send_keys(user)
    pages.driver.find_element(By.ID, "dry-events").send_keys(
        '[{"type": "identify", "traits": {"plan": "pro"}},'
        f' {{"event": "{trigger}", "after": "1d", "properties": {{"total": 70}}}}]'
    )
    pages.driver.find_element(By.ID, "dry-run").click()
    wait_for(
        lambda: pages.has("#dry-run-result") or pages.has("#draft-problems"),
        timeout=30,
        what="the dry run's answer",
    )
    assert not pages.has("#draft-problems"), pages.text("#draft-problems")
    path = pages.text("#dry-run-path")
    assert "branch arm 1: traits.plan = pro" in path
    assert f"would send template {coupon} on channel email" in path
    assert "Outcome: ended: exit_step" in pages.text("#dry-run-outcome")
    pages.shot("30-draft-dry-run")
    assert outbox(stack, to=email) == []  # a dry run sends nothing

    # A draft with a problem is refused naming the step and the rule, as publishing does.
    area = pages.driver.find_element(By.ID, "definition")
    text = area.get_attribute("value") or ""
    area.clear()
    area.send_keys(text.replace("next: coupon", "next: nowhere"))
    pages.driver.find_element(By.ID, "dry-run").click()
    wait_for(lambda: pages.has("#draft-problems"), timeout=30, what="the draft's problems")
    problems = pages.text("#draft-problems")
    assert "plan" in problems
    assert "nowhere" in problems

    # The API: a viewer may not dry-run; a bad event names its field.
    draft = {
        "journey": {
            "id": journey,
            "name": journey,
            "trigger": {"type": "event", "event": trigger},
            "steps": [{"id": "done", "type": "exit"}],
        }
    }
    viewer = {"Authorization": f"Bearer {ui_admin.viewer[1]}"}
    url = f"{ui_admin.url}/v1/journeys/dry-run"
    body = {"definition": draft, "events": [{"event": trigger}]}
    assert httpx.post(url, headers=viewer, json=body, timeout=30).status_code == 403
    bad = httpx.post(
        url, headers=api, json={**body, "events": [{"event": "X", "after": "soon"}]}, timeout=30
    )
    assert bad.status_code == 422, bad.text
    assert "after" in bad.text
    ok = httpx.post(url, headers=api, json=body, timeout=30)
    assert ok.status_code == 200, ok.text
    assert ok.json()["outcome"] == "ended: exit_step"
    unknown = httpx.post(
        url, headers=api, json={**body, "contact_key": unique("nobody")}, timeout=30
    )
    assert unknown.status_code == 404, unknown.text
    assert "contact_key" in unknown.json()["detail"]
    broken = httpx.post(
        url, headers=api, json={"definition": "journey: [", "events": [{"event": "X"}]}, timeout=30
    )
    assert broken.status_code == 422, broken.text
    assert [p["rule"] for p in broken.json()["problems"]] == ["yaml"]
    as_text = httpx.post(
        url, headers=api, json={**body, "definition": yaml.safe_dump(draft)}, timeout=30
    )
    assert as_text.status_code == 200, as_text.text
    assert as_text.json()["lines"][0]["text"] == trigger
