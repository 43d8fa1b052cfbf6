"""Ingest's worker processes, each listening on a socket of its own.

uvicorn's own supervisor hands one listening socket to every worker, and whichever worker wakes
first accepts. Keep-alive connections opened in a burst (a load balancer's pool, a load
generator's 32) then land unevenly: one worker saturated while another idles. Here each worker
binds its own socket with `SO_REUSEPORT`, and the kernel spreads new connections over the
listening workers by a hash of their addresses; a worker that is gone takes no new ones.

`SO_REUSEPORT` would also let a second ingest, started by mistake on the same port, share it in
silence: the parent first binds the port without it, so a port someone listens on is refused
before any worker starts. The parent restarts a worker that dies (at most one restart a second),
unless it died before it served: a broken app or setting fails the same way every time, so the
parent stops the others and exits with uvicorn's start-up failure code. SIGTERM or SIGINT stops
every worker gracefully (each finishes its requests and flushes its producer) and then the parent.
A worker has served once its server started (it says so on an event the parent holds); one that
dies before that, for whatever reason, stops the parent.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.importer import import_from_string

log = structlog.get_logger(__name__)

# How long a stopping worker may take to finish its requests and flush before it is killed.
GRACE_SECONDS = 30.0
# A dead worker is replaced at most this often.
RESTART_SECONDS = 1.0


@dataclass(frozen=True)
class Workers:
    """What to serve (an import path to an app factory), where, and how many processes."""

    app: str
    host: str
    port: int
    count: int
    # Further `uvicorn.Config` options, the same in every worker.
    options: dict[str, Any] = field(default_factory=dict)
    # "module:function" called first in each worker: its logging, so that an app that cannot
    # be loaded is logged as everything else.
    setup: str | None = None


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` with `SO_REUSEPORT` (and `SO_REUSEADDR`, as uvicorn's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def port_is_free(host: str, port: int) -> OSError | None:
    """None when `host:port` can be bound without `SO_REUSEPORT` (nobody listens on it), else
    the error binding it gave."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


class _Server(uvicorn.Server):
    """A uvicorn server that sets `ready` once it has started serving."""

    def __init__(self, config: uvicorn.Config, ready: Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()


def serve_worker(workers: Workers, ready: Event) -> None:
    """One worker process: its own socket, one uvicorn server on it."""
    if workers.setup is not None:
        import_from_string(workers.setup)()
    try:
        sock = listening_socket(workers.host, workers.port)
        _Server(uvicorn.Config(workers.app, **workers.options), ready).run(sockets=[sock])
    except Exception:
        if ready.is_set():
            raise
        log.exception("ingest.worker_cannot_start", app=workers.app)
        sys.exit(STARTUP_FAILURE)


def run(workers: Workers) -> int:
    """Serve with `workers.count` processes until SIGTERM or SIGINT; the exit status."""
    refused = port_is_free(workers.host, workers.port)
    if refused is not None:
        log.error(
            "ingest.port_unavailable", host=workers.host, port=workers.port, error=str(refused)
        )
        return STARTUP_FAILURE
    supervisor = _Supervisor(workers)
    previous = {sig: signal.signal(sig, supervisor.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class _Worker:
    process: BaseProcess
    ready: Event


class _Supervisor:
    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")
        self.running: list[_Worker] = []
        self.stopping = False

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("ingest.stopping", signal=signal.Signals(signum).name)
        self.stopping = True

    def start(self) -> _Worker:
        ready = self.context.Event()
        process = self.context.Process(
            target=serve_worker, args=(self.workers, ready), name="ingest-worker"
        )
        process.start()
        log.info("ingest.worker_started", pid=process.pid)
        return _Worker(process, ready)

    def run(self) -> int:
        self.running = [self.start() for _ in range(self.workers.count)]
        status = 0
        last_restart = 0.0
        while not self.stopping:
            wait([worker.process.sentinel for worker in self.running], timeout=0.5)
            for index, worker in enumerate(self.running):
                process = worker.process
                if self.stopping or process.is_alive():
                    continue
                process.join()
                if not worker.ready.is_set():
                    log.error(
                        "ingest.worker_failed_to_start", pid=process.pid, exitcode=process.exitcode
                    )
                    self.stopping, status = True, STARTUP_FAILURE
                    break
                log.warning("ingest.worker_died", pid=process.pid, exitcode=process.exitcode)
                time.sleep(max(0.0, last_restart + RESTART_SECONDS - time.monotonic()))
                last_restart = time.monotonic()
                self.running[index] = self.start()
        self.stop_all()
        return status

    def stop_all(self) -> None:
        for worker in self.running:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for worker in self.running:
            process = worker.process
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("ingest.worker_killed", pid=process.pid, grace_s=GRACE_SECONDS)
                process.kill()
                process.join()
