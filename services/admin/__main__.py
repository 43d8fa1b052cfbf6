"""Start the admin API: `python -m services.admin`."""

from __future__ import annotations

import asyncio
import contextlib
import functools

import structlog
import uvicorn

from services.admin.access import redact_access_log
from services.admin.adapters.analytics import (
    JourneyLogStore,
    follow_journey_log,
    message_states,
)
from services.admin.adapters.audit import AuditLog
from services.admin.adapters.count_history import CountHistory, keep_recording
from services.admin.adapters.dead_letters import DeadLetterTopic
from services.admin.adapters.insights import Insights
from services.admin.adapters.journeys import Definitions, JourneyDrafts, TemplateStore
from services.admin.adapters.recent_events import RECENT_EVENTS, recent_events_view
from services.admin.adapters.segments import (
    ContactCommands,
    Contacts,
    SegmentCounts,
    SegmentDefinitions,
)
from services.admin.adapters.test_sends import TestSends
from services.admin.app import create_app
from services.admin.domain.segments import segment_totals
from services.admin.settings import AdminSettings
from shared import event_loop
from shared.clock import SystemClock
from shared.deadletter import through_outages
from shared.definitions import PublishedJourneys
from shared.docstore import connect, database
from shared.document_view import run_view_thread
from shared.kafka import AsyncProducer, ConsumerLoop, prepare_topics, topic_record_count
from shared.logs import configure_logging
from shared.secrets import enforce
from shared.topics import EVENTS, JOURNEY_LOG

log = structlog.get_logger(__name__)


async def serve(settings: AdminSettings) -> None:
    client = connect(settings, "waypost-admin")
    kafka = settings.kafka()
    db = database(client, settings)
    journeys = PublishedJourneys(kafka)
    journeys.start()
    segment_counts = SegmentCounts(kafka)
    segment_counts.start()
    producer = AsyncProducer(kafka, client_id="admin")
    store = JourneyLogStore(db)
    count_history = CountHistory(db, settings.admin_count_interval_seconds)
    consumer = ConsumerLoop(
        kafka,
        group_id=f"{settings.group_id}-journey-log",
        topics=[JOURNEY_LOG.name],
        client_id="admin",
    )
    app = create_app(
        settings,
        journeys,
        store,
        functools.partial(message_states, db),
        functools.partial(topic_record_count, kafka, EVENTS.name),
        drafts=JourneyDrafts(db),
        templates=TemplateStore(db),
        definitions=Definitions(producer, journeys),
        segment_definitions=SegmentDefinitions(producer, journeys),
        segment_counts=segment_counts,
        contacts=Contacts(db),
        contact_commands=ContactCommands(producer),
        audit_trail=AuditLog(db),
        clock=SystemClock(),
        insights=Insights(db),
        dead_letters=DeadLetterTopic(kafka),
        test_sends=TestSends(producer),
        count_history=count_history,
    )
    stop = asyncio.Event()
    follower = asyncio.create_task(
        follow_journey_log(consumer, store, stop, settings.view_batch_seconds)
    )
    # The timeline's recent events: a view on a thread and event loop of its own, so its
    # batches never hold up the API's requests. Switched off, nothing of it is kept: a view
    # that does not run would not erase a forgotten contact's events either.
    if settings.admin_recent_events:
        stop_recent_events = run_view_thread(
            settings,
            "waypost-admin-recent-events",
            lambda db: recent_events_view(settings, db, f"{settings.group_id}-recent-events"),
        )
    else:
        await through_outages(db[RECENT_EVENTS].drop, what="recent events dropped")
        log.info("admin.recent_events_off")

        def stop_recent_events() -> None:
            return None

    def live_counts() -> dict[str, int]:
        totals = segment_totals(segment_counts.latest())
        return {
            p.segment.id: totals[p.segment.id].members if p.segment.id in totals else 0
            for p in journeys.segments()
        }

    recorder = asyncio.create_task(keep_recording(count_history, live_counts, SystemClock(), stop))
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.admin_host, port=settings.admin_port, log_level=settings.log_level
        )
    )
    # Request paths name contacts (/v1/contacts/{key}); the access log shows digests instead.
    redact_access_log(app.routes, settings.contact_digest())
    try:
        await server.serve()
    finally:
        stop.set()
        # A journey-log write still running past the wait (the store slow to answer) is
        # cancelled; the rest of the shutdown goes on (its records are read again next start).
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(follower, timeout=5)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(recorder, timeout=5)
        stop_recent_events()
        consumer.close()
        producer.close()
        segment_counts.stop()
        journeys.stop()
        await client.close()


def main() -> None:
    settings = AdminSettings()
    configure_logging("admin", settings.log_level, settings.log_format)
    enforce(settings.env, settings.secrets())
    prepare_topics(settings)
    event_loop.run(serve(settings), settings.event_loop)


if __name__ == "__main__":
    main()
