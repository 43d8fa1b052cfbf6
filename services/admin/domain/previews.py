"""A template's preview and test send (pure): the variables a contact and a sample trigger
event give a template, each field rendered by the dispatcher's renderer (`shared.rendering`),
and the send request of a test to a marketer's own address."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts import Channel, Profile, SendRequest, TestSend
from shared.ids import stable_id
from shared.journeys import JourneyFile
from shared.rendering import (
    EMAIL_RENDER_LIMIT,
    FIELD_RENDER_LIMIT,
    TEMPLATE_VARIABLES,
    RenderError,
    TemplateSyntax,
    UndefinedVariable,
    render_text,
    template_variables,
)
from shared.template_checks import (
    sample_variables,
    template_sources,
    undefined_message,
    undefined_path,
)

# What a test send is filed under in the ledger and the delivery funnels.
TEST_JOURNEY = "test-send"
# Test sends go where an address can be typed: an inbox, a phone.
TESTABLE: tuple[Channel, ...] = ("email", "sms")
_PHONE = re.compile(r"^\+?[0-9][0-9 ()-]{4,30}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")


class SampleEvent(BaseModel):
    """The trigger event a preview imagines, in the shape events are posted (`event`,
    `properties`, `traits`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: str = Field(default="Preview", min_length=1, max_length=200)
    type: Literal["track", "identify", "page", "screen", "alias", "group"] = "track"
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)


class PreviewContent(BaseModel):
    """A template's content as the editor holds it, valid or not: the preview says what is
    wrong with each field instead of refusing the whole."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: Channel = "email"
    subject: str | None = Field(default=None, max_length=2_000)
    text: str = Field(default="", max_length=200_000)
    html: str | None = Field(default=None, max_length=1_000_000)
    url: str | None = Field(default=None, max_length=4_000)
    image_url: str | None = Field(default=None, max_length=4_000)
    wechat_template_id: str | None = Field(default=None, max_length=200)
    data: dict[str, str] | None = None


def empty_profile(contact_key: str, now: datetime) -> Profile:
    """A contact with nothing known: what a preview renders for when no contact is chosen."""
    return Profile(contact_key=contact_key, first_seen=now, last_seen=now, updated_at=now)


def preview_variables(profile: Profile, event: SampleEvent | None, now: datetime) -> dict[str, Any]:
    """The variables of a send to `profile` by a journey this event entered it into, as the
    dispatcher builds them (`template_variables`), for the journey `test-send` version 1."""
    return template_variables(profile, preview_context(event, now), TEST_JOURNEY, 1)


def preview_context(event: SampleEvent | None, now: datetime) -> dict[str, Any]:
    """An instance context entered by `event` (as `shared.conditions.event_facts` keeps it)."""
    sample = event or SampleEvent()
    trigger = {
        "name": sample.event,
        "type": sample.type,
        "message_id": stable_id("preview", sample.model_dump_json()),
        "timestamp": now.isoformat(),
        "properties": dict(sample.properties),
        "traits": dict(sample.traits),
    }
    return {"trigger": trigger, "entered_at": now.isoformat()}


def render_fields(content: Mapping[str, Any], variables: dict[str, Any]) -> list[dict[str, Any]]:
    """Every field the channel renders, rendered: `{"field", "output"}`, or `{"field",
    "error"}`. A name no template can read is worded as the publish check words it
    (`shared.template_checks`); a name this contact or event lacks says so, since publishing
    accepts it and the send would be skipped only for such a contact."""
    email = content.get("channel", "email") == "email"
    limit = EMAIL_RENDER_LIMIT if email else FIELD_RENDER_LIMIT
    shape = _shape(content.get("channel") or "email")
    fields: list[dict[str, Any]] = []
    for field, source, html in template_sources(content):
        try:
            fields.append(
                {"field": field, "output": render_text(source, variables, html=html, limit=limit)}
            )
        except UndefinedVariable as exc:
            fields.append({"field": field, "error": _undefined(source, variables, shape, exc)})
        except TemplateSyntax as exc:
            fields.append({"field": field, "error": f"not a valid template: {exc}"})
        except RenderError as exc:
            fields.append({"field": field, "error": str(exc)})
    return fields


def _shape(channel: str) -> dict[str, Any]:
    """The variables as publishing samples them: every name a template can read."""
    journey = {
        "id": TEST_JOURNEY,
        "name": "Test send",
        "trigger": {"type": "event", "event": "Preview"},
        "steps": [{"id": TEST_JOURNEY, "type": "send", "channel": channel, "template": "t"}],
    }
    return sample_variables(JourneyFile.model_validate({"journey": journey}))


def _undefined(
    source: str, variables: dict[str, Any], shape: dict[str, Any], error: UndefinedVariable
) -> str:
    try:
        render_text(source, shape, limit=EMAIL_RENDER_LIMIT)
    except UndefinedVariable as exc:
        return undefined_message(source, shape, exc)  # no template can read it
    except RenderError:
        pass  # a fault of the sample's values, not of the names
    path = undefined_path(source, variables)
    name = f"'{path}'" if path is not None else "a value the template reads"
    return (
        f"this contact or event has no {name}: a send to them would be skipped "
        f"(template_error); | default('…') gives a fallback"
    )


def variable_list() -> list[dict[str, str]]:
    """The template variables, as docs/journeys.md lists them, without the Markdown."""
    return [
        {"variable": name.replace("`", ""), "holds": holds.replace("`", "")}
        for name, holds in TEMPLATE_VARIABLES
    ]


def address_problem(channel: Channel, address: str) -> str | None:
    """Why `address` cannot receive a test on `channel`, or None."""
    if channel not in TESTABLE:
        return f"a test send is for email and SMS templates; this one is for {channel}"
    if address.splitlines() != [address]:
        return "holds a line break"
    if channel == "email" and not _EMAIL.match(address):
        return "not an e-mail address (name@example.com)"
    if channel == "sms" and not _PHONE.match(address):
        return "not a phone number (+4915112345678)"
    return None


def send_request_for_test(
    template_id: str,
    content: PreviewContent,
    profile: Profile,
    event: SampleEvent | None,
    address: str,
    now: datetime,
) -> SendRequest:
    """One transactional send request of `content` to `address`, rendered for `profile`:
    filed under the journey `test-send`, with its own message id per request."""
    message_id = stable_id(TEST_JOURNEY, template_id, profile.contact_key, address, now.isoformat())
    return SendRequest(
        message_id=message_id,
        contact_key=profile.contact_key,
        channel=content.channel,
        template_id=template_id,
        journey_id=TEST_JOURNEY,
        journey_version=1,
        instance_id=message_id,
        step_id=TEST_JOURNEY,
        transactional=True,
        requested_at=now,
        profile=profile,
        context=preview_context(event, now),
        test=TestSend(address=address, content=content.model_dump(exclude_none=True)),
    )
