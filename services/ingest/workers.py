"""Ingest's worker processes, each listening on a socket of its own.

uvicorn's own supervisor hands one listening socket to every worker, and whichever worker wakes
first accepts. Keep-alive connections opened in a burst (a load balancer's pool, a load
generator's 32) then land unevenly: one worker saturated while another idles. Here each worker
binds its own socket with `SO_REUSEPORT` as its server starts, and the kernel spreads new
connections over the listening workers by a hash of their addresses. A worker that is gone
takes no new connections; those already waiting in its queue are reset.

`SO_REUSEPORT` would also let a second ingest, started by mistake on the same port, share it in
silence. The parent first binds the port without it, so a port someone listens on is refused
before any worker starts. (A worker's socket is bound only for the moment before it listens,
so the check cannot see a second ingest started within that moment.)

The parent restarts a worker that dies after it served, at most one restart a second. A worker
that dies, or has not served within `STARTUP_SECONDS`, before it served stops the parent, which
stops the others and exits with uvicorn's start-up failure status: a broken app or setting
fails the same way every time (uvicorn's supervisor stops on a start-up failure too). SIGTERM
or SIGINT stops every worker gracefully (each finishes its requests and flushes its producer),
then the parent. A worker also stops when its parent is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.importer import import_from_string

log = structlog.get_logger(__name__)

# How long a stopping worker may take to finish its requests and flush before it is killed.
GRACE_SECONDS = 30.0
# How long a worker may take to start serving before it counts as failed to start.
STARTUP_SECONDS = 120.0
# A dead worker is replaced at most this often.
RESTART_SECONDS = 1.0
# The parent's loop wakes at least this often (to see a stop asked for by a signal).
TICK_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1


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


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` with `SO_REUSEPORT` (and `SO_REUSEADDR`, as uvicorn's)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def port_is_free(host: str, port: int) -> OSError | None:
    """None when `host:port` can be bound without `SO_REUSEPORT` (nobody listens on it), else
    the error binding it gave."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


class _Server(uvicorn.Server):
    """A uvicorn server that binds its own socket as it starts (its app loaded; its lifespan's
    start-up and its `listen` follow) and then marks itself `ready` for the parent."""

    def __init__(self, workers: Workers, ready: Any) -> None:
        super().__init__(uvicorn.Config(workers.app, **workers.options))
        self.workers = workers
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        sock = listening_socket(self.workers.host, self.workers.port)
        await super().startup([sock])
        if self.started:
            self.ready.value = 1
            log.info("ingest.worker_ready", host=self.workers.host, port=self.workers.port)


def serve_worker(workers: Workers, ready: Any) -> None:
    """One worker process: one uvicorn server on a socket of its own. `ready` (a shared byte)
    is set to 1 once it serves."""
    _stop_with_parent()
    try:
        if workers.setup is not None:
            import_from_string(workers.setup)()
        _Server(workers, ready).run()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached the whole group: uvicorn stopped gracefully on it, then
        # raised it again once stopped.
        return
    except Exception:
        event = "ingest.worker_failed" if ready.value else "ingest.worker_cannot_start"
        log.exception(event, app=workers.app)
        sys.exit(1 if ready.value else STARTUP_FAILURE)


def _stop_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent is gone (Linux), so that no
    worker outlives a killed supervisor and keeps its port."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was made
        sys.exit(0)


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
    # A shared byte without a lock (a worker killed while setting it cannot block the parent).
    ready: Any
    started_at: float


class _Supervisor:
    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")
        self.running: list[_Worker] = []
        self.stop_signal: int | None = None

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        """The signal handler: only records the signal (the loop logs it and stops)."""
        self.stop_signal = signum

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    def start(self) -> _Worker:
        ready = self.context.RawValue("b", 0)
        process = self.context.Process(
            target=serve_worker, args=(self.workers, ready), name="ingest-worker"
        )
        process.start()
        log.info("ingest.worker_started", pid=process.pid)
        return _Worker(process, ready, time.monotonic())

    def run(self) -> int:
        try:
            return self._supervise()
        finally:
            if self.stop_signal is not None:
                log.info("ingest.stopping", signal=signal.Signals(self.stop_signal).name)
            self.stop_all()

    def _supervise(self) -> int:
        """Start the workers and keep them running until a stop is asked for (0) or one fails
        to start (`STARTUP_FAILURE`)."""
        while len(self.running) < self.workers.count and not self.stopping:
            self.running.append(self.start())
        # Dead workers waiting for their replacement, by slot.
        dead: set[int] = set()
        next_restart = 0.0
        while not self.stopping:
            alive = [w.process.sentinel for i, w in enumerate(self.running) if i not in dead]
            pause = TICK_SECONDS
            if dead:
                pause = min(pause, max(0.0, next_restart - time.monotonic()))
            wait(alive, timeout=pause)
            if self.stopping:
                break
            for index, worker in enumerate(self.running):
                if index in dead:
                    continue
                if not worker.ready.value:
                    if self._failed_to_start(worker):
                        return STARTUP_FAILURE
                elif not worker.process.is_alive():
                    worker.process.join()
                    log.warning(
                        "ingest.worker_died",
                        pid=worker.process.pid,
                        exitcode=worker.process.exitcode,
                    )
                    dead.add(index)
            if dead and time.monotonic() >= next_restart and not self.stopping:
                index = min(dead)
                dead.discard(index)
                self.running[index] = self.start()
                next_restart = time.monotonic() + RESTART_SECONDS
        return 0

    def _failed_to_start(self, worker: _Worker) -> bool:
        """Whether a worker not yet serving has died, or is past `STARTUP_SECONDS` (then
        killed); logged."""
        process = worker.process
        late = time.monotonic() - worker.started_at > STARTUP_SECONDS
        if process.is_alive() and not late:
            return False
        if late:
            process.kill()
        process.join()
        log.error(
            "ingest.worker_failed_to_start",
            pid=process.pid,
            exitcode=process.exitcode,
            waited_s=round(time.monotonic() - worker.started_at, 1),
        )
        return True

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
