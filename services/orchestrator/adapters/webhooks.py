"""Webhook steps: make the HTTP call off the stream, then route the answer back as a stimulus.

A call runs in a background task so one slow endpoint never holds up a partition. The answer goes
to `waypost.webhook-results.v1` under the contact's key, where the orchestrator's agent handles it
in order with the contact's events. `call_id` is sent as `Idempotency-Key`: a call repeated after
a crash (at-least-once) can be recognised by the receiver.

A call reaches only destinations its `DestinationPolicy` allows (`webhook_network`), reads at most
`MAX_BODY_BYTES` of the answer (and one network read more), and ends with its retries within a
total deadline; at most `max_in_flight` calls run at once per worker, and waiting for a turn
counts against the deadline, so a slow endpoint cannot pile up open connections.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog

from services.orchestrator.adapters.webhook_network import DestinationRefused, webhook_client
from services.orchestrator.domain.destinations import DestinationPolicy
from shared.bodies import MAX_JSON_DEPTH, BadInput, TooDeep, parse_json, too_deep
from shared.clock import Clock
from shared.contracts import WebhookCall, WebhookResult
from shared.kafka import AsyncProducer
from shared.topics import WEBHOOK_RESULTS

log = structlog.get_logger(__name__)

# 408, 429 and 5xx answers are worth another attempt; other 4xx are the receiver's final word.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# The longest answer body kept in the context (bytes); larger answers keep only the status, and
# reading stops as soon as an answer is known to be larger.
MAX_BODY_BYTES = 64 * 1024
# A JSON answer nested deeper than the edge allows keeps only its status too: the instance's
# context holds the body a few levels further down, and the stored contact state must stay
# readable (pydantic's JSON parser stops at 200 levels).
TOO_DEEP = f"answer nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays; body left out"
SCHEMES = frozenset({"http", "https"})


async def call_webhook(
    client: httpx.AsyncClient,
    call: WebhookCall,
    clock: Clock,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    deadline_seconds: float | None = None,
) -> WebhookResult:
    """Make the call with its timeout per attempt, retrying transport errors and retryable
    statuses, all within `deadline_seconds`. A refused destination is final at once."""
    loop = asyncio.get_running_loop()
    ends_at = None if deadline_seconds is None else loop.time() + deadline_seconds
    attempts = 0
    ok = False
    status: int | None = None
    error: str | None = _scheme_refusal(call.url)
    body: Any = None
    for attempt in range(0 if error else call.retries + 1):
        attempts = attempt + 1
        deadline = asyncio.timeout_at(ends_at)
        try:
            async with deadline:
                response, content = await _attempt(client, call)
        except DestinationRefused as exc:
            status, error = None, f"DestinationRefused: {exc}"
            break
        except TimeoutError as exc:
            if not deadline.expired():  # not ours: a transport error like any other
                status, error = None, f"TimeoutError: {exc}"
            else:
                status, error = None, "DeadlineExceeded: no answer before the call's deadline"
                break
        except httpx.HTTPError as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        else:
            status, error = response.status_code, None
            body, left_out = _body_of(response, content)
            if response.is_success:
                # A body left out is said in `error`; the call itself succeeded.
                ok, error = True, left_out
                break
            error = f"HTTP {status}"
            if status not in RETRYABLE_STATUS:
                break
        if attempt < call.retries:
            # Exponential backoff with full jitter: 0.5 s, 1 s, 2 s, … at most 30 s.
            delay = random.uniform(0, min(30.0, 0.5 * 2**attempt))  # noqa: S311
            if ends_at is not None and loop.time() + delay >= ends_at:
                error = f"{error}; the call's deadline leaves no time for another attempt"
                break
            await pause(delay)
    return WebhookResult(
        call_id=call.call_id,
        contact_key=call.contact_key,
        instance_id=call.instance_id,
        ok=ok,
        status=status,
        body=body,
        error=error,
        attempts=max(attempts, 1),
        at=clock.now(),
    )


async def _attempt(
    client: httpx.AsyncClient, call: WebhookCall
) -> tuple[httpx.Response, bytes | None]:
    """One request; the answer's body, or None when it is longer than `MAX_BODY_BYTES`."""
    async with client.stream(
        call.method,
        call.url,
        json=call.body if call.method != "GET" else None,
        headers={**call.headers, "Idempotency-Key": call.call_id},
        timeout=call.timeout_seconds,
    ) as response:
        kept = bytearray()
        async for chunk in response.aiter_bytes():
            kept += chunk
            if len(kept) > MAX_BODY_BYTES:
                # Leaving the block closes the connection; the rest is never read.
                return response, None
        return response, bytes(kept)


def _scheme_refusal(url: str) -> str | None:
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL as exc:
        return f"DestinationRefused: not a URL ({exc})"
    if scheme not in SCHEMES:
        return f"DestinationRefused: only http and https URLs, not {scheme or 'no scheme'}"
    return None


def _body_of(response: httpx.Response, content: bytes | None) -> tuple[Any, str | None]:
    """The answer's body (JSON, else text) and, when it is left out, why."""
    if content is None:
        return None, None
    try:
        value = parse_json(content)
    except TooDeep:
        return None, TOO_DEEP
    except BadInput:
        return content.decode(response.encoding or "utf-8", errors="replace") or None, None
    if too_deep(value, MAX_JSON_DEPTH) is not None:
        return None, TOO_DEEP
    return value, None


class Webhooks:
    """Runs webhook calls in the background, at most `max_in_flight` at once, and publishes each
    result."""

    def __init__(
        self,
        producer: AsyncProducer,
        clock: Clock,
        policy: DestinationPolicy,
        *,
        deadline_seconds: float,
        max_in_flight: int,
    ) -> None:
        self.producer = producer
        self.clock = clock
        self.policy = policy
        self.deadline_seconds = deadline_seconds
        self._slots = asyncio.Semaphore(max_in_flight)
        self._client: httpx.AsyncClient | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self, call: WebhookCall) -> None:
        task = asyncio.get_running_loop().create_task(self._run(call))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, call: WebhookCall) -> None:
        if self._client is None:
            self._client = webhook_client(self.policy)
        try:
            result = await self._call(self._client, call)
            await self.producer.send(WEBHOOK_RESULTS.name, call.contact_key, result.to_wire())
        except Exception:
            # The instance's backstop timer ends the wait as failed; nothing else is lost.
            log.exception("orchestrator.webhook_failed", call_id=call.call_id, url=call.url)

    async def _call(self, client: httpx.AsyncClient, call: WebhookCall) -> WebhookResult:
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + self.deadline_seconds
        try:
            async with asyncio.timeout_at(ends_at):
                await self._slots.acquire()
        except TimeoutError:
            return WebhookResult(
                call_id=call.call_id,
                contact_key=call.contact_key,
                instance_id=call.instance_id,
                ok=False,
                error=f"DeadlineExceeded: no free webhook slot within {self.deadline_seconds:g} s",
                attempts=0,
                at=self.clock.now(),
            )
        try:
            return await call_webhook(
                client, call, self.clock, deadline_seconds=max(0.0, ends_at - loop.time())
            )
        finally:
            self._slots.release()

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
