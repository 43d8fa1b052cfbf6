"""Operators' logs: JSON lines by default, errors with a short traceback and no locals."""

from __future__ import annotations

import json
import logging
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
    for _ in range(500):
        logging.getLogger("aiokafka").error("Unable connect to node with id %s", 1)
    logging.getLogger("httpx").info(
        'HTTP Request: %s %s "%s %d %s"',
        "GET", "http://admin/v1/contacts/ada@example.com", "HTTP/1.1", 200, "OK",
    )
    logging.getLogger("httpx").warning("the pool is %s", "full")
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
    assert [e["event"] for e in events] == [
        "probe.started",
        "probe.failed",
        "foreign line",
        "Unable connect to node with id 1",
        "the pool is full",
    ]
    assert "ada@example.com" not in "\n".join(lines), "an HTTP client's request line"
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
    assert "repeated" not in events[3], "the first of a repeated library line goes out at once"


def test_a_repeated_library_line_goes_out_once_per_window_with_its_count() -> None:
    from shared.logs import RepeatFilter

    now = [0.0]
    repeats = RepeatFilter(window=10.0, clock=lambda: now[0])

    def line(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, (1,), None)

    passed = []
    for at in (0.0, 1.0, 2.0, 9.0, 10.5, 11.0):
        now[0] = at
        record = line("Unable connect to node with id %s")
        if repeats.filter(record):
            passed.append((at, getattr(record, "repeated", 0)))
    assert passed == [(0.0, 0), (10.5, 3)]
    assert repeats.filter(line("another message")), "other messages are counted apart"


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
