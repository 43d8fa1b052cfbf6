"""Segment and aggregate checks: roots, references, cycles, duplicates and file shape, the
publish and delete decisions, and the example files; every problem names its segment or
aggregate and the rule."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.cli import load_journey_file
from shared.conditions import condition_from
from shared.journeys import JourneyStatus, PublishedJourney
from shared.segment_checks import (
    SegmentFileProblems,
    SegmentProblem,
    SegmentsPublish,
    SegmentsRefused,
    aggregates_read,
    check_segments,
    decide_segment_delete,
    decide_segments_publish,
    parse_segment_file,
    segment_file_from,
    segments_named,
    segments_read,
)
from shared.segments import (
    AggregateDefinition,
    PublishedAggregate,
    PublishedSegment,
    SegmentDefinition,
    SegmentFile,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

VIEWS = {"id": "views", "event": "Product Viewed", "window": "7d"}


def segment(segment_id: str, condition: dict[str, Any]) -> dict[str, Any]:
    return {"id": segment_id, "condition": condition}


def file_of(
    *segments: dict[str, Any], aggregates: tuple[dict[str, Any], ...] = (VIEWS,)
) -> SegmentFile:
    parsed, problems = segment_file_from({"aggregates": list(aggregates), "segments": segments})
    assert parsed is not None, problems
    return parsed


def where(found: list[SegmentProblem]) -> list[tuple[str | None, str | None, str]]:
    return [(p.segment, p.aggregate, p.rule) for p in found]


# --- what a condition reads -------------------------------------------------------------------


def test_aggregates_read_names_each_aggregate_id_once() -> None:
    condition = condition_from(
        {
            "all": [
                {"field": "aggregates.views", "op": "gte", "value": 2},
                {"not": {"field": "aggregates.orders.count", "op": "gt", "value": 0}},
                {"field": "traits.limit", "op": "lt", "value_from": "aggregates.views"},
                {"field": "aggregates", "op": "exists"},
            ]
        }
    )
    assert aggregates_read(condition) == {"views", "orders"}


def test_segments_read_names_membership_tests_only() -> None:
    condition = condition_from(
        {
            "any": [
                {"segment": "vip"},
                {"not": {"field": "segments", "op": "contains", "value": "churned"}},
                {"field": "segments", "op": "not_contains", "value": "blocked"},
                {"field": "tags", "op": "contains", "value": "not-a-segment"},
            ]
        }
    )
    assert segments_read(condition) == {"vip", "churned", "blocked"}


# --- rules ------------------------------------------------------------------------------------


def test_a_valid_file_has_no_problems() -> None:
    found = check_segments(
        file_of(
            segment("busy", {"field": "aggregates.views", "op": "gte", "value": 3}),
            segment("busy-vip", {"all": [{"segment": "busy"}, {"tag": "vip"}]}),
        )
    )
    assert found == []


@pytest.mark.parametrize(
    "path", ["event.properties.plan", "context.trigger.plan", "event.name"], ids=str
)
def test_a_segment_reads_no_event_and_no_context(path: str) -> None:
    found = check_segments(file_of(segment("s", {"field": path, "op": "exists"})))
    assert where(found) == [("s", None, "segment-roots")]
    assert path in found[0].message


def test_a_segment_compared_with_an_event_field_is_refused_too() -> None:
    condition = {"field": "traits.plan", "op": "eq", "value_from": "event.properties.plan"}
    found = check_segments(file_of(segment("s", condition)))
    assert where(found) == [("s", None, "segment-roots")]


@pytest.mark.parametrize(
    "path",
    [
        "traits.plan",
        "tags",
        "consent.email",
        "aggregates.views",
        "contact.last_seen",
        "segments",
    ],
)
def test_a_segment_reads_the_contact(path: str) -> None:
    condition = {"segment": "other"} if path == "segments" else {"field": path, "op": "exists"}
    found = check_segments(file_of(segment("s", condition), segment("other", {"tag": "t"})))
    assert found == []


def test_an_aggregate_where_reads_only_the_event() -> None:
    aggregate = {
        "id": "pro_views",
        "event": "Product Viewed",
        "where": {"field": "traits.plan", "op": "eq", "value": "pro"},
    }
    found = check_segments(file_of(aggregates=(aggregate,)))
    assert where(found) == [(None, "pro_views", "aggregate-roots")]
    assert "traits.plan" in str(found[0])


def test_the_where_shorthand_reads_event_properties() -> None:
    aggregate = {"id": "forms", "event": "Form Submitted", "where": {"form": "waitlist"}}
    assert check_segments(file_of(aggregates=(aggregate,))) == []


def test_an_unknown_aggregate_is_named() -> None:
    found = check_segments(
        file_of(segment("s", {"field": "aggregates.orders_7d", "op": "gt", "value": 0}))
    )
    assert where(found) == [("s", None, "unknown-aggregate")]
    assert "orders_7d" in found[0].message


def test_a_published_aggregate_is_known() -> None:
    definitions = file_of(segment("s", {"field": "aggregates.orders_7d", "op": "gt", "value": 0}))
    assert check_segments(definitions, known_aggregates={"orders_7d"}) == []


def test_an_unknown_segment_is_named_and_a_published_one_is_known() -> None:
    definitions = file_of(
        segment(
            "s",
            {"all": [{"segment": "vip"}, {"field": "segments", "op": "contains", "value": "new"}]},
        )
    )
    found = check_segments(definitions, known_segments={"new"})
    assert where(found) == [("s", None, "unknown-segment")]
    assert "'vip'" in found[0].message
    assert check_segments(definitions, known_segments={"new", "vip"}) == []


def test_reading_segments_without_naming_one_is_refused() -> None:
    found = check_segments(
        file_of(segment("s", {"field": "segments", "op": "eq", "value": ["a", "b"]}))
    )
    assert where(found) == [("s", None, "segment-reference")]


def test_a_cycle_is_named_with_its_members() -> None:
    found = check_segments(
        file_of(
            segment("a", {"segment": "b"}),
            segment("b", {"any": [{"segment": "c"}, {"tag": "x"}]}),
            segment("c", {"not": {"segment": "a"}}),
        )
    )
    assert where(found) == [("a", None, "segment-cycle")]
    assert found[0].message.endswith("a -> b -> c -> a")


def test_a_segment_that_reads_itself_is_a_cycle() -> None:
    found = check_segments(file_of(segment("a", {"any": [{"tag": "x"}, {"segment": "a"}]})))
    assert where(found) == [("a", None, "segment-cycle")]
    assert found[0].message.endswith("a -> a")


def test_a_cycle_through_a_published_segment_is_found() -> None:
    published = {"b": SegmentDefinition(id="b", condition=condition_from({"segment": "a"}))}
    found = check_segments(file_of(segment("a", {"segment": "b"})), known_segments=published)
    assert where(found) == [("a", None, "segment-cycle")]
    assert found[0].message.endswith("a -> b -> a")


def test_a_new_definition_replaces_the_published_one_in_the_cycle_check() -> None:
    published = {"b": SegmentDefinition(id="b", condition=condition_from({"segment": "a"}))}
    definitions = file_of(segment("a", {"segment": "b"}), segment("b", {"tag": "x"}))
    assert check_segments(definitions, known_segments=published) == []


def test_duplicate_ids_are_named() -> None:
    found = check_segments(
        file_of(
            segment("s", {"tag": "a"}),
            segment("s", {"tag": "b"}),
            aggregates=(VIEWS, {**VIEWS, "window": "30d"}),
        )
    )
    assert where(found) == [(None, "views", "duplicate-id"), ("s", None, "duplicate-id")]


def test_definitions_may_be_given_as_a_list() -> None:
    definitions: list[AggregateDefinition | SegmentDefinition] = [
        AggregateDefinition(id="views", event="Product Viewed"),
        SegmentDefinition(
            id="s", condition=condition_from({"field": "aggregates.views", "op": "gt", "value": 1})
        ),
    ]
    assert check_segments(definitions) == []


# --- file shape -------------------------------------------------------------------------------


def test_shape_problems_name_the_segment_and_the_field() -> None:
    parsed, found = segment_file_from(
        {
            "aggregates": [{"id": "total", "event": "Order Completed", "function": "sum"}],
            "segments": [
                {"id": "s", "condition": {"field": "aggregates.total", "op": "gt"}},
                {"id": "t", "condition": {"nonsense": 1}},
                {"condition": {"tag": "x"}},
            ],
        }
    )
    assert parsed is None
    assert where(found) == [
        (None, "total", "value_error"),
        ("s", None, "value_error"),
        ("t", None, "condition-shape"),
        ("#3", None, "missing"),
    ]
    assert "needs `property`" in found[0].message
    assert found[1].message.startswith("segments.0.condition:")


def test_a_file_without_definitions_is_refused() -> None:
    parsed, found = segment_file_from({"journey": {}})
    assert parsed is None
    assert [p.rule for p in found] == ["file-shape"]


def test_a_file_is_read_from_yaml_or_json(tmp_path: Path) -> None:
    as_yaml = tmp_path / "s.yaml"
    as_yaml.write_text("segments:\n  - {id: s, condition: {tag: vip}}\n")
    as_json = tmp_path / "s.json"
    as_json.write_text('{"segments": [{"id": "s", "condition": {"tag": "vip"}}]}')
    assert parse_segment_file(as_yaml) == parse_segment_file(as_json)
    broken = tmp_path / "broken.yaml"
    broken.write_text("segments: [")
    with pytest.raises(SegmentFileProblems) as raised:
        parse_segment_file(broken)
    assert [p.rule for p in raised.value.problems] == ["file-read"]
    assert str(broken) in str(raised.value)


# --- publish and delete -----------------------------------------------------------------------


def published_segment(segment_id: str, condition: dict[str, Any]) -> PublishedSegment:
    definition = SegmentDefinition(id=segment_id, condition=condition_from(condition))
    return PublishedSegment(segment=definition, published_at=NOW)


def published_aggregate(**fields: Any) -> PublishedAggregate:
    return PublishedAggregate(aggregate=AggregateDefinition(**fields), published_at=NOW)


def test_publishing_writes_what_changed_aggregates_first() -> None:
    views = published_aggregate(**VIEWS)
    old = published_segment("busy", {"field": "aggregates.views", "op": "gte", "value": 3})
    definitions = file_of(
        segment("busy", {"field": "aggregates.views", "op": "gte", "value": 3}),
        segment("new", {"field": "aggregates.orders", "op": "gt", "value": 0}),
        aggregates=(VIEWS, {"id": "orders", "event": "Order Completed"}),
    )
    later = datetime(2026, 3, 2, tzinfo=UTC)
    decision = decide_segments_publish(definitions, [views], [old], later)
    assert isinstance(decision, SegmentsPublish)
    assert [r.key for r in decision.records] == ["aggregate:orders", "segment:new"]
    assert all(r.published_at == later for r in decision.records)
    assert decision.unchanged == (views, old)


def test_a_changed_name_or_condition_is_published_again() -> None:
    old = published_segment("busy", {"tag": "a"})
    renamed = SegmentFile(
        segments=(old.segment.model_copy(update={"name": "Busy bees"}),),
    )
    decision = decide_segments_publish(renamed, [], [old], NOW)
    assert isinstance(decision, SegmentsPublish)
    assert [r.key for r in decision.records] == ["segment:busy"]


def test_publishing_is_refused_as_a_whole_against_what_is_published() -> None:
    published = [published_segment("b", {"segment": "a"})]
    definitions = file_of(
        segment("a", {"segment": "b"}),
        segment("c", {"field": "aggregates.orders", "op": "gt", "value": 0}),
    )
    decision = decide_segments_publish(definitions, [], published, NOW)
    assert isinstance(decision, SegmentsRefused)
    assert {(p.segment, p.rule) for p in decision.problems} == {
        ("a", "segment-cycle"),
        ("c", "unknown-aggregate"),
    }


def journey_record(
    journey_id: str,
    trigger: dict[str, Any],
    *,
    version: int = 1,
    status: JourneyStatus = "active",
    steps: list[dict[str, Any]] | None = None,
) -> PublishedJourney:
    journey = {
        "id": journey_id,
        "name": journey_id,
        "version": version,
        "trigger": trigger,
        "steps": steps or [{"id": "done", "type": "exit"}],
    }
    return PublishedJourney.model_validate(
        {"journey": journey, "status": status, "published_at": NOW}
    )


def test_a_segment_nothing_refers_to_is_deleted() -> None:
    target = published_segment("lonely", {"tag": "x"})
    others = [target, published_segment("other", {"tag": "y"})]
    journeys = [journey_record("j", {"type": "segment", "segment": "other"})]
    assert decide_segment_delete("lonely", others, journeys) == target


def test_an_unpublished_segment_cannot_be_deleted() -> None:
    decision = decide_segment_delete("ghost", [], [])
    assert isinstance(decision, SegmentsRefused)
    assert where(list(decision.problems)) == [("ghost", None, "segment-published")]


def test_a_segment_in_use_is_not_deleted_and_every_user_is_named() -> None:
    target = published_segment("vip", {"tag": "vip"})
    reader = published_segment("vip-pl", {"all": [{"segment": "vip"}, {"tag": "pl"}]})
    branch = {
        "id": "check",
        "type": "branch",
        "arms": [{"if": {"field": "segments", "op": "contains", "value": "vip"}, "next": "done"}],
    }
    journeys = [
        journey_record("by-trigger", {"type": "segment", "segment": "vip", "on": "left"}),
        journey_record(
            "by-audience",
            {"type": "audience", "segments": ["x", "vip"], "start_at": NOW.isoformat()},
            status="paused",
        ),
        journey_record(
            "by-branch",
            {"type": "event", "event": "Signed Up"},
            steps=[branch, {"id": "done", "type": "exit"}],
        ),
        journey_record("by-condition", {"event": "E", "condition": {"segment": "vip"}}),
        journey_record("finished", {"type": "segment", "segment": "vip"}, status="archived"),
    ]
    decision = decide_segment_delete("vip", [target, reader], journeys)
    assert isinstance(decision, SegmentsRefused)
    assert {p.rule for p in decision.problems} == {"segment-in-use"}
    messages = " ".join(p.message for p in decision.problems)
    for user in ("vip-pl", "by-trigger", "by-audience", "by-branch", "by-condition"):
        assert f"'{user}'" in messages
    assert "finished" not in messages
    assert "(paused)" in messages


def test_an_older_version_that_refers_to_it_keeps_a_segment_in_use() -> None:
    target = published_segment("vip", {"tag": "vip"})
    journeys = [
        journey_record("j", {"type": "segment", "segment": "vip"}, version=1),
        journey_record("j", {"type": "event", "event": "E"}, version=2),
    ]
    decision = decide_segment_delete("vip", [target], journeys)
    assert isinstance(decision, SegmentsRefused)
    assert "version(s) 1:" in decision.problems[0].message


def test_archiving_the_newest_version_frees_the_segment() -> None:
    target = published_segment("vip", {"tag": "vip"})
    journeys = [
        journey_record("j", {"type": "segment", "segment": "vip"}, version=1),
        journey_record("j", {"type": "segment", "segment": "vip"}, version=2, status="archived"),
    ]
    assert decide_segment_delete("vip", [target], journeys) == target


# --- the example files ------------------------------------------------------------------------

SEGMENT_FILES = sorted((ROOT / "examples" / "segments").glob("*.yaml"))
JOURNEY_FILES = sorted((ROOT / "examples" / "journeys").glob("*.yaml"))


def example_definitions() -> SegmentFile:
    files = [parse_segment_file(path) for path in SEGMENT_FILES]
    return SegmentFile(
        aggregates=tuple(a for f in files for a in f.aggregates),
        segments=tuple(s for f in files for s in f.segments),
    )


@pytest.mark.parametrize("path", SEGMENT_FILES, ids=lambda p: p.name)
def test_every_example_file_passes_on_its_own(path: Path) -> None:
    assert check_segments(parse_segment_file(path)) == []


def test_the_example_files_pass_together() -> None:
    assert check_segments(example_definitions()) == []


def test_every_segment_an_example_journey_names_is_an_example() -> None:
    defined = {s.id for s in example_definitions().segments}
    named: dict[str, set[str]] = {}
    for path in JOURNEY_FILES:
        record = PublishedJourney(journey=load_journey_file(path).journey, published_at=NOW)
        for segment_id in segments_named(record):
            named.setdefault(segment_id, set()).add(path.name)
    assert named, "the example journeys name segments"
    missing = {
        segment_id: files for segment_id, files in named.items() if segment_id not in defined
    }
    assert missing == {}


def test_the_s11_and_s09_examples_define_what_their_journeys_describe() -> None:
    definitions = example_definitions()
    aggregates = {a.id: a for a in definitions.aggregates}
    segments = {s.id: s for s in definitions.segments}
    assert aggregates["product_views_7d"].window == "7d"
    assert aggregates["lifetime_value"].function == "sum"
    assert aggregates["lifetime_value"].prop == "total"
    assert aggregates["last_order_at"].function == "last_at"
    assert aggregates_read(segments["high-intent"].condition) == {
        "product_views_7d",
        "orders_7d",
        "lifetime_value",
    }
    assert aggregates_read(segments["churn-risk"].condition) == {"orders_total", "last_order_at"}
