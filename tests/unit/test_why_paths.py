"""A contact's path per journey, put back in the engine's order from log records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.admin.domain.why_paths import journey_paths

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
ORDERS = {("coupon", 1): {"plan": 0, "coupon-email": 1, "wait": 2}}


def record(kind: str, step: str | None, why: str | None, at: datetime = T0) -> dict[str, object]:
    return {
        "kind": kind,
        "journey_id": "coupon",
        "journey_version": 1,
        "instance_id": "i-1",
        "step_id": step,
        "at": at,
        "why": why,
        "reason": "holdout" if kind == "skipped" else None,
    }


def test_records_of_one_decision_come_back_in_the_engine_order() -> None:
    stored = [  # newest first, as the store answers, and in no order within one time
        record(
            "not_entered",
            None,
            "not entered: re-entry never, entered 2026-11-03",
            T0 + timedelta(days=1),
        ),
        record("waiting", "wait", "wait until 2026-11-04 09:00 UTC"),
        record("skipped", "coupon-email", None),
        record("step_completed", "plan", "branch arm 1: traits.plan = pro"),
        record("entered", None, "trigger event Order Completed"),
    ]

    (path,) = journey_paths(stored, ORDERS)

    assert path["journey_id"] == "coupon"
    assert [(line["step_id"], line["why"]) for line in path["lines"]] == [
        (None, "trigger event Order Completed"),
        ("plan", "branch arm 1: traits.plan = pro"),
        ("coupon-email", "skipped holdout"),
        ("wait", "wait until 2026-11-04 09:00 UTC"),
        (None, "not entered: re-entry never, entered 2026-11-03"),
    ]
    assert path["entered"] is True


def test_a_wait_s_failed_where_shows_after_the_wait_it_kept_waiting() -> None:
    miss = (
        "not moved on: Order Completed arrived, but where event.properties.total ≥ 100 failed"
        " (event.properties.total = 40); still waiting until 2026-11-05 09:00 UTC"
    )
    later = T0 + timedelta(hours=3)
    stored = [
        {**record("waiting", "wait", miss, later), "reason": "where_failed", "detail": "1"},
        record("waiting", "wait", "wait for Order Completed until 2026-11-05 09:00 UTC"),
        record("entered", None, "trigger event Order Completed"),
    ]

    (path,) = journey_paths(stored, ORDERS)

    assert [(line["kind"], line["step_id"], line["why"]) for line in path["lines"]] == [
        ("entered", None, "trigger event Order Completed"),
        ("waiting", "wait", "wait for Order Completed until 2026-11-05 09:00 UTC"),
        ("waiting", "wait", miss),
    ]
