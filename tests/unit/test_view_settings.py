"""The document views' batch window is a setting: two seconds unless told, more than nothing,
and short enough for a stopping service's 5 s wait for its views."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import CommonSettings


def test_a_view_gathers_two_seconds_of_its_topic_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WAYPOST_VIEW_BATCH_SECONDS", raising=False)
    assert CommonSettings().view_batch_seconds == 2.0
    monkeypatch.setenv("WAYPOST_VIEW_BATCH_SECONDS", "0.2")
    assert CommonSettings().view_batch_seconds == 0.2


@pytest.mark.parametrize("seconds", ["0", "-1", "4.5"])
def test_a_window_of_nothing_or_past_the_stop_s_wait_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, seconds: str
) -> None:
    monkeypatch.setenv("WAYPOST_VIEW_BATCH_SECONDS", seconds)
    with pytest.raises(ValidationError, match="view_batch_seconds"):
        CommonSettings()
