"""Audience schedules: when one-time and recurring audience journeys select their members."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.orchestrator.domain.audiences import audience_runs, next_run, run_id
from shared.journeys import AudienceTrigger

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


def trigger(**fields: Any) -> AudienceTrigger:
    return AudienceTrigger.model_validate({"type": "audience", "segments": ["a"], **fields})


def test_a_static_audience_runs_once_at_its_start() -> None:
    static = trigger(mode="static", start_at=T0)

    assert audience_runs(static, None, T0 - timedelta(seconds=1)) == []
    assert audience_runs(static, None, T0 + timedelta(days=30)) == [T0]
    assert audience_runs(static, T0, T0 + timedelta(days=30)) == []
    assert next_run(static, None) == T0
    assert next_run(static, T0) is None


def test_an_interval_recurrence_runs_every_interval_until_its_end() -> None:
    daily = trigger(
        mode="recurring",
        recurrence={
            "every": "1d",
            "start": T0.isoformat(),
            "end": (T0 + timedelta(days=3)).isoformat(),
        },
    )

    runs = audience_runs(daily, None, T0 + timedelta(days=30))

    assert runs == [T0 + timedelta(days=n) for n in range(4)]
    assert audience_runs(daily, T0 + timedelta(hours=30), T0 + timedelta(days=30)) == [
        T0 + timedelta(days=2),
        T0 + timedelta(days=3),
    ]
    assert next_run(daily, T0 + timedelta(days=3)) is None


def test_a_weekly_cron_reads_its_hours_in_the_recurrence_time_zone() -> None:
    weekly = trigger(
        mode="recurring",
        recurrence={"cron": "0 9 * * MON", "start": T0.isoformat(), "timezone": "Europe/Warsaw"},
    )

    runs = audience_runs(weekly, None, T0 + timedelta(days=15))

    # 09:00 in Warsaw is 08:00 UTC in winter; 2026-03-02 08:00 UTC is before T0 (09:00 UTC).
    assert [r.astimezone(UTC) for r in runs] == [
        datetime(2026, 3, 9, 8, 0, tzinfo=UTC),
        datetime(2026, 3, 16, 8, 0, tzinfo=UTC),
    ]
    assert next_run(weekly, runs[0]) == runs[1]


def test_a_start_that_matches_the_cron_is_itself_a_run() -> None:
    hourly = trigger(mode="recurring", recurrence={"cron": "0 * * * *", "start": T0.isoformat()})

    assert audience_runs(hourly, None, T0 + timedelta(hours=2)) == [
        T0,
        T0 + timedelta(hours=1),
        T0 + timedelta(hours=2),
    ]


def test_run_ids_are_stable_per_journey_and_instant() -> None:
    assert run_id("s17", T0) == run_id("s17", T0)
    assert run_id("s17", T0) != run_id("s17", T0 + timedelta(days=1))
    assert run_id("s17", T0) != run_id("s1", T0)
