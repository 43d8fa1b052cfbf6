"""Structured logging (structlog) set up the same way in every service.

Operators get JSON lines by default: one line per event, and an error carries its exception's
type, message and a few frames (file, line, function), never local variables. The console
renderer is for people reading a terminal (`WAYPOST_LOG_FORMAT=console`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

import structlog
from structlog.tracebacks import ExceptionDictTransformer

LogFormat = Literal["json", "console"]
# Frames kept per exception: where it was raised and how it got there, not the whole stack.
TRACEBACK_FRAMES = 6
# A library's repeated message is logged once per window, with how many were held back.
REPEAT_WINDOW_SECONDS = 10.0
REPEAT_KEYS_KEPT = 10_000
# Libraries whose info lines name what must not reach a log (`configure_logging`).
QUIET_BELOW_WARNING = ("httpx", "httpcore")


def renderers(fmt: LogFormat) -> list[structlog.types.Processor]:
    """The last processors of the chain: how an event dict becomes one line."""
    if fmt == "console":
        return [
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        ]
    return [
        structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False, max_frames=TRACEBACK_FRAMES, use_rich=False)
        ),
        structlog.processors.JSONRenderer(),
    ]


class RepeatFilter(logging.Filter):
    """Lets one line of a repeated library message through per `window` seconds, with the
    count of those it held back. A client that cannot reach the broker logs the same line
    thousands of times a second; an operator needs to see it once in a while."""

    def __init__(
        self,
        window: float = REPEAT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True  # our own structured events: each one counts
        key = (record.name, record.msg)
        now = self._clock()
        first, held = self._seen.get(key, (now - self._window, 0))
        if now - first < self._window:
            self._seen[key] = (first, held + 1)
            return False
        if len(self._seen) > REPEAT_KEYS_KEPT:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.repeated = held
        return True


def configure_logging(service: str, level: str = "info", fmt: LogFormat = "json") -> None:
    """Route stdlib and structlog output to stderr as JSON lines (or console lines)."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared_processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.ExtraAdder(allow=("repeated",)),
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared_processors, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *renderers(fmt),
            ],
            foreign_pre_chain=shared_processors,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # HTTP clients log every request's URL at info: a contact key in the path the admin's pages
    # ask their own API for, a token in a provider's query string. Their warnings still come.
    for name in QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    structlog.contextvars.bind_contextvars(service=service)
