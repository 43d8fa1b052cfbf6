"""Audience schedules: which run an audience journey owes now (catch-up included), and the tick
that requests it from every segmenter partition and records it. Fakes stand in for Kafka, the
progress topic and partition ownership."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from services.orchestrator.adapters.audience_schedule import AudienceSchedule
from services.orchestrator.domain.audiences import (
    DueRun,
    audience_runs,
    due_request,
    due_run,
    latest_run,
    run_id,
)
from shared.clock import ManualClock
from shared.contracts import AudienceRequest
from shared.journey_engine.catalog import Catalog
from shared.journeys import AudienceTrigger, Journey, PublishedJourney
from shared.kafka import DeliveryFailed
from shared.topics import AUDIENCE_REQUESTS, AUDIENCE_RUNS

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday
WARSAW = ZoneInfo("Europe/Warsaw")
HOUR, DAY = timedelta(hours=1), timedelta(days=1)


def trigger(**fields: Any) -> AudienceTrigger:
    return AudienceTrigger.model_validate({"type": "audience", "segments": ["a"], **fields})


def recurring(**recurrence: Any) -> AudienceTrigger:
    return trigger(mode="recurring", recurrence={"start": T0.isoformat(), **recurrence})


# --- due_run: what is owed now --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "ongoing"])
def test_a_one_time_audience_is_owed_once_from_its_start(mode: str) -> None:
    once = trigger(mode=mode, start_at=T0)

    assert due_run(once, None, T0 - timedelta(seconds=1)) == DueRun(None)
    assert due_run(once, None, T0) == DueRun(T0)
    assert due_run(once, None, T0 + DAY * 40) == DueRun(T0)  # late, still owed
    assert due_run(once, T0, T0 + DAY * 40) == DueRun(None)


def test_a_one_time_audience_moved_later_by_a_new_version_runs_again() -> None:
    moved = trigger(mode="static", start_at=T0 + DAY)

    assert due_run(moved, T0, T0 + DAY) == DueRun(T0 + DAY)
    assert due_run(trigger(mode="static", start_at=T0 - DAY), T0, T0 + DAY) == DueRun(None)


def test_an_interval_is_owed_at_each_instant_from_its_start() -> None:
    every_6h = recurring(every="6h")

    assert due_run(every_6h, None, T0 - HOUR) == DueRun(None)
    assert due_run(every_6h, None, T0) == DueRun(T0)
    assert due_run(every_6h, T0, T0 + 5 * HOUR) == DueRun(None)
    assert due_run(every_6h, T0, T0 + 6 * HOUR) == DueRun(T0 + 6 * HOUR)


def test_a_cron_is_read_in_its_time_zone() -> None:
    weekly = recurring(cron="0 9 * * MON", timezone="Europe/Warsaw")
    first = datetime(2026, 3, 9, 8, 0, tzinfo=UTC)  # 09:00 in Warsaw (UTC+1 in winter)

    assert due_run(weekly, None, first - timedelta(seconds=1)) == DueRun(None)
    assert due_run(weekly, None, first) == DueRun(first)
    assert due_run(weekly, first, first + 6 * DAY) == DueRun(None)
    # After the switch to summer time (29 March) 09:00 in Warsaw is 07:00 UTC.
    due = due_run(
        weekly, datetime(2026, 3, 23, 8, 0, tzinfo=UTC), datetime(2026, 3, 30, 7, 0, 1, tzinfo=UTC)
    )
    assert due.at == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)


def test_a_cron_instant_that_daylight_saving_skips_is_the_one_the_forward_walk_gives() -> None:
    # 02:30 does not exist in Warsaw on 29 March 2026; whatever croniter makes of it, the instant
    # owed must be one `audience_runs` lists, so both give the same run id.
    nightly = recurring(cron="30 2 * * *", timezone="Europe/Warsaw")
    noon = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)

    owed = due_run(nightly, datetime(2026, 3, 28, 12, 0, tzinfo=UTC), noon)

    listed = audience_runs(nightly, datetime(2026, 3, 28, 12, 0, tzinfo=UTC), noon)
    assert owed == DueRun(listed[-1])
    assert run_id("j", owed.at or T0) == run_id("j", listed[-1])


def test_nothing_is_owed_after_the_end_and_the_last_run_is_at_most_the_end() -> None:
    daily = recurring(every="1d", end=(T0 + 2 * DAY + HOUR).isoformat())

    assert due_run(daily, None, T0 + DAY * 30) == DueRun(T0 + 2 * DAY, skipped=2)
    assert due_run(daily, T0 + 2 * DAY, T0 + DAY * 30) == DueRun(None)
    hourly = recurring(cron="0 * * * *", end=(T0 + 3 * HOUR).isoformat())
    assert due_run(hourly, T0 + HOUR, T0 + DAY) == DueRun(T0 + 3 * HOUR, skipped=1)


def test_after_downtime_only_the_latest_instant_is_owed_and_the_rest_are_counted() -> None:
    hourly = recurring(cron="0 * * * *")
    every_15m = recurring(every="15m")

    assert due_run(hourly, T0, T0 + 5 * HOUR + timedelta(minutes=20)) == DueRun(
        T0 + 5 * HOUR, skipped=4
    )
    assert due_run(every_15m, T0, T0 + 2 * HOUR) == DueRun(T0 + 2 * HOUR, skipped=7)
    # Once requested, the skipped ones are not owed any more.
    assert due_run(hourly, T0 + 5 * HOUR, T0 + 5 * HOUR + timedelta(minutes=59)) == DueRun(None)


def test_a_schedule_that_started_long_ago_is_owed_its_latest_instant_only() -> None:
    every_minute = recurring(cron="* * * * *")
    now = T0 + DAY * 400 + timedelta(seconds=30)

    due = due_run(every_minute, None, now)

    assert due.at == now.replace(second=0)
    assert due.skipped >= 10_000 - 1  # counted up to the bound, not one by one for 400 days
    assert latest_run(every_minute, now) == now.replace(second=0)


def test_run_ids_are_per_journey_and_instant_whatever_the_zone() -> None:
    assert run_id("s17", T0) == run_id("s17", T0.astimezone(WARSAW))
    assert run_id("s17", T0) != run_id("s17", T0 + DAY)
    assert run_id("s17", T0) != run_id("s1", T0)


# --- due_request: the request for one journey version ---------------------------------------


def audience_journey(
    journey_id: str = "announce", version: int = 1, **trigger_fields: Any
) -> Journey:
    fields = trigger_fields or {"mode": "static", "start_at": T0.isoformat()}
    return Journey.model_validate(
        {
            "id": journey_id,
            "name": journey_id,
            "version": version,
            "trigger": {"type": "audience", "segments": ["fans", "vips"], **fields},
            "steps": [{"id": "hello", "type": "send", "template": "hello"}],
        }
    )


def test_the_request_names_the_version_the_segments_and_a_stable_run_id() -> None:
    journey = audience_journey(version=3)
    now = T0 + timedelta(seconds=2)

    run = due_request(journey, None, now)

    assert run is not None
    assert run.request == AudienceRequest(
        journey_id="announce",
        journey_version=3,
        run_id=run_id("announce", T0),
        segments=("fans", "vips"),
        run_at=T0,
        requested_at=now,
    )
    assert due_request(journey, T0, now) is None


def test_journeys_without_an_audience_trigger_request_nothing() -> None:
    event_journey = Journey.model_validate(
        {
            "id": "welcome",
            "name": "Welcome",
            "trigger": {"type": "event", "event": "Signed Up"},
            "steps": [{"id": "bye", "type": "exit"}],
        }
    )

    assert due_request(event_journey, None, T0 + DAY) is None


# --- the tick -------------------------------------------------------------------------------


class Broker:
    """Acknowledges at once and keeps every record; can be told to fail."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str | None, bytes, int | None]] = []
        self.failing = False

    async def broadcast(self, topic: str, key: str | None, value: bytes, partitions: int) -> None:
        if self.failing:
            raise DeliveryFailed("broker down")
        self.records.extend((topic, key, value, p) for p in range(partitions))

    async def send(self, topic: str, key: str | None, value: bytes) -> None:
        if self.failing:
            raise DeliveryFailed("broker down")
        self.records.append((topic, key, value, None))

    def on(self, topic: str) -> list[tuple[str | None, AudienceRequest, int | None]]:
        return [
            (key, AudienceRequest.model_validate_json(value), partition)
            for t, key, value, partition in self.records
            if t == topic
        ]


