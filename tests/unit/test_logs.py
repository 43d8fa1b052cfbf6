"""Operators' logs: JSON lines by default, errors with a short traceback and no locals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import structlog
    from shared.logs import configure_logging

    configure_logging("probe", "info", sys.argv[1])
    log = structlog.get_logger("probe")

    def fails(secret_token):
        raise RuntimeError("the store went away")

    log.info("probe.started", records=3)
    try:
        fails("s3cr3t-local-value")
    except RuntimeError:
        log.exception("probe.failed", key="contact-1")
    logging.getLogger("aiokafka").warning("foreign %s", "line")
    """
)


def _run(fmt: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    return done.stderr


def test_json_lines_one_per_event_with_a_short_traceback_and_no_locals() -> None:
    lines = _run("json").strip().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["probe.started", "probe.failed", "foreign line"]
    assert all(e["service"] == "probe" for e in events)
    assert events[0]["records"] == 3
    failure = events[1]
    assert failure["level"] == "error"
    (raised,) = failure["exception"]
    assert raised["exc_type"] == "RuntimeError"
    assert raised["exc_value"] == "the store went away"
    frames = raised["frames"]
    assert 1 <= len(frames) <= 6
    assert frames[-1]["name"] == "fails"
    assert all("locals" not in f or f["locals"] is None for f in frames)
    assert "s3cr3t-local-value" not in "\n".join(lines)
    assert events[2]["logger"] == "aiokafka"
    assert events[2]["level"] == "warning"


def test_console_format_is_for_terminals_and_shows_no_locals() -> None:
    text = _run("console")
    assert "probe.failed" in text
    assert "RuntimeError: the store went away" in text
    assert "s3cr3t-local-value" not in text
    with_json = [line for line in text.splitlines() if line.startswith("{")]
    assert with_json == []


def test_settings_default_to_json() -> None:
    from shared.settings import CommonSettings

    assert CommonSettings.model_fields["log_format"].default == "json"
