"""Journey definitions: the published, versioned graph the orchestrator runs.

Definitions are YAML/JSON files validated here. A problem names the journey, the step and the rule,
so a marketer can fix the file without reading code.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from shared.contracts import SCHEMA_VERSION, Channel

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '6d', '2w' (also '1.5h') to a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a duration such as 30s, 15m, 6h, 3d or 2w")
    try:
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        raise ValueError(f"'{text}' is longer than any wait can be") from None


class _Definition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventTrigger(_Definition):
    """Enter when the contact does `event`, optionally only when properties equal given values."""

    type: Literal["event"] = "event"
    event: str = Field(min_length=1)
    where: dict[str, Any] = Field(default_factory=dict)


class EntryRules(_Definition):
    """Who may enter again: `never` (once per contact, ever) or `after_exit`."""

    reentry: Literal["never", "after_exit"] = "never"


class _Step(_Definition):
    id: str
    next: str | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("step ids are lower-case letters, digits, '_' or '-', at most 64")
        return value


class SendStep(_Step):
    """Send one message on one channel with a template."""

    type: Literal["send"]
    channel: Channel = "email"
    template: str


class WaitStep(_Step):
    """Wait a fixed duration (a durable timer)."""

    type: Literal["wait"]
    duration: str

    @field_validator("duration")
    @classmethod
    def _duration_shape(cls, value: str) -> str:
        if parse_duration(value) <= timedelta(0):
            raise ValueError("a wait must be longer than zero")
        return value

    @property
    def delta(self) -> timedelta:
        return parse_duration(self.duration)


class ExitStep(_Step):
    """End the instance."""

    type: Literal["exit"]


Step = Annotated[SendStep | WaitStep | ExitStep, Field(discriminator="type")]


class TemplateDefinition(_Definition):
    """A channel template shipped with a journey file (Jinja2, rendered in a sandbox)."""

    channel: Channel = "email"
    subject: str | None = None
    text: str
    html: str | None = None


class Journey(_Definition):
    """A journey version: trigger, entry rules and the step graph (the first step is the start)."""

    id: str
    name: str
    version: int = Field(default=1, ge=1)
    description: str = ""
    trigger: EventTrigger
    entry: EntryRules = EntryRules()
    transactional: bool = False
    steps: tuple[Step, ...] = Field(min_length=1)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("journey ids are lower-case letters, digits, '_' or '-', at most 64")
        return value

    def step(self, step_id: str) -> SendStep | WaitStep | ExitStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def next_of(self, step_id: str) -> str | None:
        """The explicit `next`, else the following step in the list, else None (the end)."""
        ids = [s.id for s in self.steps]
        index = ids.index(step_id)
        step = self.steps[index]
        if step.next is not None:
            return step.next
        return ids[index + 1] if index + 1 < len(ids) else None


class JourneyFile(_Definition):
    """What a definition file holds: one journey and the templates it ships with."""

    journey: Journey
    templates: dict[str, TemplateDefinition] = Field(default_factory=dict)


class PublishedJourney(BaseModel):
    """The value on `waypost.definitions.v1` for key `journey:<id>:<version>`."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["journey"] = "journey"
    status: Literal["active", "paused", "archived"] = "active"
    journey: Journey
    published_at: AwareDatetime

    @property
    def key(self) -> str:
        return definition_key(self.journey.id, self.journey.version)


def definition_key(journey_id: str, version: int) -> str:
    return f"journey:{journey_id}:{version}"


class DefinitionProblem(BaseModel):
    """One thing wrong with a definition, naming where and which rule."""

    model_config = ConfigDict(frozen=True)

    journey: str
    step: str | None
    rule: str
    message: str

    def __str__(self) -> str:
        where = f"journey '{self.journey}'" + (f", step '{self.step}'" if self.step else "")
        return f"{where}: {self.message} [{self.rule}]"


def check_journey(
    journey_file: JourneyFile, known_templates: Collection[str] = ()
) -> list[DefinitionProblem]:
    """Graph and reference rules that a single field cannot check on its own."""
    journey = journey_file.journey
    problems: list[DefinitionProblem] = []

    def problem(step: str | None, rule: str, message: str) -> None:
        problems.append(
            DefinitionProblem(journey=journey.id, step=step, rule=rule, message=message)
        )

    ids = [s.id for s in journey.steps]
    seen: set[str] = set()
    for step_id in ids:
        if step_id in seen:
            problem(step_id, "unique-step-ids", "two steps share this id")
        seen.add(step_id)
    for step in journey.steps:
        if step.next is not None and step.next not in seen:
            problem(step.id, "next-exists", f"'next' names unknown step '{step.next}'")
        if isinstance(step, ExitStep) and step.next is not None:
            problem(step.id, "exit-is-final", "an exit step cannot have 'next'")
        if isinstance(step, SendStep):
            template = journey_file.templates.get(step.template)
            if template is None and step.template not in known_templates:
                problem(step.id, "template-exists", f"template '{step.template}' is not defined")
            elif template is not None and template.channel != step.channel:
                problem(
                    step.id,
                    "template-channel",
                    f"template '{step.template}' is for {template.channel}, not {step.channel}",
                )
    if problems:
        return problems

    reachable: set[str] = set()
    frontier = [ids[0]]
    while frontier:
        current = frontier.pop()
        if current in reachable:
            continue
        reachable.add(current)
        if isinstance(journey.step(current), ExitStep):
            continue
        following = journey.next_of(current)
        if following is not None:
            frontier.append(following)
    for step_id in ids:
        if step_id not in reachable:
            problem(step_id, "reachable", "no path from the first step reaches this step")
    looping = _step_in_loop_without_wait(journey)
    if looping is not None:
        problem(looping, "bounded-loops", "this step is in a loop with no wait in it")
    return problems


def _step_in_loop_without_wait(journey: Journey) -> str | None:
    """A step on a loop that never waits (the loop would spin), or None."""
    for start in journey.steps:
        current: str | None = start.id
        visited: set[str] = set()
        while current is not None and current not in visited:
            step = journey.step(current)
            if isinstance(step, WaitStep | ExitStep):
                break
            visited.add(current)
            current = journey.next_of(current)
        else:
            if current is not None:
                return current
    return None
