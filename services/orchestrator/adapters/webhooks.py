"""Webhook steps: make the HTTP call off the stream, then route the answer back as a stimulus.

A call runs in a background task so one slow endpoint never holds up a partition. The answer goes
to `waypost.webhook-results.v1` under the contact's key, where the orchestrator's agent handles it
in order with the contact's events. `call_id` is sent as `Idempotency-Key`: a call repeated after
a crash (at-least-once) can be recognised by the receiver.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import structlog

from shared.clock import Clock
from shared.contracts import WebhookCall, WebhookResult
from shared.kafka import AsyncProducer
from shared.topics import WEBHOOK_RESULTS

log = structlog.get_logger(__name__)

# 408, 429 and 5xx answers are worth another attempt; other 4xx are the receiver's final word.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# The longest answer body kept in the context (bytes); larger answers keep only the status.
MAX_BODY_BYTES = 64 * 1024


async def call_webhook(
    client: httpx.AsyncClient,
    call: WebhookCall,
    clock: Clock,
    pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> WebhookResult:
    """Make the call with its timeout, retrying transport errors and retryable statuses."""
    attempts = 0
    status: int | None = None
    error: str | None = None
    body: Any = None
    for attempt in range(call.retries + 1):
        attempts = attempt + 1
        try:
            response = await client.request(
                call.method,
                call.url,
                json=call.body if call.method != "GET" else None,
                params=None,
                headers={**call.headers, "Idempotency-Key": call.call_id},
                timeout=call.timeout_seconds,
            )
        except httpx.HTTPError as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        else:
            status, error = response.status_code, None
            body = _body_of(response)
            if response.is_success:
                break
            error = f"HTTP {status}"
            if status not in RETRYABLE_STATUS:
                break
        if attempt < call.retries:
            # Exponential backoff with full jitter: 0.5 s, 1 s, 2 s, … at most 30 s.
            await pause(random.uniform(0, min(30.0, 0.5 * 2**attempt)))  # noqa: S311
    return WebhookResult(
        call_id=call.call_id,
        contact_key=call.contact_key,
        instance_id=call.instance_id,
        ok=error is None,
        status=status,
        body=body,
        error=error,
        attempts=attempts,
        at=clock.now(),
    )


def _body_of(response: httpx.Response) -> Any:
    if len(response.content) > MAX_BODY_BYTES:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text or None


class Webhooks:
    """Runs webhook calls in the background and publishes each result."""

    def __init__(self, producer: AsyncProducer, clock: Clock) -> None:
        self.producer = producer
        self.clock = clock
        self._client: httpx.AsyncClient | None = None
        self._running: set[asyncio.Task[None]] = set()

    def start(self, call: WebhookCall) -> None:
        task = asyncio.get_running_loop().create_task(self._run(call))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, call: WebhookCall) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        try:
            result = await call_webhook(self._client, call, self.clock)
            await self.producer.send(WEBHOOK_RESULTS.name, call.contact_key, result.to_wire())
        except Exception:
            # The instance's backstop timer ends the wait as failed; nothing else is lost.
            log.exception("orchestrator.webhook_failed", call_id=call.call_id, url=call.url)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
