"""Apps for `test_ingest_workers.py`, imported by path in each worker process."""

from __future__ import annotations

import os
from typing import Any

from shared.logs import configure_logging


def logging_setup() -> None:
    configure_logging("ingest", "info", "console")


def pid_app() -> Any:
    """An ASGI app that answers every request with the worker's process id."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = str(os.getpid()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def broken_app() -> Any:
    """An app factory that fails, as a worker with a broken setting would."""
    raise RuntimeError("this app cannot start")


def broken_setup() -> None:
    """A worker's set-up that fails before its server exists."""
    raise RuntimeError("this worker cannot set up")
