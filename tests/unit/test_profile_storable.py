"""`storable` (the profile view's escaping of what the document store refuses) tells the common
types apart by their exact type before the general rules. It must give what the general rules
alone give, for any value a profile's dump can hold and for the types it cannot."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.segmenter.adapters.profile_view import storable

_ESCAPES = (("%", "%25"), (".", "%2E"), ("$", "%24"), ("\x00", "%00"))
_INT64 = (-(2**63), 2**63 - 1)


def general(value: Any) -> Any:
    """The rules alone, value by value (as the view applied them before)."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            text = str(key)
            for plain, escaped in _ESCAPES:
                text = text.replace(plain, escaped)
            out[text] = general(item)
        return out
    if isinstance(value, list | tuple):
        return [general(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    return value


class Plan(StrEnum):
    PRO = "pro.plan"


class Big(int):
    pass


keys = st.one_of(
    st.text(alphabet=st.sampled_from("ab.$%\x00é"), max_size=6),
    st.integers(-5, 5),
    st.just(Plan.PRO),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.datetimes(timezones=st.just(UTC)),
    st.builds(Big, st.integers(2**63, 2**64)),
    st.just(Plan.PRO),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
        st.dictionaries(keys, inner, max_size=4).map(OrderedDict),
    ),
    max_leaves=25,
)


@given(values)
def test_storable_gives_what_the_rules_alone_give(value: Any) -> None:
    got, expected = storable(value), general(value)
    assert got == expected
    assert repr(got) == repr(expected)  # the same types too (1 and True, lists for tuples)


def test_keys_are_escaped_and_big_integers_written_as_text() -> None:
    at = datetime(2026, 1, 5, tzinfo=UTC)
    profile = {"traits": {"a.b": 1, "$x": 2**64, "50%": [True, at]}, 7: None}
    assert storable(profile) == {
        "traits": {"a%2Eb": 1, "%24x": str(2**64), "50%25": [True, at]},
        "7": None,
    }
