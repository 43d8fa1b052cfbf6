"""Which outcomes the dispatcher's log shows at its default level (info)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from services.dispatcher.handlers import log_outcome


@pytest.mark.parametrize(
    ("state", "level"),
    [("sent", "debug"), ("failed", "info"), ("unknown", "info"), ("skipped", "info")],
)
def test_a_sent_message_is_logged_at_debug_any_other_outcome_at_info(
    state: str, level: str
) -> None:
    with capture_logs() as logs:
        log_outcome("m-1", state, None if state == "sent" else "why")
    (line,) = logs
    assert line["event"] == "dispatcher.outcome"
    assert line["log_level"] == level
    assert line["message_id"] == "m-1"
    assert line["state"] == state
