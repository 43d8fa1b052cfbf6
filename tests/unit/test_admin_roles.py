"""Admin keys and roles: reading WAYPOST_ADMIN_API_KEYS, the order of roles, the settings that
check them, and whether the API docs are served."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.admin.domain.roles import ROLES, AdminKey, BadAdminKeys, allows, parse_admin_keys
from services.admin.settings import AdminSettings
from shared.secrets import WeakSecrets, require_strong

OPS = "9f1c2b7e4d5a6c8b0e3f1a2d4c6b8e0f9a1c3e5b"
ANA = "1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d"
ED = "e0d8b6f4a2c9e7d5b3f1a8c6e4d2b0f9a7c5e3d1"


def test_roles_are_ordered_each_allowing_what_the_lower_ones_may() -> None:
    assert ROLES == ("viewer", "editor", "publisher")
    assert [needed for needed in ROLES if allows("viewer", needed)] == ["viewer"]
    assert [needed for needed in ROLES if allows("editor", needed)] == ["viewer", "editor"]
    assert [needed for needed in ROLES if allows("publisher", needed)] == list(ROLES)


def test_named_keys_carry_their_name_and_role() -> None:
    keys = parse_admin_keys(f"ops:publisher:{OPS}, ana:viewer:{ANA},ed:Editor:{ED}")

    assert keys == (
        AdminKey("ops", "publisher", OPS),
        AdminKey("ana", "viewer", ANA),
        AdminKey("ed", "editor", ED),
    )


def test_a_bare_key_is_a_publisher_named_by_its_place_among_the_bare_keys() -> None:
    keys = parse_admin_keys(f"{OPS},ana:viewer:{ANA},{ED},")

    assert [(k.name, k.role) for k in keys] == [
        ("key-1", "publisher"),
        ("ana", "viewer"),
        ("key-2", "publisher"),
    ]


def test_a_key_may_hold_colons_after_its_role() -> None:
    (key,) = parse_admin_keys("ops:publisher:a:b:c")

    assert key.secret == "a:b:c"


def test_nothing_configured_is_no_key() -> None:
    assert parse_admin_keys(" , ") == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"ops:publsher:{OPS}", "entry 1 (ops): the role must be one of viewer, editor, publisher"),
        (f"ops:{OPS}", "entry 1 (ops): the role must be one of"),
        ("ops:viewer:", "entry 1 (ops): the key is empty"),
        (f"{OPS}:publisher:ops", "entry 1: the name must be 1 to 24 letters"),
        (f"bad name:viewer:{OPS}", "entry 1: the name must be"),
        (f"ops:viewer:{OPS},ops:editor:{ANA}", "the name 'ops' is used twice"),
        (f"key-1:viewer:{OPS},{ANA}", "the name 'key-1' is used twice"),
        (f"ops:viewer:{OPS},ana:editor:{OPS}", "the keys named ops and ana are the same"),
    ],
)
def test_a_list_that_cannot_be_read_is_refused_naming_the_entry_never_the_key(
    text: str, problem: str
) -> None:
    with pytest.raises(BadAdminKeys) as refused:
        parse_admin_keys(text)

    message = str(refused.value)
    assert message.startswith("WAYPOST_ADMIN_API_KEYS: ")
    assert problem in message
    assert OPS not in message
    assert ANA not in message


def test_every_problem_of_the_list_is_named_at_once() -> None:
    with pytest.raises(BadAdminKeys) as refused:
        parse_admin_keys(f"a:boss:{OPS},b:viewer:,c:viewer:{ANA}")

    assert "entry 1 (a)" in str(refused.value)
    assert "entry 2 (b)" in str(refused.value)
    assert "entry 3" not in str(refused.value)


def test_a_key_never_shows_its_secret_in_a_repr() -> None:
    (key,) = parse_admin_keys(f"ops:publisher:{OPS}")

    assert OPS not in repr(key)
    assert OPS not in str(key)


def test_the_settings_refuse_keys_they_cannot_read_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as refused:
        AdminSettings(admin_api_keys=f"ops:admin:{OPS}")

    assert "WAYPOST_ADMIN_API_KEYS: entry 1 (ops): the role must be one of" in str(refused.value)
    assert OPS not in str(refused.value)


def test_the_settings_keep_their_keys_out_of_their_repr() -> None:
    settings = AdminSettings(admin_api_keys=f"ops:publisher:{OPS},{ANA}")

    assert OPS not in repr(settings)
    assert ANA not in repr(settings)
    assert [k.name for k in settings.admin_keys()] == ["ops", "key-1"]


def test_each_key_must_be_strong_outside_dev_and_the_refusal_names_it() -> None:
    settings = AdminSettings(admin_api_keys=f"ops:publisher:{OPS},ana:viewer:short-key")

    assert [s.variable for s in settings.secrets() if "API_KEYS" in s.variable] == [
        "WAYPOST_ADMIN_API_KEYS (ops)",
        "WAYPOST_ADMIN_API_KEYS (ana)",
    ]
    with pytest.raises(WeakSecrets) as refused:
        require_strong("production", settings.secrets())
    assert "WAYPOST_ADMIN_API_KEYS (ana) is shorter than 32 bytes" in str(refused.value)
    assert "(ops)" not in str(refused.value)
    assert "short-key" not in str(refused.value)
    require_strong("dev", settings.secrets())


@pytest.mark.parametrize(
    ("env", "choice", "served"),
    [
        ("production", None, False),
        ("dev", None, True),
        ("production", "true", True),
        ("dev", "false", False),
        ("production", "", False),
    ],
)
def test_the_api_docs_are_served_in_dev_unless_set_otherwise(
    monkeypatch: pytest.MonkeyPatch, env: str, choice: str | None, served: bool
) -> None:
    monkeypatch.setenv("WAYPOST_ENV", env)
    if choice is not None:
        monkeypatch.setenv("WAYPOST_ADMIN_API_DOCS", choice)

    assert AdminSettings().serves_api_docs() is served
