"""S15 Lead assignment: a hot lead with a company gets a stable owner, who is notified."""

from __future__ import annotations

from datetime import timedelta

from shared.contracts import WebhookCall
from shared.journey_engine.simulator import Simulation, WebhookAnswer
from tests.scenarios.conftest import T0, definition

ASSIGNMENT = definition("s15-lead-assignment").journey
PRICING = definition("s15-pricing-page-hot-lead").journey
REPS = {"anna.nowak@acme.example", "ben.okafor@acme.example", "chloe.martin@acme.example"}


def lead(sim: Simulation, contact: str = "ada", **traits: object) -> None:
    sim.identify(contact, email=f"{contact}@example.com", company="Initech", **traits)


def test_a_hot_lead_gets_an_owner_from_the_group_and_the_owner_is_notified() -> None:
    sim = Simulation([ASSIGNMENT], T0)
    lead(sim)

    sim.tag("ada", "hot lead")

    owner = sim.profile("ada").traits["owner"]
    assert owner in REPS
    (call,) = sim.calls
    assert (call.method, call.url) == (
        "POST",
        "https://sales-notify.acme.example/hooks/lead-assigned",
    )
    assert call.body == {
        "owner": owner,
        "contact": "ada",
        "email": "ada@example.com",
        "company": "Initech",
        "reason": "hot lead",
    }
    assert sim.exits("ada") == ["exit_step"]


def test_the_owner_is_stable_across_re_entries_and_a_replayed_run() -> None:
    def owner_after_two_entries() -> tuple[str, str]:
        sim = Simulation([ASSIGNMENT], T0)
        lead(sim)
        sim.tag("ada", "hot lead")
        first = sim.calls[0].body["owner"]
        # The owner is forgotten and the lead cools down, then turns hot again.
        sim.set_attribute("ada", "owner", None)
        sim.tag("ada", "hot lead", added=False)
        sim.advance(timedelta(days=30))
        sim.tag("ada", "hot lead")
        assert len(sim.calls) == 2
        return first, sim.calls[1].body["owner"]

    first, second = owner_after_two_entries()

    assert first == second
    assert owner_after_two_entries() == (first, second)


def test_owners_spread_over_the_group() -> None:
    sim = Simulation([ASSIGNMENT], T0)
    for n in range(30):
        lead(sim, f"lead-{n}")
        sim.tag(f"lead-{n}", "hot lead")

    assert {call.body["owner"] for call in sim.calls} == REPS


def test_a_contact_with_an_owner_keeps_it() -> None:
    sim = Simulation([ASSIGNMENT], T0)
    lead(sim, owner="dana.field@acme.example")

    sim.tag("ada", "hot lead")

    assert sim.calls[0].body["owner"] == "dana.field@acme.example"
    assert sim.profile("ada").traits["owner"] == "dana.field@acme.example"


def test_a_lead_without_a_company_is_not_assigned() -> None:
    sim = Simulation([ASSIGNMENT], T0)
    sim.identify("ada", email="ada@example.com")

    sim.tag("ada", "hot lead")

    assert sim.calls == []
    assert "owner" not in sim.profile("ada").traits


def test_a_failed_notification_flags_the_contact() -> None:
    def down(_call: WebhookCall) -> WebhookAnswer:
        return False, 503, None

    sim = Simulation([ASSIGNMENT], T0, webhooks=down)
    lead(sim)

    sim.tag("ada", "hot lead")

    assert "owner not notified" in sim.profile("ada").tags


def test_a_pricing_page_visit_makes_a_hot_lead_and_assigns_once() -> None:
    sim = Simulation([ASSIGNMENT, PRICING], T0)
    lead(sim)

    sim.track("ada", "page", {"path": "/pricing/teams"}, kind="page")
    sim.advance(timedelta(minutes=5))
    sim.track("ada", "page", {"path": "/pricing"}, kind="page")

    assert sim.profile("ada").tags == ("hot lead",)
    assert len(sim.calls) == 1
    assert sim.calls[0].body["owner"] == sim.profile("ada").traits["owner"]


def test_other_pages_or_no_company_make_no_hot_lead() -> None:
    sim = Simulation([ASSIGNMENT, PRICING], T0)
    lead(sim)
    sim.identify("bob", email="bob@example.com")

    sim.track("ada", "page", {"path": "/blog/pricing-tips"}, kind="page")
    sim.track("bob", "page", {"path": "/pricing"}, kind="page")

    assert sim.profile("ada").tags == ()
    assert sim.profile("bob").tags == ()
    assert sim.calls == []
