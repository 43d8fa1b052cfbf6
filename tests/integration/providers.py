"""Helpers the provider adapters' integration tests share: a request log, a clock whose
monotonic time can be moved ahead, and a port nobody listens on."""

from __future__ import annotations

import socket
from datetime import datetime
from types import SimpleNamespace

import aiohttp

from shared.clock import SystemClock


class RequestLog:
    """Paths of every request the client makes (an aiohttp trace hook): token endpoint hits."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_start.append(self._started)

    async def _started(
        self, _session: aiohttp.ClientSession, _context: SimpleNamespace, params: object
    ) -> None:
        url = getattr(params, "url", None)
        self.paths.append(url.path if url is not None else "")

    def count(self, path: str) -> int:
        return self.paths.count(path)


class ShiftedClock:
    """Wall time as it is, monotonic time moved ahead on demand (token lifetimes)."""

    def __init__(self) -> None:
        self._system = SystemClock()
        self.ahead = 0.0

    def now(self) -> datetime:
        return self._system.now()

    def monotonic(self) -> float:
        return self._system.monotonic() + self.ahead


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
