"""Webhook calls over real sockets against a small HTTP server on 127.0.0.1, through the same
guarded client the orchestrator uses (loopback allowed, as in the local stack, unless a test
says otherwise)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpcore
import httpx
import pytest

from services.orchestrator.adapters.webhook_network import (
    GuardedBackend,
    GuardedTransport,
    webhook_client,
)
from services.orchestrator.adapters.webhooks import MAX_BODY_BYTES, Webhooks, call_webhook
from services.orchestrator.domain.destinations import DestinationPolicy
from shared.bodies import MAX_JSON_DEPTH
from shared.clock import ManualClock
from shared.contracts import WebhookCall, WebhookResult
from shared.journey_engine.state import ContactState, Instance
from shared.topics import WEBHOOK_RESULTS
from tests.scenarios.conftest import T0
from tests.waiting import holds_within

LOOPBACK = DestinationPolicy.parse(["127.0.0.0/8"], [])
# What /huge would send in full: far more than any socket buffer holds.
HUGE_BYTES = 64 * 1024 * 1024


class Receiver(BaseHTTPRequestHandler):
    """Answers by path: /ok (JSON), /flaky (503 twice, then 200), /missing (404), /slow,
    /huge (64 MiB of bytes, no length), /hold (waits until the test releases it), /deep/<n>
    (JSON objects nested n levels)."""

    hits: ClassVar[dict[str, int]] = {}
    seen: ClassVar[list[dict[str, Any]]] = []
    huge_sent: ClassVar[list[int]] = []
    holding: ClassVar[int] = 0
    most_held: ClassVar[int] = 0
    release = threading.Event()
    lock = threading.Lock()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        with Receiver.lock:
            Receiver.seen.append(
                {
                    "path": self.path,
                    "host": self.headers.get("Host"),
                    "key": self.headers.get("Idempotency-Key"),
                    "body": json.loads(self.rfile.read(length) or b"{}"),
                }
            )
            Receiver.hits[self.path] = Receiver.hits.get(self.path, 0) + 1
        if self.path == "/huge":
            self._huge()
        elif self.path.startswith("/deep/"):
            self._raw(200, nested_json(int(self.path.removeprefix("/deep/"))))
        elif self.path == "/hold":
            self._hold()
        elif self.path == "/ok":
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

    def _huge(self) -> None:
        sent = 0
        chunk = b"x" * 65536
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            while sent < HUGE_BYTES:
                self.wfile.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading and closed: what the cap should do
        Receiver.huge_sent.append(sent)

    def _hold(self) -> None:
        with Receiver.lock:
            Receiver.holding += 1
            Receiver.most_held = max(Receiver.most_held, Receiver.holding)
        Receiver.release.wait(10.0)
        with Receiver.lock:
            Receiver.holding -= 1
        self._answer(200, {"held": True})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self._raw(status, json.dumps(body).encode())

    def _raw(self, status: int, raw: bytes) -> None:
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


def nested_json(levels: int) -> bytes:
    """`{"a": {"a": … 1 …}}`, `levels` objects deep (written out: json.dumps stops near 1000)."""
    return b'{"a":' * levels + b"1" + b"}" * levels


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    Receiver.release.set()
    server.shutdown()
    server.server_close()


def call(
    url: str, *, retries: int = 2, timeout: float = 5.0, call_id: str = "call-1"
) -> WebhookCall:
    return WebhookCall(
        call_id=call_id,
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
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(client, call(f"{receiver}/ok"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.body, result.attempts) == (
        True,
        200,
        {"score": 9, "owner": "rep-2"},
        1,
    )
    assert Receiver.seen[-1] == {
        "path": "/ok",
        "host": receiver.removeprefix("http://"),
        "key": "call-1",
        "body": {"contact": "ada"},
    }


async def test_a_503_is_retried_until_the_endpoint_answers(receiver: str) -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(client, call(f"{receiver}/flaky"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.attempts) == (True, 200, 3)


async def test_a_404_is_final_and_not_retried(receiver: str) -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(client, call(f"{receiver}/missing"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.error, result.attempts) == (False, 404, "HTTP 404", 1)


async def test_a_slow_endpoint_times_out_on_every_attempt(receiver: str) -> None:
    async with webhook_client(LOOPBACK) as client:
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
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(
            client, call(f"http://127.0.0.1:{closed}/x", retries=2), ManualClock(T0), no_pause
        )

    assert not result.ok
    assert result.attempts == 3
    assert "ConnectError" in str(result.error)


# --- destinations ------------------------------------------------------------------------------


def port_of(receiver: str) -> int:
    return int(receiver.rsplit(":", 1)[1])


async def test_loopback_is_refused_unless_allowed_and_the_receiver_never_hears_of_it(
    receiver: str,
) -> None:
    before = Receiver.hits.get("/ok", 0)
    async with webhook_client(DestinationPolicy()) as client:
        result = await call_webhook(client, call(f"{receiver}/ok"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.attempts) == (False, None, 1)
    assert str(result.error).startswith("DestinationRefused: 127.0.0.1 is loopback")
    assert "WAYPOST_WEBHOOK_ALLOWED_NETWORKS" in str(result.error)
    assert Receiver.hits.get("/ok", 0) == before

    async with webhook_client(LOOPBACK) as client:
        allowed = await call_webhook(client, call(f"{receiver}/ok"), ManualClock(T0), no_pause)

    assert (allowed.ok, allowed.status) == (True, 200)
    assert Receiver.hits["/ok"] == before + 1


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("localhost", "localhost resolves to"),
        ("[::1]", "::1 is loopback"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1 is loopback, IPv4 inside IPv6"),
        ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254 is link-local, IPv4 inside IPv6"),
        ("169.254.169.254", "169.254.169.254 is link-local"),
        ("10.0.0.1", "10.0.0.1 is private"),
        ("0.0.0.0", "0.0.0.0 is unspecified"),
    ],
)
async def test_names_and_literals_of_internal_addresses_are_refused_without_retries(
    receiver: str, host: str, reason: str
) -> None:
    url = f"http://{host}:{port_of(receiver)}/ok"
    async with webhook_client(DestinationPolicy()) as client:
        result = await call_webhook(client, call(url, retries=3), ManualClock(T0), no_pause)

    assert (result.ok, result.attempts) == (False, 1)
    assert str(result.error).startswith(f"DestinationRefused: {reason}")


async def test_only_http_and_https_urls_are_called() -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(client, call("ftp://127.0.0.1/x"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.attempts) == (False, None, 1)
    assert result.error == "DestinationRefused: only http and https URLs, not ftp"


class Recording(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, noting the host of every TCP connection it is asked for."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.hosts: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.hosts.append(host)
        return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def test_an_allowed_host_name_connects_to_the_checked_address_and_keeps_its_host_header(
    receiver: str,
) -> None:
    recording = Recording()
    transport = GuardedTransport(DestinationPolicy.parse([], ["localhost"]))
    transport._pool = httpcore.AsyncConnectionPool(
        network_backend=GuardedBackend(transport_policy(transport), recording)
    )
    url = f"http://localhost:{port_of(receiver)}/ok"
    async with httpx.AsyncClient(transport=transport) as client:
        result = await call_webhook(client, call(url), ManualClock(T0), no_pause)

    assert (result.ok, result.status) == (True, 200)
    # Sockets were asked for addresses, never for the name (no second lookup to rebind).
    assert recording.hosts
    assert "localhost" not in recording.hosts
    assert recording.hosts[-1] == "127.0.0.1"
    assert Receiver.seen[-1]["host"] == f"localhost:{port_of(receiver)}"


def transport_policy(transport: GuardedTransport) -> DestinationPolicy:
    backend = transport._pool._network_backend
    assert isinstance(backend, GuardedBackend)
    return backend.policy


# --- the answer's size, the deadline, the calls in flight ---------------------------------------


async def test_a_huge_answer_keeps_its_status_and_is_not_read_to_its_end(receiver: str) -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(client, call(f"{receiver}/huge"), ManualClock(T0), no_pause)

    assert (result.ok, result.status, result.body) == (True, 200, None)
    assert await holds_within(lambda: bool(Receiver.huge_sent), 5.0)
    # The receiver could not write it all: the client closed after a little over the cap.
    assert MAX_BODY_BYTES < Receiver.huge_sent[-1] < HUGE_BYTES


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 2, 199, 1500])
async def test_an_answer_nested_past_the_limit_keeps_its_status_and_says_why(
    receiver: str, levels: int
) -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(
            client, call(f"{receiver}/deep/{levels}"), ManualClock(T0), no_pause
        )

    assert (result.ok, result.status, result.body, result.attempts) == (True, 200, None, 1)
    assert result.error == (
        f"answer nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays; body left out"
    )
    # What the orchestrator stores of it reads back (a deep body would not, past ~196 levels).
    assert WebhookResult.model_validate_json(result.to_wire()) == result


async def test_an_answer_nested_to_the_limit_is_kept_whole(receiver: str) -> None:
    # The top-level object is not counted: its value nests MAX_JSON_DEPTH levels.
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(
            client, call(f"{receiver}/deep/{MAX_JSON_DEPTH + 1}"), ManualClock(T0), no_pause
        )

    assert (result.ok, result.status, result.error) == (True, 200, None)
    assert result.body == json.loads(nested_json(MAX_JSON_DEPTH + 1))
    # Kept in an instance's context, within the contact's stored state, it still reads back.
    answer = {"ok": result.ok, "status": result.status, "body": result.body}
    instance = Instance(
        instance_id="inst-1",
        journey_id="j",
        journey_version=1,
        contact_key="ada",
        step_id="notify",
        entered_at=T0,
        context={"captured": {"hook": answer}},
    )
    state = ContactState(contact_key="ada", instances={"inst-1": instance})
    assert ContactState.model_validate_json(state.model_dump_json()) == state


async def test_the_deadline_ends_an_attempt_and_leaves_no_retry(receiver: str) -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(
            client,
            call(f"{receiver}/slow", retries=5, timeout=10.0),
            ManualClock(T0),
            no_pause,
            deadline_seconds=0.3,
        )

    assert (result.ok, result.status, result.attempts) == (False, None, 1)
    assert result.error == "DeadlineExceeded: no answer before the call's deadline"


async def test_the_deadline_ends_retries_of_timed_out_attempts(receiver: str) -> None:
    async with webhook_client(LOOPBACK) as client:
        result = await call_webhook(
            client,
            call(f"{receiver}/slow", retries=10, timeout=0.2),
            ManualClock(T0),
            no_pause,
            # The backoff after the first attempt is drawn from 0 to 0.5 s and checked against
            # the deadline (not waited): 2 s always leave room for a second attempt after the
            # first 0.2 s one, and never for all eleven (2.2 s of attempts).
            deadline_seconds=2.0,
        )

    assert not result.ok
    assert 1 < result.attempts < 11
    assert "deadline" in str(result.error)


class Published:
    """Stands in for the producer: keeps every webhook result."""

    def __init__(self) -> None:
        self.results: list[WebhookResult] = []

    async def send(self, topic: str, key: str, value: bytes) -> None:
        assert topic == WEBHOOK_RESULTS.name
        self.results.append(WebhookResult.model_validate_json(value))


@pytest.fixture
def held() -> Iterator[None]:
    Receiver.release.clear()
    Receiver.most_held = 0
    yield
    Receiver.release.set()


@pytest.mark.usefixtures("held")
async def test_no_more_calls_than_the_bound_are_in_flight(receiver: str) -> None:
    published = Published()
    webhooks = Webhooks(
        published,  # type: ignore[arg-type]
        ManualClock(T0),
        LOOPBACK,
        deadline_seconds=30.0,
        max_in_flight=2,
    )
    arrived = Receiver.hits.get("/hold", 0)
    for n in range(3):
        webhooks.start(call(f"{receiver}/hold", call_id=f"held-{n}"))

    assert await holds_within(lambda: Receiver.holding == 2, 5.0)
    # The third call waits for a slot: it does not reach the receiver while two are held.
    assert not await holds_within(lambda: Receiver.hits.get("/hold", 0) - arrived > 2, 0.5)
    Receiver.release.set()
    assert await holds_within(lambda: len(published.results) == 3, 5.0)
    await webhooks.close()

    assert Receiver.most_held == 2
    assert sorted(r.call_id for r in published.results if r.ok) == ["held-0", "held-1", "held-2"]


async def test_waiting_for_a_slot_counts_against_the_deadline(receiver: str) -> None:
    published = Published()
    webhooks = Webhooks(
        published,  # type: ignore[arg-type]
        ManualClock(T0),
        LOOPBACK,
        deadline_seconds=0.3,
        max_in_flight=1,
    )
    await webhooks._slots.acquire()  # the one slot stays taken, as by a call that never ends
    before = Receiver.hits.get("/ok", 0)
    webhooks.start(call(f"{receiver}/ok", call_id="queued"))

    assert await holds_within(lambda: len(published.results) == 1, 5.0)
    await webhooks.close()

    [result] = published.results
    assert (result.ok, result.attempts, result.status) == (False, 0, None)
    assert result.error == "DeadlineExceeded: no free webhook slot within 0.3 s"
    assert Receiver.hits.get("/ok", 0) == before
