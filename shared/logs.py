"""Structured logging (structlog) set up the same way in every service.

Operators get JSON lines by default: one line per event, and an error carries its exception's
type, message and a few frames (file, line, function), never local variables. The console
renderer is for people reading a terminal (`WAYPOST_LOG_FORMAT=console`).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from structlog.tracebacks import ExceptionDictTransformer

LogFormat = Literal["json", "console"]
# Frames kept per exception: where it was raised and how it got there, not the whole stack.
TRACEBACK_FRAMES = 6


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


def configure_logging(service: str, level: str = "info", fmt: LogFormat = "json") -> None:
    """Route stdlib and structlog output to stderr as JSON lines (or console lines)."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared_processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
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
    structlog.contextvars.bind_contextvars(service=service)
