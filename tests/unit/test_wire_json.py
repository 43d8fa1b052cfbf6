"""`shared.contracts.wire_json` writes the very bytes `model_dump_json(...).encode()` writes,
for every option the services pass, and the records built on it read back equal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.segmenter.domain.contact import ContactRow
from shared.contracts import ContactEvent, Coupon, Event, Profile, wire_json

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)

# JSON values as traits and properties carry them: non-ASCII text, escapes, big and odd numbers.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def profile(traits: dict[str, Any]) -> Profile:
    return Profile(
        contact_key="zoë",
        user_id="zoë",
        anonymous_ids=("anon-1",),
        traits=traits,
        first_seen=T0,
        last_seen=T0,
        event_counts={"Product Viewed": 3},
        recent_message_ids=("m-1", "m-2"),
        updated_at=T0,
        segments=("vip",),
        consent={"sms": False},
        aggregates={"spend": 12.5, "views": 3},
        coupons=(Coupon(code="C-1", journey_id="j", instance_id="i", issued_at=T0),),
    )


def event(properties: dict[str, Any]) -> Event:
    return Event(
        type="track",
        event="Order Completed",
        user_id="zoë",
        message_id="m-1",
        timestamp=T0,
        received_at=T0,
        properties=properties,
    )


@given(st.dictionaries(st.text(max_size=8), values, max_size=4))
def test_the_bytes_are_model_dump_jsons(fields: dict[str, Any]) -> None:
    p = profile(fields)
    e = event(fields)
    row = ContactRow(profile=p, aggregates={"spend@1": {"b": [1, 2]}}, next_tick=T0)
    for model, options in [
        (p, {"by_alias": True, "exclude_none": True, "exclude": {"recent_message_ids"}}),
        (e, {"by_alias": True, "exclude_none": True}),
        (row, {}),
    ]:
        assert wire_json(model, **options) == model.model_dump_json(**options).encode()


@pytest.mark.parametrize("traits", [{}, {"name": 'Zoë \u2028 "q" \\', "n": 2**65}])
def test_the_records_built_on_it_read_back_equal(traits: dict[str, Any]) -> None:
    p = profile(traits)
    published = Profile.model_validate_json(p.to_wire())
    assert published == p.model_copy(update={"recent_message_ids": ()})
    contact_event = ContactEvent(contact_key="zoë", event=event(traits), profile=p)
    read = ContactEvent.model_validate_json(contact_event.to_wire())
    assert read.event == contact_event.event
    assert read.profile == published
    assert (
        event(traits).to_wire()
        == event(traits).model_dump_json(by_alias=True, exclude_none=True).encode()
    )
