"""The topic registry: every Kafka topic Waypost uses, in one place.

Names are versioned (`waypost.<name>.v1`); a breaking change gets a new topic, never a new meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_MS = 86_400_000
# How long a topic that is not compacted keeps its records (`retention.ms`). Most carry contact
# data (addresses in profile snapshots and send requests), which an erasure cannot take out of
# an append-only log: it stays until then (docs/erasure.md). Consumers more than this behind lose
# records, so it is well beyond any lag the pipeline should see.
CONTACT_DATA_RETENTION_MS = 7 * DAY_MS
# Dead letters wait for a person to look at them and replay them: twice as long.
DEAD_LETTER_RETENTION_MS = 14 * DAY_MS
# A compacted topic's older values of a key (an erased contact's last profile, ledger entries
# before the erasure rewrote them) become eligible for compaction within this.
MAX_COMPACTION_LAG_MS = DAY_MS


@dataclass(frozen=True)
class Topic:
    """A topic and how it is created: compacted (the latest value per key, tombstones delete),
    or kept for `retention_ms`."""

    name: str
    description: str
    compacted: bool = False
    keyed_by_contact: bool = True
    single_partition: bool = False
    retention_ms: int = CONTACT_DATA_RETENTION_MS

    def config(self) -> dict[str, str]:
        """The topic's settings at the broker, set when it is created and on every start."""
        if self.compacted:
            return {
                "cleanup.policy": "compact",
                "max.compaction.lag.ms": str(MAX_COMPACTION_LAG_MS),
            }
        return {"retention.ms": str(self.retention_ms)}


EVENTS = Topic("waypost.events.v1", "behavioural and delivery events, keyed by contact key")
CONTACT_EVENTS = Topic(
    "waypost.contact-events.v1",
    "each change of a contact with what it announced and one profile snapshot (segmenter output)",
)
DELIVERY_REPORTS = Topic(
    "waypost.delivery-reports.v1",
    "what the dispatcher follows, as the segmenter accepted it: delivery reports, opens, clicks,"
    " (un)subscribes and erasures",
)
CONTACT_COMMANDS = Topic(
    "waypost.contact-commands.v1", "changes the orchestrator asks the segmenter to apply"
)
PROFILES = Topic("waypost.profiles.v1", "latest profile per contact", compacted=True)
SEND_REQUESTS = Topic("waypost.send-requests.v1", "messages the dispatcher must deliver")
SEND_RECEIPTS = Topic(
    "waypost.send-receipts.v1",
    "each try's intent (its ledger entry as marked `sending`, before the call) and what each"
    " provider call answered, written as it answers, to its send request's partition and keyed"
    " by message id: read by a worker that takes a partition or finds a try left `sending`",
    keyed_by_contact=False,
    retention_ms=DAY_MS,
)
TIMERS = Topic("waypost.timers.v1", "due orchestrator timers, fed back to the contact's partition")
WEBHOOK_RESULTS = Topic(
    "waypost.webhook-results.v1", "answers of webhook steps, fed back to the contact's partition"
)
JOURNEY_LOG = Topic("waypost.journey-log.v1", "journey instance history: entered, waiting, exited")
SEGMENT_TIMERS = Topic(
    "waypost.segment-timers.v1",
    "when time alone may next change a contact's segments (segmenter asks orchestrator timers)",
)
AUDIENCE_REQUESTS = Topic(
    "waypost.audience-requests.v1",
    "audience journey runs, one record per partition, asking the segmenter for members",
    keyed_by_contact=False,
)
AUDIENCE_RUNS = Topic(
    "waypost.audience-runs.v1",
    "the last run requested per audience journey (the schedule's durable progress)",
    compacted=True,
    keyed_by_contact=False,
    single_partition=True,
)
SEGMENT_COUNTS = Topic(
    "waypost.segment-counts.v1",
    "exact member count per segment and partition, kept by the segmenter",
    compacted=True,
    keyed_by_contact=False,
    single_partition=True,
)
OBJECT_RELATIONS = Topic(
    "waypost.object-relations.v1",
    "which contacts did what to which object (the fan-out index), keyed by object",
    keyed_by_contact=False,
)
DEFINITIONS = Topic(
    "waypost.definitions.v1",
    "published journey versions, segments and aggregates (keyed journey:/segment:/aggregate:)",
    compacted=True,
    keyed_by_contact=False,
    single_partition=True,
)
# Send requests waiting for another attempt, one topic per delay class (records wait in order).
SEND_RETRIES_SHORT = Topic("waypost.send-retries-short.v1", "send retries, short delay class")
SEND_RETRIES_MEDIUM = Topic("waypost.send-retries-medium.v1", "send retries, medium delay class")
SEND_RETRIES_LONG = Topic("waypost.send-retries-long.v1", "send retries, long delay class")
SEND_RETRIES: dict[str, Topic] = {
    "short": SEND_RETRIES_SHORT,
    "medium": SEND_RETRIES_MEDIUM,
    "long": SEND_RETRIES_LONG,
}
SUPPRESSIONS = Topic(
    "waypost.suppressions.v1",
    "addresses a provider called permanently bad, keyed by a keyed hash of channel and address"
    " (never the address itself); every dispatcher worker reads all of it",
    compacted=True,
    keyed_by_contact=False,
)
DEAD_LETTER = Topic(
    "waypost.dead-letter.v1",
    "records no consumer could process, with the reason",
    keyed_by_contact=False,
    retention_ms=DEAD_LETTER_RETENTION_MS,
)

ALL_TOPICS: tuple[Topic, ...] = (
    EVENTS,
    CONTACT_EVENTS,
    DELIVERY_REPORTS,
    CONTACT_COMMANDS,
    PROFILES,
    SEND_REQUESTS,
    SEND_RECEIPTS,
    SEND_RETRIES_SHORT,
    SEND_RETRIES_MEDIUM,
    SEND_RETRIES_LONG,
    TIMERS,
    WEBHOOK_RESULTS,
    JOURNEY_LOG,
    SEGMENT_TIMERS,
    AUDIENCE_REQUESTS,
    AUDIENCE_RUNS,
    SEGMENT_COUNTS,
    OBJECT_RELATIONS,
    DEFINITIONS,
    SUPPRESSIONS,
    DEAD_LETTER,
)

# What each service's consumer groups read (default group ids; the dispatcher has three). Tools
# that wait for the pipeline to drain, the tests and `bench/pipeline.py`, read this map.
# The dispatcher's ledger table's changelog (`shared.streams`: `<app id>-<table>-changelog`).
DISPATCHER_LEDGER_CHANGELOG = "waypost-dispatcher-ledger-changelog"

READERS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "segmenter": (
        (
            "waypost-segmenter",
            (EVENTS.name, CONTACT_COMMANDS.name, AUDIENCE_REQUESTS.name, OBJECT_RELATIONS.name),
        ),
    ),
    "orchestrator": (
        (
            "waypost-orchestrator",
            (CONTACT_EVENTS.name, TIMERS.name, WEBHOOK_RESULTS.name, SEGMENT_TIMERS.name),
        ),
    ),
    "dispatcher": (
        # The admin's view of the ledger, from the ledger table's changelog (a moment behind).
        ("waypost-ledger-view", (DISPATCHER_LEDGER_CHANGELOG,)),
        (
            "waypost-dispatcher",
            (
                SEND_REQUESTS.name,
                DELIVERY_REPORTS.name,
                *(t.name for t in SEND_RETRIES.values()),
            ),
        ),
    ),
}
