"""Webhook calls over real sockets against a small HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from services.orchestrator.adapters.webhooks import call_webhook
from shared.clock import ManualClock
from shared.contracts import WebhookCall
from tests.scenarios.conftest import T0


class Receiver(BaseHTTPRequestHandler):
    """Answers by path: /ok (JSON), /flaky (503 twice, then 200), /missing (404), /slow."""

    hits: ClassVar[dict[str, int]] = {}
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        Receiver.seen.append(
            {
                "path": self.path,
                "key": self.headers.get("Idempotency-Key"),
                "body": json.loads(self.rfile.read(length) or b"{}"),
            }
        )
        Receiver.hits[self.path] = Receiver.hits.get(self.path, 0) + 1
        if self.path == "/ok":
            self._answer(200, {"score": 9, "owner": "rep-2"})
        elif self.path == "/flaky":
            self._answer(
                503 if Receiver.hits[self.path] <= 2 else 200, {"try": Receiver.hits[self.path]}
            )
        elif self.path == "/slow":
            threading.Event().wait(2.0)
            self._answer(200, {})
        else:
            self._answer(404, {"error": "no such hook"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout case)

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def call(url: str, *, retries: int = 2, timeout: float = 5.0) -> WebhookCall:
    return WebhookCall(
        call_id="call-1",
        contact_key="ada",
        instance_id="inst-1",
        step_id="notify",
        method="POST",
        url=url,
        body={"contact": "ada"},
        timeout_seconds=timeout,
        retries=retries,
    )


async def no_pause(_seconds: float) -> None:
    """Backoff without waiting: the retries themselves are what these tests look at."""


async def test_a_json_answer_lands_in_the_result_with_the_idempotency_key_sent(
    receiver: str,
) -> None:
    async with httpx.AsyncClient() as client:
        result = await call_webhook(client, call(f"{receiver}/ok"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.body, result.attempts) == (
        True,
        200,
        {"score": 9, "owner": "rep-2"},
        1,
    )
    assert Receiver.seen[-1] == {"path": "/ok", "key": "call-1", "body": {"contact": "ada"}}


async def test_a_503_is_retried_until_the_endpoint_answers(receiver: str) -> None:
    async with httpx.AsyncClient() as client:
        result = await call_webhook(client, call(f"{receiver}/flaky"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.attempts) == (True, 200, 3)


async def test_a_404_is_final_and_not_retried(receiver: str) -> None:
    async with httpx.AsyncClient() as client:
        result = await call_webhook(client, call(f"{receiver}/missing"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.error, result.attempts) == (False, 404, "HTTP 404", 1)


async def test_a_slow_endpoint_times_out_on_every_attempt(receiver: str) -> None:
    async with httpx.AsyncClient() as client:
        result = await call_webhook(
            client, call(f"{receiver}/slow", retries=1, timeout=0.2), ManualClock(T0), no_pause
        )

    assert not result.ok
    assert result.status is None
    assert str(result.error).startswith("ReadTimeout")
    assert result.attempts == 2


async def test_a_refused_connection_fails_after_its_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    async with httpx.AsyncClient() as client:
        result = await call_webhook(
            client, call(f"http://127.0.0.1:{closed}/x", retries=2), ManualClock(T0), no_pause
        )

    assert not result.ok
    assert result.attempts == 3
    assert "ConnectError" in str(result.error)
