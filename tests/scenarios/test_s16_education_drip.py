"""S16 Education drip: lesson 1; lesson 2 when opened (and a note for the owner), else a resend."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.contracts import SendRequest
from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s16-education-drip")
DRIP = FILE.journey


def student(sim: Simulation, contact: str = "ada", **traits: object) -> None:
    sim.identify(contact, email=f"{contact}@example.com", owner="anna.nowak@acme.example", **traits)


def opened(sim: Simulation, send: SendRequest) -> None:
    """The open pixel of a sent email comes back as an event."""
    sim.track(
        send.contact_key,
        "Email Opened",
        {"message_id": send.message_id, "template_id": send.template_id},
    )


def started(sim: Simulation, contact: str = "ada") -> None:
    sim.set_attribute(contact, "campaign_stage", "education")


@pytest.mark.parametrize(
    ("traits", "tags"),
    [({"language": "pl"}, ()), ({"language": "en"}, ("newsletter",))],
    ids=["language-pl", "newsletter-tag"],
)
def test_becoming_education_stage_sends_lesson_one(
    traits: dict[str, object], tags: tuple[str, ...]
) -> None:
    sim = Simulation([DRIP], T0)
    student(sim, **traits)
    for tag in tags:
        sim.tag("ada", tag)

    started(sim)

    assert sim.templates_sent("ada") == ["lesson-1"]


def test_neither_newsletter_nor_polish_does_not_enter() -> None:
    sim = Simulation([DRIP], T0)
    student(sim, language="en")

    started(sim)

    assert sim.sent("ada") == []


def test_another_stage_or_attribute_does_not_enter() -> None:
    sim = Simulation([DRIP], T0)
    student(sim, language="pl")

    sim.set_attribute("ada", "campaign_stage", "onboarding")
    sim.set_attribute("ada", "plan", "education")

    assert sim.sent("ada") == []


def test_opened_within_three_days_sends_lesson_two_and_a_note_for_the_owner() -> None:
    sim = Simulation([DRIP], T0)
    student(sim, language="pl")
    started(sim)
    sim.advance(timedelta(days=2))

    opened(sim, sim.sent("ada")[0])

    assert sim.templates_sent("ada") == ["lesson-1", "lesson-2"]
    assert sim.sent("ada")[1].requested_at == T0 + timedelta(days=2)
    (note,) = sim.calls
    assert note.url == "https://crm.acme.example/api/notes"
    assert note.body["owner"] == "anna.nowak@acme.example"
    assert note.body["contact"] == "ada"
    assert sim.exits("ada") == ["exit_step"]


def test_the_open_of_another_email_does_not_count() -> None:
    sim = Simulation([DRIP], T0)
    student(sim, language="pl")
    started(sim)

    sim.track("ada", "Email Opened", {"template_id": "weekly-digest"})

    assert sim.templates_sent("ada") == ["lesson-1"]
    assert sim.waiting("ada") == 1


def test_not_opened_resends_lesson_one_with_another_subject_once() -> None:
    sim = Simulation([DRIP], T0)
    student(sim, language="pl", first_name="Ola")
    started(sim)

    sim.advance(timedelta(days=3))
    assert sim.templates_sent("ada") == ["lesson-1", "lesson-1-resend"]
    first, again = (rendered(s, FILE) for s in sim.sent("ada"))
    assert first.subject != again.subject

    sim.advance(timedelta(days=10))
    assert sim.templates_sent("ada") == ["lesson-1", "lesson-1-resend"]
    assert sim.exits("ada") == ["exit_step"]
    assert sim.calls == []


def test_opening_the_resend_sends_lesson_two() -> None:
    sim = Simulation([DRIP], T0)
    student(sim, language="pl")
    started(sim)
    sim.advance(timedelta(days=4))

    opened(sim, sim.sent("ada")[1])

    assert sim.templates_sent("ada") == ["lesson-1", "lesson-1-resend", "lesson-2"]
    assert len(sim.calls) == 1
