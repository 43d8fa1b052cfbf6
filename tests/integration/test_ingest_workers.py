"""Ingest's supervisor (`services/ingest/workers.py`) over real sockets: each worker listens on
a socket of its own, connections reach every worker, a dead worker is replaced, a port in use
or a worker that cannot start stops it, SIGTERM and a terminal's Ctrl-C stop it with its
workers, and no worker outlives a killed supervisor."""

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
    """The supervisor in a session of its own (as the local stack starts services)."""
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
        start_new_session=True,
    )


def _answer(port: int) -> int | None:
    """The pid of the worker a new connection reached, or None while none answers."""
    try:
        with httpx.Client(timeout=2.0) as client:  # a client per call: a new connection
            return int(client.get(f"http://127.0.0.1:{port}/").text)
    except httpx.TransportError:
        return None


def _every_worker(port: int, count: int = 2, gone: int | None = None) -> set[int] | None:
    """The pids 60 new connections reached, once they are `count` (none of them `gone`)."""
    pids = {pid for pid in (_answer(port) for _ in range(60)) if pid is not None}
    return pids if len(pids) == count and gone not in pids else None


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


@contextlib.contextmanager
def _running(
    app: str, count: int = 2, setup: str = "logging_setup"
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = _free_port()
    process = _supervisor(app, port, count, setup)
    try:
        yield process, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the supervisor and all it started
        process.communicate(timeout=30)


def test_each_worker_listens_on_its_own_socket_and_a_dead_one_is_replaced() -> None:
    with _running("tests.integration.workers_app:pid_app") as (process, port):
        # The kernel spreads connections by a hash of their addresses: 60 new connections
        # all landing on one of two workers has a chance of about 2 in 10^18.
        first = wait_for(lambda: _every_worker(port), timeout=60, what="both workers answering")
        assert first <= _children(process.pid)  # beside them: multiprocessing's tracker
        listening = _listening_inodes(port)
        assert len(listening) == 2
        assert [len(listening & _socket_inodes(pid)) for pid in sorted(first)] == [1, 1]

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


@pytest.mark.parametrize("stop", ["SIGTERM to the supervisor", "Ctrl-C to the group"])
def test_a_stop_ends_the_workers_gracefully_and_then_the_supervisor(stop: str) -> None:
    with _running("tests.integration.workers_app:pid_app") as (process, port):
        workers = wait_for(lambda: _every_worker(port), timeout=60, what="both workers answering")
        if stop.startswith("SIGTERM"):
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
        output = process.stdout.read() if process.stdout else ""
    assert all(_gone(pid) for pid in workers)
    assert _answer(port) is None
    assert "ingest.stopping" in output
    assert "ingest.worker_killed" not in output  # each stopped within its grace
    assert "Traceback" not in output
    assert "ingest.worker_started" in output
    assert "ingest.worker_died" not in output


def test_no_worker_outlives_a_killed_supervisor() -> None:
    with _running("tests.integration.workers_app:pid_app") as (process, port):
        workers = wait_for(lambda: _every_worker(port), timeout=60, what="both workers answering")
        process.kill()  # the supervisor alone
        process.wait(timeout=30)
        wait_for(
            lambda: all(_gone(pid) for pid in workers),
            timeout=60,
            what="the workers stopping once their supervisor is gone",
        )
        assert _answer(port) is None


def test_a_port_in_use_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _supervisor("tests.integration.workers_app:pid_app", port)
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
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
