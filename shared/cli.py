"""The `waypost` command: create topics, check and publish journey definition files, pause, resume
or archive published journeys, check, publish or delete segments and aggregates, and list or
replay dead letters."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from pymongo import MongoClient

from shared.bodies import YamlRefused, read_yaml
from shared.clock import SystemClock
from shared.deadletter import StoredLetter, read_dead_letters, replay_dead_letters
from shared.definitions import PublishedJourneys
from shared.docstore import connect_or_exit
from shared.journey_checks import parse_journey_file
from shared.journeys import JourneyFile, PublishedJourney
from shared.kafka import ensure_topics, wait_for_broker
from shared.kafka_connection import client_config
from shared.lifecycle import (
    Publish,
    Refused,
    StatusChange,
    Unchanged,
    decide_publish,
    decide_status_change,
    shipped_template_document,
    templates_used,
)
from shared.segment_checks import (
    SegmentFileProblems,
    SegmentsRefused,
    check_segments,
    decide_segment_delete,
    decide_segments_publish,
    parse_segment_file,
)
from shared.segments import PublishedAggregate, PublishedSegment, SegmentFile
from shared.settings import CommonSettings
from shared.template_checks import template_problems
from shared.topics import ALL_TOPICS, DEFINITIONS

# What the definitions topic carries: journey versions, segments, aggregates.
Published = PublishedJourney | PublishedSegment | PublishedAggregate


class DefinitionError(Exception):
    """A definition file that cannot be published, with every problem found."""


def load_journey_file(path: Path, known_templates: Collection[str] = ()) -> JourneyFile:
    """Parse and validate a YAML or JSON definition file; raise with every problem named."""
    try:
        raw: Any = (
            json.loads(path.read_text()) if path.suffix == ".json" else read_yaml(path.read_text())
        )
    except (OSError, YamlRefused, json.JSONDecodeError) as exc:
        raise DefinitionError(f"{path}: cannot read: {exc}") from exc
    parsed, problems = parse_journey_file(raw, known_templates)
    if parsed is None:
        raise DefinitionError("\n".join(f"{path}: {p}" for p in problems))
    return parsed


def _produce(
    settings: CommonSettings, records: Sequence[Published], tombstones: Sequence[str] = ()
) -> None:
    """Write records (in order: one partition, one idempotent producer) and tombstones (keys)."""
    producer = Producer(
        {**client_config(settings.kafka()), "enable.idempotence": True, "acks": "all"}
    )
    for record in records:
        producer.produce(
            DEFINITIONS.name, key=record.key.encode(), value=record.model_dump_json().encode()
        )
    for key in tombstones:
        producer.produce(DEFINITIONS.name, key=key.encode(), value=None)
    if producer.flush(30) != 0:
        raise TimeoutError("definitions were not acknowledged by Kafka")


@contextmanager
def _following(settings: CommonSettings) -> Iterator[PublishedJourneys]:
    """The definitions topic, read to its end."""
    kafka = settings.kafka()
    wait_for_broker(kafka)
    ensure_topics(kafka, settings.topic_partitions, settings.topic_replication)
    followed = PublishedJourneys(kafka)
    followed.start(timeout=60)
    try:
        yield followed
    finally:
        followed.stop()


def _published(settings: CommonSettings) -> list[PublishedJourney]:
    with _following(settings) as followed:
        return followed.all()


def publish(settings: CommonSettings, files: list[Path]) -> int:
    """Publish definition files by the lifecycle rules: every file is decided before anything is
    written; then its templates go to the document store and its version to the definitions topic.
    """
    now = SystemClock().now()
    mongo: MongoClient[dict[str, Any]] = connect_or_exit(settings, "waypost-cli")
    try:
        templates = mongo[settings.mongo_db]["templates"]
        known = {str(doc["_id"]) for doc in templates.find({}, {"_id": 1})}
        parsed = [(path, load_journey_file(path, known)) for path in files]
        published = _published(settings)
        decisions: list[tuple[Path, Publish | Unchanged]] = []
        for path, journey_file in parsed:
            used = list(templates_used(journey_file))
            stored = {str(doc["_id"]): doc for doc in templates.find({"_id": {"$in": used}})}
            decision = decide_publish(journey_file, published, stored, now)
            if isinstance(decision, Refused):
                raise DefinitionError("\n".join(f"{path}: {p}" for p in decision.problems))
            if isinstance(decision, Publish):
                published.append(decision.record)
            decisions.append((path, decision))
        for _path, decision in decisions:
            for template_id, template in decision.templates.items():
                templates.replace_one(
                    {"_id": template_id},
                    shipped_template_document(template, now),
                    upsert=True,
                )
        _produce(settings, [d.record for _p, d in decisions if isinstance(d, Publish)])
    finally:
        mongo.close()
    for _path, decision in decisions:
        journey = decision.record.journey
        if isinstance(decision, Unchanged):
            restored = "".join(f", template {t} restored" for t in sorted(decision.templates))
            print(f"unchanged  {journey.id} v{journey.version}{restored}")
        else:
            print(
                f"published  {journey.id} v{journey.version} ({len(journey.steps)} steps, "
                f"{decision.record.status})"
            )
    return 0


def change_status(settings: CommonSettings, journey_id: str, change: StatusChange) -> int:
    """Pause, resume or archive a journey: rewrite its newest version with the new status."""
    decision = decide_status_change(journey_id, _published(settings), change)
    if isinstance(decision, Refused):
        raise DefinitionError(str(decision))
    _produce(settings, [decision])
    print(f"{decision.status:10} {journey_id} v{decision.journey.version}")
    return 0


def load_segment_files(files: Sequence[Path]) -> SegmentFile:
    """Read segment files as one set (a file may read another's aggregates and segments)."""
    problems: list[str] = []
    parsed: list[SegmentFile] = []
    for path in files:
        try:
            parsed.append(parse_segment_file(path))
        except SegmentFileProblems as exc:
            problems.append(str(exc))
    if problems:
        raise DefinitionError("\n".join(problems))
    return SegmentFile(
        aggregates=tuple(a for f in parsed for a in f.aggregates),
        segments=tuple(s for f in parsed for s in f.segments),
    )


def _where_defined(files: Sequence[Path]) -> dict[tuple[str, str], Path]:
    """(kind, id) -> the file that defines it (the first one), to point problems at files."""
    found: dict[tuple[str, str], Path] = {}
    for path in files:
        definitions = parse_segment_file(path)
        for aggregate in definitions.aggregates:
            found.setdefault(("aggregate", aggregate.id), path)
        for segment in definitions.segments:
            found.setdefault(("segment", segment.id), path)
    return found


def _segment_refusal(files: Sequence[Path], refused: SegmentsRefused) -> DefinitionError:
    defined = _where_defined(files)
    lines = []
    for problem in refused.problems:
        if problem.segment is not None:
            path = defined.get(("segment", problem.segment))
        else:
            path = defined.get(("aggregate", problem.aggregate or ""))
        lines.append(f"{path}: {problem}" if path is not None else str(problem))
    return DefinitionError("\n".join(lines))


def check_segment_files(files: Sequence[Path]) -> int:
    """Validate segment files on their own, as one set (nothing is read from Kafka)."""
    problems = check_segments(load_segment_files(files))
    if problems:
        raise _segment_refusal(files, SegmentsRefused(tuple(problems)))
    for path in files:
        print(f"ok  {path}")
    return 0


def publish_segments(settings: CommonSettings, files: Sequence[Path]) -> int:
    """Publish segment files: checked as one set against what is published, then every changed
    aggregate and segment goes to the definitions topic (aggregates first). Unchanged ones are
    not written again."""
    definitions = load_segment_files(files)
    with _following(settings) as followed:
        decision = decide_segments_publish(
            definitions, followed.aggregates(), followed.segments(), SystemClock().now()
        )
    if isinstance(decision, SegmentsRefused):
        raise _segment_refusal(files, decision)
    _produce(settings, decision.records)
    for record in decision.unchanged:
        print(f"unchanged  {_describe(record)}")
    for record in decision.records:
        print(f"published  {_describe(record)}")
    return 0


def delete_segment(settings: CommonSettings, segment_id: str) -> int:
    """Delete a published segment (a tombstone on the definitions topic), unless another
    published segment or a journey that is not archived refers to it."""
    with _following(settings) as followed:
        decision = decide_segment_delete(segment_id, followed.segments(), followed.all())
    if isinstance(decision, SegmentsRefused):
        raise DefinitionError(str(decision))
    _produce(settings, [], tombstones=[decision.key])
    print(f"deleted    segment {segment_id}")
    return 0


def _describe(record: PublishedSegment | PublishedAggregate) -> str:
    if isinstance(record, PublishedSegment):
        return f"segment {record.segment.id}"
    aggregate = record.aggregate
    window = f" over {aggregate.window}" if aggregate.window else ""
    return f"aggregate {aggregate.id} ({aggregate.function} of {aggregate.event}{window})"


def _matching(letters: Iterable[StoredLetter], args: argparse.Namespace) -> list[StoredLetter]:
    """The letters that pass every filter given on the command line."""
    positions = set(args.position or ())
    return [
        stored
        for stored in letters
        if (not args.service or stored.letter.service == args.service)
        and (not args.topic or stored.letter.topic == args.topic)
        and (not args.key or stored.letter.key == args.key)
        and (not args.reason or args.reason in stored.letter.reason)
        and (not positions or stored.position in positions)
    ]


def dead_letters(settings: CommonSettings, args: argparse.Namespace) -> int:
    """`list` prints the letters (one line each, or JSON lines); `replay` writes their records
    back to the topics they came from. Replay needs a filter or `--all`."""
    wait_for_broker(settings.kafka())
    chosen = _matching(read_dead_letters(settings.kafka()), args)
    if args.dead_letter_command == "list":
        for stored in chosen:
            letter = stored.letter
            if args.json:
                print(json.dumps({"position": stored.position, **letter.model_dump(mode="json")}))
            else:
                print(
                    f"{stored.position:>8}  {letter.at:%Y-%m-%d %H:%M:%S}  {letter.service:12} "
                    f"{letter.topic}[{letter.partition}]@{letter.offset}  key={letter.key}  "
                    f"{letter.reason.splitlines()[0][:160] if letter.reason else ''}"
                )
        print(f"{len(chosen)} dead letters", file=sys.stderr)
        return 0
    filtered = any((args.service, args.topic, args.key, args.reason, args.position))
    if not (filtered or args.all):
        print(
            "replay needs a filter (--service, --topic, --key, --reason, --position) or --all",
            file=sys.stderr,
        )
        return 2
    replayed = replay_dead_letters(settings.kafka(), chosen)
    print(f"replayed {replayed} dead letters")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="waypost", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    topics = commands.add_parser("topics", help="Kafka topics from the registry")
    topics.add_argument("action", choices=["create", "list"])
    check = commands.add_parser("check", help="validate journey definition files")
    check.add_argument("files", nargs="+", type=Path)
    pub = commands.add_parser("publish", help="publish journey definition files")
    pub.add_argument("files", nargs="+", type=Path)
    for change, summary in (
        ("pause", "stop entries; running instances hold before their next step"),
        ("resume", "let entries in again; held instances continue"),
        ("archive", "end the journey for good: no entries, running instances end"),
    ):
        status = commands.add_parser(change, help=summary)
        status.add_argument("journey_id")
    segments = commands.add_parser("segments", help="segment and aggregate definitions")
    segment_commands = segments.add_subparsers(dest="segment_command", required=True)
    segment_check = segment_commands.add_parser("check", help="validate segment files")
    segment_check.add_argument("files", nargs="+", type=Path)
    segment_publish = segment_commands.add_parser("publish", help="publish segment files")
    segment_publish.add_argument("files", nargs="+", type=Path)
    segment_delete = segment_commands.add_parser(
        "delete", help="delete a segment nothing published refers to"
    )
    segment_delete.add_argument("segment_id")
    letters = commands.add_parser("dead-letters", help="records no consumer could process")
    letter_commands = letters.add_subparsers(dest="dead_letter_command", required=True)
    for action, summary in (
        ("list", "print the dead letters (position, time, service, source, key, reason)"),
        ("replay", "write the chosen letters' records back to the topics they came from"),
    ):
        letter_command = letter_commands.add_parser(action, help=summary)
        letter_command.add_argument("--service", help="only letters written by this service")
        letter_command.add_argument("--topic", help="only records that came from this topic")
        letter_command.add_argument("--key", help="only records with this key (a contact key)")
        letter_command.add_argument("--reason", help="only letters whose reason contains this")
        letter_command.add_argument(
            "--position", action="append", help="a letter's position, partition:offset (repeat)"
        )
        if action == "list":
            letter_command.add_argument("--json", action="store_true", help="JSON lines")
        else:
            letter_command.add_argument(
                "--all", action="store_true", help="replay every letter (no filter)"
            )
    args = parser.parse_args(argv)

    settings = CommonSettings()
    try:
        if args.command == "topics":
            if args.action == "list":
                for topic in ALL_TOPICS:
                    policy = "compacted " if topic.compacted else ""
                    print(f"{topic.name:32} {policy}{topic.description}")
                return 0
            wait_for_broker(settings.kafka())
            created = ensure_topics(
                settings.kafka(), settings.topic_partitions, settings.topic_replication
            )
            print(f"topics ready ({len(created)} created)")
            return 0
        if args.command == "dead-letters":
            return dead_letters(settings, args)
        if args.command == "check":
            for path in args.files:
                # The shipped templates are rendered against a sample, as publishing does.
                problems = template_problems(load_journey_file(path), {})
                if problems:
                    raise DefinitionError("\n".join(f"{path}: {p}" for p in problems))
                print(f"ok  {path}")
            return 0
        if args.command in ("pause", "resume", "archive"):
            return change_status(settings, args.journey_id, args.command)
        if args.command == "segments":
            if args.segment_command == "check":
                return check_segment_files(args.files)
            if args.segment_command == "publish":
                return publish_segments(settings, args.files)
            return delete_segment(settings, args.segment_id)
        return publish(settings, args.files)
    except DefinitionError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
