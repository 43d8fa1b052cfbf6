"""A channel paused by a configuration error, as the dispatcher records it for the admin: one
document per channel in the `channel_pauses` collection. The dispatcher decides and writes it;
the admin lists the pauses still running and the Delivery page shows their alert. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict

CHANNEL_PAUSES = "channel_pauses"
# The dispatcher's metric to alert on (services/dispatcher/adapters/metrics.py).
PAUSED_ALERT_METRIC = "waypost_dispatcher_channel_paused_until_seconds"

# What to check when a channel pauses: the settings holding its provider's credentials.
WHAT_TO_FIX = {
    "email": "check the SMTP credentials and sender in WAYPOST_SMTP_USERNAME, "
    "WAYPOST_SMTP_PASSWORD and WAYPOST_EMAIL_FROM",
    "sms": "check the SMS provider credentials in WAYPOST_SMS_ACCOUNT_SID, "
    "WAYPOST_SMS_AUTH_TOKEN and the sender in WAYPOST_SMS_FROM",
    "push": "check the FCM service account in WAYPOST_FCM_SERVICE_ACCOUNT_FILE "
    "(its project, key and permissions)",
    "wechat": "check the WeChat credentials in WAYPOST_WECHAT_APP_ID and "
    "WAYPOST_WECHAT_APP_SECRET, and the template ids of the WeChat templates "
    "(a daily quota pause ends at midnight in Shanghai)",
}


class ChannelPause(BaseModel):
    """A channel's latest pause: no send on it until `until`; paused since `since` (the first
    pause of a run of pauses with no send window between them)."""

    model_config = ConfigDict(frozen=True)

    channel: str
    until: AwareDatetime
    reason: str
    since: AwareDatetime
    worker: str

    def document(self) -> dict[str, Any]:
        return {"_id": self.channel, **self.model_dump(exclude={"channel"})}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> ChannelPause:
        fields = {k: v for k, v in document.items() if k != "_id"}
        return cls.model_validate({"channel": document["_id"], **fields})


def next_pause(
    previous: ChannelPause | None,
    channel: str,
    until: datetime,
    reason: str | None,
    now: datetime,
    worker: str,
    gap: timedelta,
) -> ChannelPause:
    """The channel's record after a pause at `now`: a pause that follows the previous one
    within `gap` of its end (the retry after a pause met the same error) keeps its `since`;
    a later `until` of another worker is kept."""
    since = now
    if previous is not None and previous.until + gap >= now:
        since = min(previous.since, now)
        until = max(until, previous.until)
    return ChannelPause(
        channel=channel,
        until=until,
        reason=reason or "configuration error",
        since=since,
        worker=worker,
    )


def paused_now(pauses: Iterable[ChannelPause], now: datetime) -> list[dict[str, Any]]:
    """The pauses still running at `now`, by channel, each with its alert metric and what to
    fix (`GET /v1/delivery/paused-channels`)."""
    return [
        {
            "channel": pause.channel,
            "reason": pause.reason,
            "until": pause.until,
            "since": pause.since,
            "seconds_left": round((pause.until - now).total_seconds(), 1),
            "worker": pause.worker,
            "alert_metric": f'{PAUSED_ALERT_METRIC}{{channel="{pause.channel}"}}',
            "what_to_fix": WHAT_TO_FIX.get(pause.channel, "check the channel's provider settings"),
        }
        for pause in sorted(pauses, key=lambda p: p.channel)
        if pause.until > now
    ]
