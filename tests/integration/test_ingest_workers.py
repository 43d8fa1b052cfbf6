"""Ingest's supervisor (`services/ingest/workers.py`) over real sockets: each worker listens on
a socket of its own, connections reach every worker, a dead worker is replaced, a port in use
or an app that cannot start stops it, and SIGTERM stops it with its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
STARTUP_FAILURE = 3  # uvicorn's exit status for a server that could not start


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _supervisor(
    app: str, port: int, count: int = 2, setup: str = "logging_setup"
) -> subprocess.Popen[str]:
    script = (
        "import sys\n"
        "from services.ingest.workers import Workers, run\n"
        f"sys.exit(run(Workers({app!r}, '127.0.0.1', {port}, {count}, "
        "options={'factory': True, 'log_config': None, 'access_log': False}, "
        f"setup='tests.integration.workers_app:{setup}')))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _answer(port: int) -> int | None:
    """The pid of the worker a new connection reached, or None while none answers."""
    try:
        with httpx.Client(timeout=2.0) as client:  # a client per call: a new connection
            return int(client.get(f"http://127.0.0.1:{port}/").text)
    except httpx.TransportError:
        return None


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


@contextlib.contextmanager
def _running(
    app: str, count: int = 2, setup: str = "logging_setup"
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = _free_port()
    process = _supervisor(app, port, count, setup)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        for child in _children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.communicate(timeout=30)


def _every_worker(port: int, count: int = 2, gone: int | None = None) -> set[int] | None:
    """The pids 60 new connections reached, once they are `count` (none of them `gone`)."""
    pids = {pid for pid in (_answer(port) for _ in range(60)) if pid is not None}
    return pids if len(pids) == count and gone not in pids else None


def test_new_connections_reach_every_worker_and_a_dead_worker_is_replaced() -> None:
    with _running("tests.integration.workers_app:pid_app") as (process, port):
        # The kernel spreads connections by a hash of their addresses: 60 new connections
        # all landing on one of two workers has a chance of about 2 in 10^18.
        first = wait_for(lambda: _every_worker(port), timeout=60, what="both workers answering")
        assert first <= _children(process.pid)  # beside them: multiprocessing's tracker

        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        replaced = wait_for(
            lambda: _every_worker(port, gone=killed),
            timeout=60,
            what="a new worker in place of the killed one",
        )
        assert max(first) in replaced
        assert replaced <= _children(process.pid)
        assert process.poll() is None


def test_sigterm_stops_the_workers_and_the_supervisor() -> None:
    with _running("tests.integration.workers_app:pid_app") as (process, port):
        workers = wait_for(lambda: _every_worker(port), timeout=60, what="both workers answering")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid
        assert _answer(port) is None


def _zombie(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    return True


def test_a_port_in_use_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _supervisor("tests.integration.workers_app:pid_app", port)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == STARTUP_FAILURE
    assert "ingest.port_unavailable" in output
    assert "ingest.worker_started" not in output


@pytest.mark.parametrize(
    ("app", "setup", "count", "reason"),
    [
        ("broken_app", "logging_setup", 1, "this app cannot start"),
        ("broken_app", "logging_setup", 2, "this app cannot start"),
        ("pid_app", "broken_setup", 2, "this worker cannot set up"),
    ],
)
def test_a_worker_that_cannot_start_stops_the_supervisor(
    app: str, setup: str, count: int, reason: str
) -> None:
    with _running(f"tests.integration.workers_app:{app}", count, setup) as (process, _port):
        assert process.wait(timeout=60) == STARTUP_FAILURE
        output = process.stdout.read() if process.stdout else ""
    assert reason in output
    assert "ingest.worker_failed_to_start" in output
    assert "ingest.worker_died" not in output
