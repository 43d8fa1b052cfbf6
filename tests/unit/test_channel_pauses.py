"""A channel's pause as the dispatcher records it for the admin, and which pauses the admin
lists as running."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.channel_pauses import PAUSED_ALERT_METRIC, ChannelPause, next_pause, paused_now

NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
GAP = timedelta(seconds=60)


def pause(channel: str = "sms", until_s: float = 60, since_s: float = 0) -> ChannelPause:
    return ChannelPause(
        channel=channel,
        until=NOW + timedelta(seconds=until_s),
        reason="401 Authenticate",
        since=NOW + timedelta(seconds=since_s),
        worker="w-1",
    )


def test_a_first_pause_starts_now() -> None:
    first = next_pause(None, "sms", NOW + GAP, "401 Authenticate", NOW, "w-1", GAP)
    assert first == pause()
    assert next_pause(None, "sms", NOW + GAP, None, NOW, "w-1", GAP).reason == (
        "configuration error"
    )


def test_a_pause_right_after_the_last_keeps_its_start_and_the_later_end() -> None:
    earlier = pause(until_s=60, since_s=-120)
    again = next_pause(earlier, "sms", NOW + timedelta(seconds=90), "x", NOW, "w-2", GAP)
    assert (again.since, again.worker) == (earlier.since, "w-2")
    assert again.until == NOW + timedelta(seconds=90)
    # Another worker's shorter pause does not end the channel's earlier.
    shorter = next_pause(earlier, "sms", NOW + timedelta(seconds=10), "x", NOW, "w-2", GAP)
    assert shorter.until == earlier.until
    # The retry after a pause ended met the error again: still the same run of pauses.
    later = NOW + timedelta(seconds=100)
    resumed = next_pause(earlier, "sms", later + GAP, "x", later, "w-1", GAP)
    assert resumed.since == earlier.since


def test_a_pause_long_after_the_last_starts_anew() -> None:
    old = pause(until_s=-3600, since_s=-3700)
    fresh = next_pause(old, "sms", NOW + GAP, "x", NOW, "w-1", GAP)
    assert (fresh.since, fresh.until) == (NOW, NOW + GAP)


def test_the_document_round_trips_keyed_by_channel() -> None:
    document = pause().document()
    assert document["_id"] == "sms"
    assert "channel" not in document
    assert ChannelPause.from_document(document) == pause()


def test_only_running_pauses_are_listed_with_their_alert_and_what_to_fix() -> None:
    listed = paused_now(
        [pause("wechat", until_s=30), pause("sms", until_s=5), pause("push", until_s=0)], NOW
    )
    assert [p["channel"] for p in listed] == ["sms", "wechat"]
    sms = listed[0]
    assert sms["alert_metric"] == f'{PAUSED_ALERT_METRIC}{{channel="sms"}}'
    assert sms["seconds_left"] == 5.0
    assert "WAYPOST_SMS_AUTH_TOKEN" in sms["what_to_fix"]
    assert sms["reason"] == "401 Authenticate"
