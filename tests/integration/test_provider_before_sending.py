"""The last check before a provider request goes out (`channels.http.BEFORE_SENDING`), on a real
HTTP server: once a request may take its connection, kept alive or new, the check runs, and a
check that raises stops the request before any byte of it reaches the server."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from services.dispatcher.channels.http import BEFORE_SENDING, ProviderClient
from tests.e2e.helpers import wait_for


class Received:
    """An ASGI app that answers 200 and counts the requests it received."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.count += 1
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


class Redirecting(Received):
    """Answers every request with a 307 to itself: a client that follows it writes the body
    again."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.count += 1
        headers = [(b"location", scope["path"].encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 307, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own
        pass


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Received, str]]:
    """A real uvicorn server on a free port, in a thread with its own event loop (its app
    `Received`, or the class a test names with `@pytest.mark.parametrize("server", [...],
    indirect=True)`)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    app = getattr(request, "param", Received)()
    config = uvicorn.Config(app, lifespan="off", loop="asyncio", log_config=None)
    running = _Server(config)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for(lambda: running.started, timeout=10, what="the server to start")
    try:
        yield app, f"http://127.0.0.1:{port}/send"
    finally:
        running.should_exit = True
        thread.join(timeout=10)
        listener.close()


class Lapsed(BaseException):
    """What the test's check raises."""


def _lapsed() -> None:
    raise Lapsed("the lease lapsed")


def _passes() -> None:
    return None


async def test_a_check_that_raises_stops_a_request_on_a_new_connection(
    server: tuple[Received, str],
) -> None:
    app, url = server
    client = ProviderClient(max_connections=4, timeout=5)
    token = BEFORE_SENDING.set(_lapsed)
    try:
        with pytest.raises(Lapsed):
            await client.post(url, data=b"{}")
    finally:
        BEFORE_SENDING.reset(token)
        await client.aclose()
    assert app.count == 0


async def test_a_check_that_raises_stops_a_request_on_a_kept_alive_connection(
    server: tuple[Received, str],
) -> None:
    app, url = server
    client = ProviderClient(max_connections=4, timeout=5)
    try:
        token = BEFORE_SENDING.set(_passes)
        try:
            first = await client.post(url, data=b"{}")  # checked, and sent
        finally:
            BEFORE_SENDING.reset(token)
        assert (first.status_code, app.count) == (200, 1)

        token = BEFORE_SENDING.set(_lapsed)
        try:
            with pytest.raises(Lapsed):
                await client.post(url, data=b"{}")
        finally:
            BEFORE_SENDING.reset(token)
        assert app.count == 1

        again = await client.post(url, data=b"{}")  # no check set: nothing stops it
        assert (again.status_code, app.count) == (200, 2)
    finally:
        await client.aclose()


class PassesOnce:
    """A check that holds when the request takes its connection and has lapsed by the time its
    bytes are written (a worker stopped in between)."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> None:
        self.asked += 1
        if self.asked > 1:
            raise Lapsed("the lease lapsed after the connection was handed over")


@pytest.mark.parametrize("body", [b"{}", {"To": "+15550001", "Body": "Hi"}])
async def test_the_check_is_asked_again_as_the_request_is_written(
    server: tuple[Received, str], body: bytes | dict[str, str]
) -> None:
    app, url = server
    client = ProviderClient(max_connections=4, timeout=5)
    check = PassesOnce()
    loop = asyncio.get_running_loop()
    unhandled: list[str] = []  # what asyncio would log at ERROR (a task's lost exception)
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context["message"]))
    try:
        token = BEFORE_SENDING.set(check)
        try:
            with pytest.raises(Lapsed):
                await client.post(url, data=body)
        finally:
            BEFORE_SENDING.reset(token)
        assert check.asked == 2
        assert app.count == 0  # not even the headers reached it
        gc.collect()  # a task whose exception nobody took says so as it is collected
        assert unhandled == []
        after = await client.post(url, data=body)  # the pool is still usable
        assert (after.status_code, app.count) == (200, 1)
    finally:
        loop.set_exception_handler(None)
        await client.aclose()


@pytest.mark.parametrize("server", [Redirecting], indirect=True)
async def test_a_provider_redirect_is_answered_not_followed(server: tuple[Received, str]) -> None:
    app, url = server
    client = ProviderClient(max_connections=4, timeout=5)
    try:
        answer = await client.post(url, data=b"{}")
    finally:
        await client.aclose()
    assert (answer.status_code, app.count) == (307, 1)
