"""The treated-versus-holdout conversion report of a journey."""

from __future__ import annotations

import pytest

from services.admin.domain.conversion import conversion_report


def test_rates_and_uplift_come_from_instance_counts() -> None:
    report = conversion_report(
        {
            (False, "entered"): 900,
            (False, "converted"): 36,
            (True, "entered"): 100,
            (True, "converted"): 1,
        }
    )

    assert report.treated.rate == pytest.approx(0.04)
    assert report.holdout.rate == pytest.approx(0.01)
    assert report.uplift == pytest.approx(0.03)
    assert report.as_dict()["holdout"] == {"entered": 100, "converted": 1, "rate": 0.01}


def test_without_a_holdout_there_is_no_uplift() -> None:
    report = conversion_report({(False, "entered"): 10, (False, "converted"): 2})

    assert report.holdout.rate is None
    assert report.uplift is None
    assert report.treated.rate == pytest.approx(0.2)


def test_an_empty_journey_reports_no_rates() -> None:
    report = conversion_report({})

    assert (report.treated.rate, report.holdout.rate, report.uplift) == (None, None, None)
