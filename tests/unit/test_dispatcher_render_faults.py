"""A template that fails for one contact is that contact's skip, never the worker's fault: every
runtime error while rendering, an oversized result and a line break in a header or an address."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.dispatcher.channels.push.domain import render_push
from services.dispatcher.channels.sms.domain import render_sms
from services.dispatcher.channels.wechat.domain import render_wechat
from services.dispatcher.domain.policy import (
    falls_back,
    line_break_refusal,
    tries_next_channel,
)
from shared.rendering import (
    EMAIL_RENDER_LIMIT,
    FIELD_RENDER_LIMIT,
    EmailTemplate,
    RenderError,
    render_email,
    render_text,
)

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
VARIABLES: dict[str, Any] = {"contact": {"first_name": "Ada", "orders": 0, "note": "x\ud800"}}


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("{{ 100 / contact.orders }}", "ZeroDivisionError"),
        ("{{ contact.first_name + 1 }}", "TypeError"),
        ("{{ 10.0 ** 400 }}", "OverflowError"),
        ("{{ contact.first_name.index('z') }}", "ValueError"),
        ("{{ '{:d}'.format(contact.first_name) }}", "ValueError"),
    ],
)
def test_a_runtime_error_while_rendering_is_a_render_error_naming_it(
    source: str, error: str
) -> None:
    with pytest.raises(RenderError, match=f"^{error}: "):
        render_text(source, VARIABLES)


@pytest.mark.parametrize("part", ["subject", "text", "html"])
def test_an_email_part_that_fails_is_named_in_the_error(part: str) -> None:
    parts = {"subject": "s", "text": "t", "html": "<p>h</p>", part: "{{ 1 / 0 }}"}

    with pytest.raises(RenderError, match=f"^{part}: ZeroDivisionError"):
        render_email(EmailTemplate(**parts), VARIABLES)


@pytest.mark.parametrize(
    "render",
    [
        lambda t: render_sms(t, VARIABLES, None),
        lambda t: render_push(t, VARIABLES),
        lambda t: render_wechat(t, VARIABLES),
    ],
    ids=["sms", "push", "wechat"],
)
def test_other_channels_name_the_failing_field(render: Any) -> None:
    template = {"subject": "s", "text": "{{ contact.first_name + 1 }} https://a.example/"}

    with pytest.raises(RenderError, match=r"^text: TypeError"):
        render(template)


def test_a_rendered_email_part_over_the_bound_is_a_render_error() -> None:
    # Each loop turn is small: the bound is measured as the output grows.
    source = "{% for i in range(100000) %}" + "x" * 20 + "{% endfor %}"

    with pytest.raises(RenderError, match=f"^html: renders to more than {EMAIL_RENDER_LIMIT}"):
        render_email(EmailTemplate(subject="s", text="t", html=source), VARIABLES)


def test_an_email_part_up_to_the_bound_renders() -> None:
    source = "{% for i in range(1024) %}" + "x" * 1024 + "{% endfor %}"

    email = render_email(EmailTemplate(subject="s", text=source), VARIABLES)

    assert len(email.text) == EMAIL_RENDER_LIMIT


def test_other_channels_fields_have_a_smaller_bound() -> None:
    source = "{% for i in range(100) %}" + "x" * 1024 + "{% endfor %}"

    with pytest.raises(RenderError, match=f"^text: renders to more than {FIELD_RENDER_LIMIT}"):
        render_sms({"text": source}, VARIABLES, None)


@pytest.mark.parametrize(
    "source", ["{{ 'x' * 10 ** 9 }}", "{{ 10 ** 9 * [1] }}", "{{ 2 ** 100000000 }}"]
)
def test_a_huge_value_is_refused_before_it_is_built(source: str) -> None:
    with pytest.raises(RenderError, match=r"^OverflowError: "):
        render_text(source, VARIABLES)


def test_small_repetitions_and_powers_still_work() -> None:
    assert render_text("{{ '-' * 3 }}{{ 2 ** 10 }}{{ 2.0 ** 0.5 > 1 }}", VARIABLES) == "---1024True"


def test_text_that_cannot_be_encoded_is_a_render_error() -> None:
    with pytest.raises(RenderError, match=r"^UnicodeEncodeError"):
        render_text("{{ contact.note }}", VARIABLES)


@pytest.mark.parametrize("subject", ["a{{ '\\r' }}b", "a{{ '\\u2028' }}b", "a{{ '\\x85' }}b"])
def test_a_subject_with_any_line_break_is_a_render_error(subject: str) -> None:
    with pytest.raises(RenderError, match="more than one line"):
        render_email(EmailTemplate(subject=subject, text="t"), VARIABLES)


@pytest.mark.parametrize(
    "address", ["a@example.com\r\nBcc: b@example.com", "a@example.com\n", "a\u2028@example.com"]
)
def test_an_address_with_a_line_break_is_no_address_and_the_next_channel_is_tried(
    address: str,
) -> None:
    reason = line_break_refusal("email", address)

    assert reason == "no_address: email: the address holds a line break"
    assert tries_next_channel(reason)


def test_a_clean_address_passes() -> None:
    assert line_break_refusal("sms", "+15550100") is None


@pytest.mark.parametrize(
    "reason",
    [
        "template_error: welcome-email: ZeroDivisionError: division by zero",
        "unsendable: email: ValueError: Header values may not contain linefeed",
        "no_address: wechat",
    ],
)
def test_a_template_fault_tries_the_next_channel_like_an_unreachable_one(reason: str) -> None:
    assert tries_next_channel(reason)


@pytest.mark.parametrize(
    "reason", ["frequency_capped: 1 today (limit 1 per day)", "template_not_ready: welcome", None]
)
def test_a_cap_or_a_template_not_ready_does_not(reason: str | None) -> None:
    assert not tries_next_channel(reason)


def test_a_template_fault_is_not_called_unreachable() -> None:
    assert not falls_back("template_error: welcome-email: TypeError: x")
