"""Dispatcher shell: claim the ledger entry, check, render, send, record, report.

Offsets are committed only after every request of a batch reached a final ledger state (or the
dead-letter topic), so a crash repeats requests and the ledger turns repeats into no-ops.
"""

from __future__ import annotations

import asyncio
import random

import structlog
from pydantic import ValidationError

from services.dispatcher.adapters.email import SmtpSender
from services.dispatcher.adapters.store import Ledger, Templates
from services.dispatcher.domain.outcomes import EVENT_NAMES, Outcome, resume_action
from services.dispatcher.domain.rendering import RenderError, render_email, render_variables
from services.dispatcher.settings import DispatcherSettings
from shared.clock import Clock
from shared.contracts import Event, SendRequest
from shared.deadletter import DeadLetters
from shared.kafka import AsyncProducer, ConsumerLoop, Record
from shared.topics import EVENTS

log = structlog.get_logger(__name__)


class Dispatcher:
    def __init__(
        self,
        settings: DispatcherSettings,
        clock: Clock,
        ledger: Ledger,
        templates: Templates,
        email: SmtpSender,
        producer: AsyncProducer,
        dead_letters: DeadLetters,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.ledger = ledger
        self.templates = templates
        self.email = email
        self.producer = producer
        self.dead_letters = dead_letters
        self._slots = asyncio.Semaphore(settings.max_in_flight)

    async def run(self, consumer: ConsumerLoop, stop: asyncio.Event) -> None:
        async for batch in consumer.records():
            if batch:
                await asyncio.gather(*(self._process(record) for record in batch))
                consumer.commit(batch)
            if stop.is_set():
                return

    async def _process(self, record: Record) -> None:
        async with self._slots:
            try:
                request = SendRequest.model_validate_json(record.value)
            except ValidationError as exc:
                await self.dead_letters.send(record, f"undecodable send request: {exc}")
                return
            try:
                await self.handle(request)
            except Exception as exc:
                log.exception("dispatcher.failed", message_id=request.message_id)
                await self.dead_letters.send(record, f"{type(exc).__name__}: {exc}")

    async def handle(self, request: SendRequest) -> None:
        """Deliver one request at most once (marketing) or at least once (transactional)."""
        new, state = await self.ledger.claim(request, self.clock.now())
        if not new:
            action = resume_action(state, request.transactional)
            if action == "done":
                return
            if action == "unknown":
                await self._finish(request, Outcome("skipped", "unknown_after_crash"), "unknown")
                return
        outcome = await self._deliver(request)
        await self._finish(
            request,
            outcome,
            {"recipient": "failed", "config": "failed"}.get(outcome.kind, outcome.kind),
        )

    async def _deliver(self, request: SendRequest) -> Outcome:
        if request.channel != "email":
            return Outcome("skipped", f"channel_not_supported: {request.channel}")
        address = request.profile.traits.get("email")
        if not isinstance(address, str) or "@" not in address:
            return Outcome("skipped", "no_email_address")
        template = await self.templates.email(request.template_id)
        if template is None:
            return Outcome("skipped", f"template_not_ready: {request.template_id}")
        try:
            rendered = render_email(template, render_variables(request))
        except RenderError as exc:
            return Outcome("skipped", f"template_error: {exc}")
        await self.ledger.move(request.message_id, "sending", self.clock.now())
        outcome = Outcome("retry")
        for attempt in range(self.settings.send_attempts):
            outcome = await self.email.send(request.message_id, address, rendered)
            if outcome.kind != "retry":
                return outcome
            await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))  # noqa: S311
        return Outcome("recipient", f"retries_exhausted: {outcome.reason}")

    async def _finish(self, request: SendRequest, outcome: Outcome, state: str) -> None:
        now = self.clock.now()
        await self.ledger.move(request.message_id, state, now, reason=outcome.reason)
        properties = {
            "message_id": request.message_id,
            "channel": request.channel,
            "template_id": request.template_id,
            "journey_id": request.journey_id,
            "journey_version": request.journey_version,
            "step_id": request.step_id,
        }
        if outcome.reason:
            properties["reason"] = outcome.reason
        profile = request.profile
        event = Event(
            type="track",
            event=EVENT_NAMES[state],
            user_id=profile.user_id,
            anonymous_id=None if profile.user_id else request.contact_key,
            message_id=f"{request.message_id}:{state}",
            timestamp=now,
            received_at=now,
            properties=properties,
            source="waypost-dispatcher",
        )
        await self.producer.send(EVENTS.name, event.contact_key, event.to_wire())
        log.info(
            "dispatcher.outcome", message_id=request.message_id, state=state, reason=outcome.reason
        )
