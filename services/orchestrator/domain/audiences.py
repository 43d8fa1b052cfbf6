"""When an audience journey selects its segment members: the run instants of its schedule (pure).

A static or ongoing audience runs once, at `start_at`; a recurring one at every instant of its
cron expression (read in the recurrence's time zone) or interval, from `start` until `end`.
Each run has a stable id, so a run repeated after a restart enters nobody twice.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from croniter import croniter

from shared.durations import parse_duration, zone
from shared.ids import stable_id
from shared.journeys import AudienceTrigger

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


def run_id(journey_id: str, at: datetime) -> str:
    """The stable id of one run of an audience journey."""
    return stable_id(journey_id, "audience-run", at.isoformat())
