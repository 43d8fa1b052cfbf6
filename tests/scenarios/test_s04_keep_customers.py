"""S4 Keep customers: a survey a month after the first order, then thanks and a reply by score."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s04-keep-customers")
KEEP = FILE.journey


def customer(sim: Simulation, contact: str = "ada") -> None:
    sim.identify(contact, email=f"{contact}@example.com", first_name="Ada")
    sim.tag(contact, "first order")


def surveyed(sim: Simulation, contact: str = "ada") -> None:
    customer(sim, contact)
    sim.advance(timedelta(days=30))


def test_the_survey_goes_out_thirty_days_after_the_tag() -> None:
    sim = Simulation([KEEP], T0)
    customer(sim)

    sim.advance(timedelta(days=30) - timedelta(seconds=1))
    assert sim.sent("ada") == []
    sim.advance(timedelta(seconds=1))

    (survey,) = sim.sent("ada")
    assert survey.template_id == "satisfaction-survey"
    assert "c=ada" in rendered(survey, FILE).text


@pytest.mark.parametrize("score", [7, 9, 10])
def test_a_high_score_gets_thanks_then_a_referral_invitation(score: int) -> None:
    sim = Simulation([KEEP], T0)
    surveyed(sim)
    sim.advance(timedelta(days=3))

    sim.track("ada", "Form Submitted", {"form": "survey", "score": score})

    assert sim.templates_sent("ada") == [
        "satisfaction-survey",
        "survey-thank-you",
        "referral-invite",
    ]
    assert all(s.requested_at == T0 + timedelta(days=33) for s in sim.sent("ada")[1:])
    assert "detractor" not in sim.profile("ada").tags
    assert f"{score}/10" in rendered(sim.sent("ada")[2], FILE).text


@pytest.mark.parametrize("score", [0, 3, 6])
def test_a_low_score_gets_thanks_an_apology_and_the_detractor_tag(score: int) -> None:
    sim = Simulation([KEEP], T0)
    surveyed(sim)

    sim.track("ada", "Form Submitted", {"form": "survey", "score": score})

    assert sim.templates_sent("ada") == [
        "satisfaction-survey",
        "survey-thank-you",
        "survey-apology",
    ]
    assert sim.profile("ada").tags == ("first order", "detractor")
    assert sim.sent("ada")[1].context["survey"]["properties"]["score"] == score


def test_another_form_does_not_count_as_the_survey() -> None:
    sim = Simulation([KEEP], T0)
    surveyed(sim)

    sim.track("ada", "Form Submitted", {"form": "newsletter", "score": 2})

    assert sim.templates_sent("ada") == ["satisfaction-survey"]
    assert sim.waiting("ada") == 1


def test_an_answer_without_a_score_gets_only_the_thanks() -> None:
    sim = Simulation([KEEP], T0)
    surveyed(sim)

    sim.track("ada", "Form Submitted", {"form": "survey", "score": "great"})

    assert sim.templates_sent("ada") == ["satisfaction-survey", "survey-thank-you"]
    assert sim.exits("ada") == ["exit_step"]


def test_no_answer_within_fourteen_days_ends_quietly() -> None:
    sim = Simulation([KEEP], T0)
    surveyed(sim)

    sim.advance(timedelta(days=14))
    sim.track("ada", "Form Submitted", {"form": "survey", "score": 1})

    assert sim.templates_sent("ada") == ["satisfaction-survey"]
    assert sim.exits("ada") == ["exit_step"]
    assert "detractor" not in sim.profile("ada").tags
