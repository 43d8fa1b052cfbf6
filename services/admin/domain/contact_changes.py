"""Tags and traits an operator changes on a contact from the admin: checked here, applied by
the segmenter (the profile's only writer) as contact commands, announced as `Tag Added`,
`Tag Removed` and `Attribute Changed` like a journey's own changes. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.contracts import ContactCommand
from shared.ids import stable_id
from shared.profiles import DEFAULT_LIMITS, trait_size

MAX_CHANGES = 50
MAX_TAG_CHARS = 64


def tag_problem(tag: str) -> str | None:
    """What is wrong with a tag to add or remove, else None."""
    if not tag.strip() or len(tag) > MAX_TAG_CHARS:
        return f"a tag is 1 to {MAX_TAG_CHARS} characters, not only spaces"
    return None


def trait_name_problem(name: str) -> str | None:
    """What is wrong with the name of a trait to set, else None."""
    if not name.strip() or name.startswith("$") or "." in name:
        return f"'{name}': a trait name is not empty and has no '.' or '$'"
    return None


def trait_problem(name: str, value: Any) -> str | None:
    """What is wrong with a trait to set, else None."""
    if (problem := trait_name_problem(name)) is not None:
        return problem
    if trait_size(name, value) > DEFAULT_LIMITS.max_trait_bytes:
        return f"'{name}': at most {DEFAULT_LIMITS.max_trait_bytes} bytes as JSON"
    return None


class ContactChanges(BaseModel):
    """`POST /v1/contacts/{key}/changes`: tags to add and remove, traits to set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    add_tags: tuple[str, ...] = Field(default=(), max_length=MAX_CHANGES)
    remove_tags: tuple[str, ...] = Field(default=(), max_length=MAX_CHANGES)
    set_traits: dict[str, Any] = Field(default_factory=dict, max_length=MAX_CHANGES)

    @field_validator("add_tags", "remove_tags")
    @classmethod
    def _tag_shape(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        for tag in tags:
            if (problem := tag_problem(tag)) is not None:
                raise ValueError(problem)
        return tags

    @field_validator("set_traits")
    @classmethod
    def _trait_shape(cls, traits: dict[str, Any]) -> dict[str, Any]:
        for name, value in traits.items():
            if (problem := trait_problem(name, value)) is not None:
                raise ValueError(problem)
        return traits

    @model_validator(mode="after")
    def _something(self) -> ContactChanges:
        if not (self.add_tags or self.remove_tags or self.set_traits):
            raise ValueError("nothing to change: give add_tags, remove_tags or set_traits")
        if set(self.add_tags) & set(self.remove_tags):
            raise ValueError("a tag is both added and removed")
        return self


def change_commands(
    contact_key: str, changes: ContactChanges, now: datetime, origin: str = "admin-change"
) -> list[ContactCommand]:
    """One command per change, in the order given; ids derive from the change, its origin and
    its time."""

    def command(kind: Any, **fields: Any) -> ContactCommand:
        what = fields.get("tag") or fields.get("attribute")
        return ContactCommand(
            command_id=stable_id(origin, contact_key, kind, what, now.isoformat()),
            contact_key=contact_key,
            kind=kind,
            reason="admin",
            at=now,
            **fields,
        )

    return [
        *(command("add_tag", tag=tag) for tag in dict.fromkeys(changes.add_tags)),
        *(command("remove_tag", tag=tag) for tag in dict.fromkeys(changes.remove_tags)),
        *(
            command("set_attribute", attribute=name, value=value)
            for name, value in changes.set_traits.items()
        ),
    ]