class FakeProgress:
    """The progress topic as a worker's view sees it; `lagging` hides what the tick recorded."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.caught_up = True
        self.lagging = False
        self.seen: dict[str, datetime] = {}

    def ready(self) -> bool:
        return self.caught_up

    def last_runs(self) -> dict[str, datetime]:
        if not self.lagging:
            for key, request, _p in self.broker.on(AUDIENCE_RUNS.name):
                assert key is not None
                self.seen[key] = request.run_at
        return dict(self.seen)


class Catalogs:
    def __init__(self, *published: PublishedJourney) -> None:
        self.catalog = Catalog.of(published)

    def current(self) -> Catalog:
        return self.catalog


Status = Literal["active", "paused", "archived"]


def published(journey: Journey, status: Status = "active") -> PublishedJourney:
    return PublishedJourney(journey=journey, status=status, published_at=T0 - DAY)


class Setup:
    def __init__(self, *journeys: PublishedJourney, owner: bool = True) -> None:
        self.clock = ManualClock(T0 - timedelta(seconds=5))
        self.broker = Broker()
        self.progress = FakeProgress(self.broker)
        self.catalogs = Catalogs(*journeys)
        self.owner = owner
        self.schedule = AudienceSchedule(
            catalog=self.catalogs,
            progress=self.progress,
            producer=self.broker,
            clock=self.clock,
            partitions=3,
            owns_schedule=lambda: self.owner,
        )

    def requests(self) -> list[tuple[str | None, AudienceRequest, int | None]]:
        return self.broker.on(AUDIENCE_REQUESTS.name)

    def progress_records(self) -> list[tuple[str | None, AudienceRequest, int | None]]:
        return self.broker.on(AUDIENCE_RUNS.name)


async def test_a_due_run_goes_to_every_partition_then_to_the_progress_topic() -> None:
    setup = Setup(published(audience_journey()))
    await setup.schedule.tick()
    assert setup.broker.records == []  # not due yet

    setup.clock.set(T0 + timedelta(milliseconds=300))
    await setup.schedule.tick()

    requests = setup.requests()
    assert sorted(p for _k, _r, p in requests) == [0, 1, 2]
    assert {k for k, _r, _p in requests} == {"announce"}
    (request,) = {r for _k, r, _p in requests}  # the same record on every partition
    assert (request.run_at, request.run_id) == (T0, run_id("announce", T0))
    assert [(k, r) for k, r, _p in setup.progress_records()] == [("announce", request)]
    assert [t for t, *_rest in setup.broker.records][-1] == AUDIENCE_RUNS.name  # recorded last


async def test_a_run_is_requested_once_even_while_the_progress_view_lags() -> None:
    setup = Setup(published(audience_journey()))
    setup.clock.set(T0)
    setup.progress.lagging = True

    for _ in range(3):
        await setup.schedule.tick()
        setup.clock.advance(timedelta(seconds=1))

    assert len(setup.progress_records()) == 1


async def test_only_the_owner_of_partition_0_requests_and_only_once_progress_is_known() -> None:
    setup = Setup(published(audience_journey()), owner=False)
    setup.clock.set(T0)
    await setup.schedule.tick()
    assert setup.broker.records == []

    setup.owner = True
    setup.progress.caught_up = False
    await setup.schedule.tick()
    assert setup.broker.records == []

    setup.progress.caught_up = True
    await setup.schedule.tick()
    assert len(setup.progress_records()) == 1


async def test_a_new_owner_carries_on_from_the_recorded_progress() -> None:
    first = Setup(
        published(
            audience_journey(mode="recurring", recurrence={"every": "1h", "start": T0.isoformat()})
        )
    )
    first.clock.set(T0)
    await first.schedule.tick()
    successor = AudienceSchedule(
        catalog=first.catalogs,
        progress=first.progress,
        producer=first.broker,
        clock=first.clock,
        partitions=3,
        owns_schedule=lambda: True,
    )

    first.clock.set(T0 + 30 * timedelta(minutes=1))
    await successor.tick()
    assert len(first.progress_records()) == 1
    first.clock.set(T0 + HOUR)
    await successor.tick()

    assert [r.run_at for _k, r, _p in first.progress_records()] == [T0, T0 + HOUR]


@pytest.mark.parametrize("status", ["paused", "archived"])
async def test_paused_and_archived_journeys_request_nothing(status: Status) -> None:
    setup = Setup(published(audience_journey(), status))
    setup.clock.set(T0 + DAY)

    await setup.schedule.tick()

    assert setup.broker.records == []


async def test_the_newest_version_decides_even_when_an_older_one_is_active() -> None:
    paused_v2 = Setup(
        published(audience_journey(version=1)), published(audience_journey(version=2), "paused")
    )
    later_v2 = Setup(
        published(audience_journey(version=1)),
        published(audience_journey(version=2, mode="static", start_at=(T0 + DAY).isoformat())),
    )
    for setup in (paused_v2, later_v2):
        setup.clock.set(T0 + HOUR)
        await setup.schedule.tick()

    assert paused_v2.broker.records == []
    assert later_v2.broker.records == []
    later_v2.clock.set(T0 + DAY)
    await later_v2.schedule.tick()
    ((_k, request, _p),) = later_v2.progress_records()
    assert (request.journey_version, request.run_at) == (2, T0 + DAY)


async def test_a_failed_publish_records_nothing_and_the_next_tick_asks_again() -> None:
    setup = Setup(published(audience_journey()))
    setup.clock.set(T0)
    setup.broker.failing = True
    await setup.schedule.tick()
    assert setup.broker.records == []

    setup.broker.failing = False
    setup.clock.advance(timedelta(seconds=1))
    await setup.schedule.tick()

    ((_k, request, _p),) = setup.progress_records()
    assert request.run_id == run_id("announce", T0)


async def test_a_schedule_that_cannot_be_worked_out_is_logged_once_and_blocks_no_other() -> None:
    never = {"cron": "0 0 30 2 *", "start": T0.isoformat()}  # 30 February
    broken = audience_journey("broken", mode="recurring", recurrence=never)
    setup = Setup(published(broken), published(audience_journey("fine")))
    setup.clock.set(T0 + DAY)

    with capture_logs() as logs:
        await setup.schedule.tick()
        await setup.schedule.tick()

    assert [k for k, _r, _p in setup.progress_records()] == ["fine"]
    unreadable = [e for e in logs if e["event"] == "orchestrator.audience_schedule_unreadable"]
    assert [e["journey_id"] for e in unreadable] == ["broken"]


async def test_skipped_runs_are_logged() -> None:
    hourly = audience_journey(
        mode="recurring", recurrence={"cron": "0 * * * *", "start": T0.isoformat()}
    )
    setup = Setup(published(hourly))
    setup.clock.set(T0 + 3 * HOUR + timedelta(minutes=10))

    with capture_logs() as logs:
        await setup.schedule.tick()

    ((_k, request, _p),) = setup.progress_records()
    assert request.run_at == T0 + 3 * HOUR
    (skipped,) = [e for e in logs if e["event"] == "orchestrator.audience_runs_skipped"]
    assert skipped["skipped"] == 3
