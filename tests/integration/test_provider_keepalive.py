"""Kept-alive provider connections and the server's idle timeout, on a real HTTP server.

A server drops a connection that stayed idle past its keep-alive timeout (uvicorn, Node and
Apache: 5 s). A worker whose event loop is busy has not yet read that close when it takes the
connection from its pool again, so its request goes to a socket the server has left: no answer,
and for a push or WeChat message that is an `unknown` send. Keeping idle connections for less
time than the server does means the pool never hands out one the server may have dropped.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from services.dispatcher.channels.http import ProviderClient, RequestMaybeSent
from services.dispatcher.settings import DispatcherSettings
from tests.e2e.helpers import wait_for

# The server's keep-alive timeout in these tests (uvicorn's default is 5 s).
SERVER_IDLE_SECONDS = 1


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own
        pass


@pytest.fixture
def server() -> Iterator[tuple[_Server, str]]:
    """A real uvicorn server on a free port, in a thread with its own event loop."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        _app,
        timeout_keep_alive=SERVER_IDLE_SECONDS,
        lifespan="off",
        loop="asyncio",  # no process-wide event loop policy (uvloop) left behind
        log_config=None,  # the test process's logging stays as the other tests set it
    )
    running = _Server(config)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for(lambda: running.started, timeout=10, what="the server to start")
    try:
        yield running, f"http://127.0.0.1:{port}/send"
    finally:
        running.should_exit = True
        thread.join(timeout=10)
        listener.close()


async def _after_the_server_dropped_it(server: _Server, client: ProviderClient, url: str) -> Any:
    """One call, then a second one once the server closed the idle connection, while the
    client's loop was busy (it has not read that close)."""
    first = await client.post(url, data=b"{}")
    assert first.status_code == 200
    await asyncio.sleep(0)  # the answer is read; the connection goes back to the pool
    # Blocking this thread blocks the client's event loop too, as a busy worker's would be.
    wait_for(
        lambda: not server.server_state.connections,
        timeout=10,
        what="the server to drop the idle connection",
    )
    return await client.post(url, data=b"{}")


async def test_a_pool_kept_longer_than_the_server_keeps_it_sends_into_a_dropped_connection(
    server: tuple[_Server, str],
) -> None:
    """The hazard itself: with idle connections kept 30 s, the second call is written to the
    connection the server dropped, and no answer comes."""
    running, url = server
    client = ProviderClient(max_connections=4, timeout=5.0, keepalive_seconds=30.0)
    try:
        with pytest.raises(RequestMaybeSent):
            await _after_the_server_dropped_it(running, client, url)
    finally:
        await client.aclose()


async def test_a_pool_kept_shorter_than_the_server_keeps_it_opens_a_new_connection(
    server: tuple[_Server, str],
) -> None:
    running, url = server
    client = ProviderClient(
        max_connections=4, timeout=5.0, keepalive_seconds=SERVER_IDLE_SECONDS * 0.8
    )
    try:
        answer = await _after_the_server_dropped_it(running, client, url)
        assert answer.status_code == 200
    finally:
        await client.aclose()


def test_the_default_keeps_idle_connections_less_than_common_servers_do() -> None:
    """uvicorn, Node and Apache close idle keep-alive connections after 5 s."""
    assert DispatcherSettings().http_keepalive_seconds < 5.0
