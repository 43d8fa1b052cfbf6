"""The journey lifecycle: draft → published (immutable versions) → paused ⇄ active → archived,
and the readiness of the templates a journey uses.

Pure rules shared by the `waypost` CLI and the admin API: they load, call these, then write.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from shared.journey_checks import DefinitionProblem, parse_journey_file
from shared.journeys import (
    JourneyFile,
    JourneyStatus,
    PublishedJourney,
    SendStep,
    TemplateDefinition,
    TemplateStatus,
)
from shared.template_checks import template_problems

StatusChange = Literal["pause", "resume", "archive"]

# For each change: the statuses it may start from, and where it leads. Archived is final.
TRANSITIONS: dict[StatusChange, tuple[frozenset[JourneyStatus], JourneyStatus]] = {
    "pause": (frozenset({"active"}), "paused"),
    "resume": (frozenset({"paused"}), "active"),
    "archive": (frozenset({"active", "paused"}), "archived"),
}


@dataclass(frozen=True)
class Refused:
    """The action is not allowed; every reason, each naming the journey, step and rule."""

    problems: tuple[DefinitionProblem, ...]

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)

    def rules(self) -> set[str]:
        return {p.rule for p in self.problems}


@dataclass(frozen=True)
class Publish:
    """Write `templates` to the store as ready, then `record` to the definitions topic."""

    record: PublishedJourney
    templates: Mapping[str, TemplateDefinition] = field(default_factory=dict)


@dataclass(frozen=True)
class Unchanged:
    """The same version with the same content is already published: nothing to write but
    `templates`, the ready templates the file ships that the store has lost (a store rebuilt
    from scratch while the broker kept the definitions)."""

    record: PublishedJourney
    templates: Mapping[str, TemplateDefinition] = field(default_factory=dict)


PublishDecision = Publish | Unchanged | Refused


def validate_draft(
    raw: Any, known_templates: Collection[str] = (), journey_id: str | None = None
) -> tuple[JourneyFile | None, list[DefinitionProblem]]:
    """Check a draft definition file; `journey_id`, when given, is the id it must carry."""
    parsed, problems = parse_journey_file(raw, known_templates)
    if journey_id is not None and isinstance(raw, dict) and isinstance(raw.get("journey"), dict):
        given = raw["journey"].get("id")
        if given != journey_id:
            problems = [
                *problems,
                DefinitionProblem(
                    journey=journey_id,
                    step=None,
                    rule="journey-id",
                    message=f"journey.id: is {given!r}, but the draft is for '{journey_id}'",
                ),
            ]
            parsed = None
    return parsed, problems


def versions_of(journey_id: str, published: Iterable[PublishedJourney]) -> list[PublishedJourney]:
    """The published versions of one journey, oldest first."""
    return sorted(
        (p for p in published if p.journey.id == journey_id), key=lambda p: p.journey.version
    )


def templates_used(journey_file: JourneyFile) -> set[str]:
    """Every template id a send step of the journey names."""
    return {
        choice.template
        for step in journey_file.journey.steps
        if isinstance(step, SendStep)
        for choice in step.choices
    }


def template_readiness(
    journey_file: JourneyFile, stored: Mapping[str, TemplateStatus]
) -> list[DefinitionProblem]:
    """A problem for every send step whose template is missing or still a draft.

    A template shipped in the file is judged by its `status` there; any other by the store's.
    """
    journey = journey_file.journey
    problems = []
    for step in journey.steps:
        if not isinstance(step, SendStep):
            continue
        for choice in step.choices:
            shipped = journey_file.templates.get(choice.template)
            status = shipped.status if shipped is not None else stored.get(choice.template)
            if status == "ready":
                continue
            message = (
                f"template '{choice.template}' does not exist"
                if status is None
                else f"template '{choice.template}' is a draft: mark it ready before publishing"
            )
            problems.append(
                DefinitionProblem(
                    journey=journey.id, step=step.id, rule="template-ready", message=message
                )
            )
    return problems


def decide_publish(
    journey_file: JourneyFile,
    published: Iterable[PublishedJourney],
    stored_templates: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> PublishDecision:
    """Publish a validated definition as a new, immutable version, or say why not.

    `stored_templates` are the stored documents of the templates the journey uses. Versions
    are explicit: a new one must be greater than every published version of the journey (no
    number is assigned). Re-publishing a version with the same content only puts back the
    shipped templates the store lost; with other content it is refused. A new version keeps
    the journey's status (a paused journey stays paused until resumed); an archived journey
    takes no new versions. Every template the journey uses must be ready and render, against
    a sample of the trigger and profile, without an undefined variable.
    """
    journey = journey_file.journey
    versions = versions_of(journey.id, published)
    same = next((p for p in versions if p.journey.version == journey.version), None)
    if same is not None and same.journey == journey:
        missing = {
            tid: t
            for tid, t in journey_file.templates.items()
            if t.status == "ready" and tid not in stored_templates
        }
        return Unchanged(same, missing)

    def problem(rule: str, message: str) -> DefinitionProblem:
        return DefinitionProblem(journey=journey.id, step=None, rule=rule, message=message)

    problems: list[DefinitionProblem] = []
    newest = versions[-1] if versions else None
    if newest is not None and newest.status == "archived":
        problems.append(
            problem(
                "archived-is-final",
                "the journey is archived and takes no new versions: publish it under a new id",
            )
        )
    if same is not None:
        problems.append(
            problem(
                "version-immutable",
                f"version {journey.version} is already published with other content; "
                "published versions are immutable: raise `version`",
            )
        )
    elif newest is not None and journey.version < newest.journey.version:
        problems.append(
            problem(
                "version-newer",
                f"version {journey.version} is older than published version "
                f"{newest.journey.version}: use `version: {newest.journey.version + 1}`",
            )
        )
    statuses = {tid: template_status(document) for tid, document in stored_templates.items()}
    problems.extend(template_readiness(journey_file, statuses))
    problems.extend(template_problems(journey_file, stored_templates))
    if problems:
        return Refused(tuple(problems))
    status: JourneyStatus = newest.status if newest is not None else "active"
    record = PublishedJourney(journey=journey, status=status, published_at=now)
    shipped = {tid: t for tid, t in journey_file.templates.items() if t.status == "ready"}
    return Publish(record, shipped)


def decide_status_change(
    journey_id: str, published: Iterable[PublishedJourney], change: StatusChange
) -> PublishedJourney | Refused:
    """The newest version's record with its new status, or why the change is not allowed.

    The newest version's status is the journey's status (the orchestrator reads it so).
    """
    versions = versions_of(journey_id, published)
    if not versions:
        return Refused(
            (
                DefinitionProblem(
                    journey=journey_id,
                    step=None,
                    rule="journey-published",
                    message="no version of this journey is published",
                ),
            )
        )
    newest = versions[-1]
    allowed_from, target = TRANSITIONS[change]
    if newest.status not in allowed_from:
        why = "archived is final" if newest.status == "archived" else f"it is {newest.status}"
        return Refused(
            (
                DefinitionProblem(
                    journey=journey_id,
                    step=None,
                    rule="status-transition",
                    message=(
                        f"cannot {change} version {newest.journey.version}: {why} "
                        f"({change} applies to {' or '.join(sorted(allowed_from))} journeys)"
                    ),
                ),
            )
        )
    return newest.model_copy(update={"status": target})


# --- templates in the document store (`templates`, read by the dispatcher by `_id`) ---------


def template_status(document: Mapping[str, Any]) -> TemplateStatus:
    """A stored template is ready when its content is ready and no edit of it is pending."""
    return "ready" if document.get("status") == "ready" and not document.get("draft") else "draft"


def shipped_template_document(template: TemplateDefinition, now: datetime) -> dict[str, Any]:
    """The stored form of a template a published file ships: ready, replacing any pending edit."""
    return {
        **template.model_dump(exclude={"status"}),
        "status": "ready",
        "updated_at": now,
        "ready_at": now,
    }
