"""Durations, time zones and local times: the calendar arithmetic journeys and segments share.

Pure functions; `now` always comes in from the caller's clock.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@lru_cache(maxsize=4096)
def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '6d', '2w' (also '1.5h') to a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration such as 30s, 15m, 6h, 3d or 2w")
    try:
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        raise ValueError(f"'{text}' is longer than any wait can be") from None


def parse_time_of_day(text: str) -> time:
    """'09:30' (24-hour clock) to a time."""
    match = _TIME_OF_DAY.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a time of day such as 09:00 or 21:30")
    return time(int(match.group(1)), int(match.group(2)))


def zone(name: str) -> ZoneInfo:
    """An IANA time zone by name ('Europe/Warsaw'); a clear error for unknown names."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{name}' is not an IANA time zone such as Europe/Paris") from None


def contact_zone(timezone: object, default: str) -> ZoneInfo:
    """The contact's own zone when its trait names a valid one, else the journey's default."""
    if isinstance(timezone, str):
        try:
            return zone(timezone)
        except ValueError:
            pass
    return zone(default)


def next_time_of_day(now: datetime, at: time, tz: ZoneInfo) -> datetime:
    """The next instant (after `now`, or `now` itself) when local clocks in `tz` show `at`."""
    local = now.astimezone(tz)
    candidate = datetime.combine(local.date(), at, tzinfo=tz)
    if candidate < local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=tz)
    return candidate.astimezone(UTC)


def end_of_local_day(now: datetime, tz: ZoneInfo) -> datetime:
    """The last instant of `now`'s calendar day in `tz` (23:59:59)."""
    local = now.astimezone(tz)
    last = datetime.combine(local.date(), time(23, 59, 59), tzinfo=tz)
    return last.astimezone(UTC)


def local_day(now: datetime, tz: ZoneInfo) -> str:
    """The calendar date in `tz`, ISO formatted: the key of per-local-day limits."""
    return now.astimezone(tz).date().isoformat()


def in_window(now: datetime, start: time, end: time, tz: ZoneInfo) -> bool:
    """Whether local time in `tz` lies in [start, end); windows may wrap midnight (21:00-08:00)."""
    local = now.astimezone(tz).time()
    if start <= end:
        return start <= local < end
    return local >= start or local < end
