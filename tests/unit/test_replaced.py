"""`shared.contracts.replaced` is `model_copy(update=...)`, made directly: the same fields, the
same fields set, the same wire bytes, and the original untouched."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

from services.segmenter.domain.contact import ContactRow
from shared.contracts import Profile, replaced

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def profile() -> Profile:
    return Profile(
        contact_key="ada",
        user_id="ada",
        traits={"plan": "pro"},
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
        segments=("vip",),
    )


def assert_same_copy(model: BaseModel, update: dict[str, Any]) -> None:
    expected = model.model_copy(update=update)
    got = replaced(model, update)
    assert type(got) is type(expected)
    assert got == expected
    assert got.model_fields_set == expected.model_fields_set
    assert got.model_dump_json() == expected.model_dump_json()
    assert got is not model


def test_a_profile_copy_with_changes_equals_model_copy() -> None:
    before = profile()
    assert_same_copy(before, {"segments": ("vip", "new"), "aggregates": {"spend": 10}})
    assert_same_copy(before, {})
    assert before.segments == ("vip",)  # the original is left as it was
    assert "aggregates" not in before.model_fields_set


def test_a_row_copy_with_changes_equals_model_copy() -> None:
    row = ContactRow(profile=profile(), seen={"1740992400": "d1"})
    assert_same_copy(row, {"profile": profile(), "stable_until": 5, "next_tick": T0})


class Extra(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


class Private(BaseModel):
    name: str
    _cache: dict[str, int] = PrivateAttr(default_factory=dict)


def test_models_with_extra_fields_or_private_attributes_go_through_model_copy() -> None:
    extra = Extra(name="a", colour="red")  # type: ignore[call-arg]
    assert_same_copy(extra, {"name": "b"})
    assert replaced(extra, {"name": "b"}).__pydantic_extra__ == {"colour": "red"}
    private = Private(name="a")
    private._cache["x"] = 1
    copied = replaced(private, {"name": "b"})
    assert (copied.name, copied._cache) == ("b", {"x": 1})
