"""When an audience journey selects its segment members: the run instants of its schedule (pure).

A static or ongoing audience runs once, at `start_at`; a recurring one at every instant of its
cron expression (read in the recurrence's time zone) or interval, from `start` until `end`.
Each run has a stable id, so a run repeated after a restart enters nobody twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import croniter

from shared.contracts import AudienceRequest
from shared.durations import parse_duration, zone
from shared.ids import stable_id
from shared.journeys import AudienceTrigger, Journey

# A safety bound on how many runs one call lists (a one-minute cron over years would be huge).
MAX_RUNS = 10_000
_SECOND = timedelta(seconds=1)
_DAY = timedelta(days=1)


def audience_runs(
    trigger: AudienceTrigger, after: datetime | None, until: datetime
) -> list[datetime]:
    """Run instants in (after, until], in order; `after=None` means from the very beginning."""
    if trigger.mode != "recurring" or trigger.recurrence is None:
        start = trigger.start_at
        due = start is not None and start <= until and (after is None or start > after)
        return [start] if due and start is not None else []
    recurrence = trigger.recurrence
    last = min(until, recurrence.end) if recurrence.end is not None else until
    runs: list[datetime] = []
    if recurrence.every is not None:
        step = parse_duration(recurrence.every)
        moment = recurrence.start
        if after is not None and after >= moment:
            moment += step * ((after - moment) // step + 1)
        while moment <= last and len(runs) < MAX_RUNS:
            runs.append(moment)
            moment += step
        return runs
    # croniter yields instants strictly after its base: from `start`, step back a second so a
    # start that matches the expression is a run itself.
    from_start = after is None or after < recurrence.start
    base = recurrence.start - _SECOND if from_start else after
    assert base is not None
    cursor = croniter(recurrence.cron or "", base.astimezone(zone(recurrence.timezone)))
    while len(runs) < MAX_RUNS:
        moment = cursor.get_next(datetime)
        if moment > last:
            break
        runs.append(moment)
    return runs


def next_run(trigger: AudienceTrigger, after: datetime | None) -> datetime | None:
    """The first run instant after `after` (None: the schedule is over)."""
    if trigger.mode != "recurring" or trigger.recurrence is None:
        start = trigger.start_at
        return start if start is not None and (after is None or start > after) else None
    horizon = trigger.recurrence.end or datetime.max.replace(tzinfo=trigger.recurrence.start.tzinfo)
    candidate = after or trigger.recurrence.start
    for span_days in (1, 8, 32, 367, 3660):
        window_end = min(horizon, candidate + _DAY * span_days)
        runs = audience_runs(trigger, after, window_end)
        if runs:
            return runs[0]
        if window_end >= horizon:
            return None
    return None


def latest_run(trigger: AudienceTrigger, now: datetime) -> datetime | None:
    """The last run instant at or before `now` (None: the schedule has not started)."""
    if trigger.mode != "recurring" or trigger.recurrence is None:
        start = trigger.start_at
        return start if start is not None and start <= now else None
    recurrence = trigger.recurrence
    until = min(now, recurrence.end) if recurrence.end is not None else now
    if until < recurrence.start:
        return None
    if recurrence.every is not None:
        step = parse_duration(recurrence.every)
        return recurrence.start + step * ((until - recurrence.start) // step)
    # croniter's backward steps misplace instants around daylight-saving changes (and can stall
    # there), so a backward step only says where to begin; the instant itself comes from walking
    # forward, exactly as `audience_runs` lists runs, so its run id is the same.
    cursor = croniter(recurrence.cron or "", until.astimezone(zone(recurrence.timezone)))
    anchor: datetime = cursor.get_prev(datetime)
    for span_days in (0, 1, 8, 32, 367, 3660):
        after = anchor - _DAY * span_days - _SECOND
        found = _last_run(trigger, after, until)
        if found is not None:
            return found
        if after < recurrence.start:
            return None
    return None


def _last_run(trigger: AudienceTrigger, after: datetime, until: datetime) -> datetime | None:
    last: datetime | None = None
    while True:
        runs = audience_runs(trigger, after, until)
        if runs:
            last = runs[-1]
        if len(runs) < MAX_RUNS:
            return last
        after = runs[-1]


@dataclass(frozen=True)
class DueRun:
    """The run to request now, if any, and how many due instants before it were skipped."""

    at: datetime | None
    skipped: int = 0


def due_run(trigger: AudienceTrigger, last_run_at: datetime | None, now: datetime) -> DueRun:
    """The run an audience journey owes at `now`, given the last one requested.

    Only the latest due instant is owed: after downtime over several recurring instants, the
    earlier ones are skipped (counted up to `MAX_RUNS`), not requested one after another.
    """
    latest = latest_run(trigger, now)
    if latest is None or (last_run_at is not None and latest <= last_run_at):
        return DueRun(None)
    owed = audience_runs(trigger, last_run_at, latest)
    skipped = len(owed) - 1 if owed and owed[-1] == latest else len(owed)
    return DueRun(latest, max(skipped, 0))


@dataclass(frozen=True)
class ScheduledRun:
    """An audience run to request, and the due instants it skipped."""

    request: AudienceRequest
    skipped: int


def due_request(
    journey: Journey, last_run_at: datetime | None, now: datetime
) -> ScheduledRun | None:
    """The audience request an audience journey owes at `now`, if any.

    Call it with the newest version of each journey, and only while that version is active
    (`Catalog.open_for_entry`): a paused or archived journey requests nothing. `last_run_at` is
    the journey's last requested run, whichever version requested it, so a new version carries
    on its journey's schedule instead of starting it again.
    """
    trigger = journey.trigger
    if not isinstance(trigger, AudienceTrigger):
        return None
    due = due_run(trigger, last_run_at, now)
    if due.at is None:
        return None
    request = AudienceRequest(
        journey_id=journey.id,
        journey_version=journey.version,
        run_id=run_id(journey.id, due.at),
        segments=trigger.segments,
        run_at=due.at,
        requested_at=now,
    )
    return ScheduledRun(request, due.skipped)


def run_id(journey_id: str, at: datetime) -> str:
    """The stable id of one run of an audience journey: the same instant gives the same id,
    whichever time zone it is written in."""
    return stable_id(journey_id, "audience-run", at.astimezone(UTC).isoformat())
