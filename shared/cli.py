"""The `waypost` command: create topics, check and publish journey definition files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer
from pymongo import MongoClient

from shared.clock import SystemClock
from shared.definitions import PublishedJourneys
from shared.journey_checks import parse_journey_file
from shared.journeys import JourneyFile, PublishedJourney, definition_key
from shared.kafka import ensure_topics, wait_for_broker
from shared.settings import CommonSettings
from shared.topics import ALL_TOPICS, DEFINITIONS


class DefinitionError(Exception):
    """A definition file that cannot be published, with every problem found."""


def load_journey_file(path: Path, known_templates: Collection[str] = ()) -> JourneyFile:
    """Parse and validate a YAML or JSON definition file; raise with every problem named."""
    try:
        raw: Any = (
            json.loads(path.read_text())
            if path.suffix == ".json"
            else yaml.safe_load(path.read_text())
        )
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise DefinitionError(f"{path}: cannot read: {exc}") from exc
    parsed, problems = parse_journey_file(raw, known_templates)
    if parsed is None:
        raise DefinitionError("\n".join(f"{path}: {p}" for p in problems))
    return parsed


def publish(settings: CommonSettings, files: list[Path]) -> int:
    """Write templates to the document store, then the journey versions to the definitions topic."""
    parsed = [load_journey_file(path) for path in files]
    wait_for_broker(settings.kafka_bootstrap)
    ensure_topics(settings.kafka_bootstrap, settings.topic_partitions, settings.topic_replication)
    followed = PublishedJourneys(settings.kafka_bootstrap)
    followed.start(timeout=60)
    existing = {p.key: p for p in followed.all()}
    followed.stop()

    now = SystemClock().now()
    mongo: MongoClient[dict[str, Any]] = MongoClient(settings.mongo_url, tz_aware=True)
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    try:
        templates = mongo[settings.mongo_db]["templates"]
        for journey_file in parsed:
            journey = journey_file.journey
            key = definition_key(journey.id, journey.version)
            if key in existing:
                if existing[key].journey != journey:
                    raise DefinitionError(
                        f"journey '{journey.id}' version {journey.version} is already published "
                        "and published versions are immutable: raise `version` to change it"
                    )
                print(f"unchanged  {journey.id} v{journey.version}")
                continue
            for template_id, template in journey_file.templates.items():
                templates.replace_one(
                    {"_id": template_id},
                    {**template.model_dump(), "status": "ready", "updated_at": now},
                    upsert=True,
                )
            record = PublishedJourney(journey=journey, published_at=now)
            producer.produce(
                DEFINITIONS.name, key=key.encode(), value=record.model_dump_json().encode()
            )
            print(f"published  {journey.id} v{journey.version} ({len(journey.steps)} steps)")
        if producer.flush(30) != 0:
            raise TimeoutError("definitions were not acknowledged by Kafka")
    finally:
        mongo.close()
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
    args = parser.parse_args(argv)

    settings = CommonSettings()
    try:
        if args.command == "topics":
            if args.action == "list":
                for topic in ALL_TOPICS:
                    policy = "compacted " if topic.compacted else ""
                    print(f"{topic.name:32} {policy}{topic.description}")
                return 0
            wait_for_broker(settings.kafka_bootstrap)
            created = ensure_topics(
                settings.kafka_bootstrap, settings.topic_partitions, settings.topic_replication
            )
            print(f"topics ready ({len(created)} created)")
            return 0
        if args.command == "check":
            for path in args.files:
                load_journey_file(path)
                print(f"ok  {path}")
            return 0
        return publish(settings, args.files)
    except DefinitionError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
