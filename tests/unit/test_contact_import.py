"""A CSV import of tags and traits: read and checked whole, each problem named by its row and
column, rows merged by contact, and the commands those of a single contact's changes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.admin.domain.audit import ContactDigest, audit_entry
from services.admin.domain.contact_changes import MAX_CHANGES, ContactChanges, change_commands
from services.admin.domain.contact_import import (
    ContactImport,
    ImportProblem,
    read_import,
    unknown_contacts,
)

NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)


def imported(text: str, **kwargs: int) -> ContactImport:
    found = read_import(text.encode(), **kwargs)
    assert isinstance(found, ContactImport), found
    return found


def problems(body: str | bytes, **kwargs: int) -> list[tuple[int | None, str | None]]:
    found = read_import(body.encode() if isinstance(body, str) else body, **kwargs)
    assert isinstance(found, list), found
    return [(p.row, p.column) for p in found]


def test_tags_and_traits_by_contact_with_empty_cells_left_unchanged() -> None:
    found = imported(
        "contact_key,tags,plan,city\r\nu-1,vip; beta ;,gold,\r\nu-2,,,Lyon\r\nu-3,,,\r\n"
    )
    assert found.counts() == {"rows": 3, "contacts": 3, "tags_added": 2, "traits_set": 2}
    assert found.changes == {
        "u-1": ContactChanges(add_tags=("vip", "beta"), set_traits={"plan": "gold"}),
        "u-2": ContactChanges(set_traits={"city": "Lyon"}),
    }


def test_rows_of_one_contact_add_up_and_a_later_trait_wins() -> None:
    found = imported("contact_key,tags,plan\nu-1,a,free\nu-2,b,\nu-1,a;c,pro\n")
    assert found.changes["u-1"] == ContactChanges(add_tags=("a", "c"), set_traits={"plan": "pro"})
    assert found.first_rows == {"u-1": 2, "u-2": 3}
    assert found.counts()["contacts"] == 2


def test_the_commands_are_those_of_a_single_change_under_the_import_origin() -> None:
    found = imported("contact_key,tags,plan\nu-1,vip,gold\n")
    commands = found.commands(NOW)
    single = change_commands("u-1", found.changes["u-1"], NOW)
    assert [(c.kind, c.tag, c.attribute, c.value) for c in commands] == [
        (c.kind, c.tag, c.attribute, c.value) for c in single
    ]
    assert {c.command_id for c in commands}.isdisjoint(c.command_id for c in single)
    assert found.commands(NOW) == commands  # ids derive from the file and the time


def test_a_byte_order_mark_quoted_cells_and_blank_lines_are_read() -> None:
    found = imported('\ufeffcontact_key,note\n\n"u,1","two\nlines"\n')
    assert found.changes == {"u,1": ContactChanges(set_traits={"note": "two\nlines"})}
    assert found.first_rows == {"u,1": 3}  # the blank line is row 2, as a spreadsheet counts


def test_the_header_needs_contact_key_and_names_valid_traits_once() -> None:
    assert problems("email,tags\nu-1,a\n") == [(1, "contact_key")]
    assert problems("contact_key,plan,plan\n") == [(1, "plan")]
    assert problems("contact_key,a.b,$x,\n") == [(1, "a.b"), (1, "$x"), (1, "column 4")]
    many = ",".join(f"t{i}" for i in range(MAX_CHANGES + 1))
    assert problems(f"contact_key,{many}\nu,1\n") == [(1, None)]


def test_each_row_problem_names_its_row_and_column() -> None:
    text = (
        "contact_key,tags,bio\n"
        ",a,\n"  # row 2: no contact
        f"u-1,{'x' * 65},\n"  # row 3: a tag too long
        f"u-2,,{'y' * 2000}\n"  # row 4: a trait over 1 KiB
        "u-3,a,b,c\n"  # row 5: a cell past the header
    )
    assert problems(text) == [(2, "contact_key"), (3, "tags"), (4, "bio"), (5, None)]


def test_too_many_tags_for_one_contact() -> None:
    tags = ";".join(f"t{i}" for i in range(MAX_CHANGES))
    assert problems(f"contact_key,tags\nu,{tags}\nu,one-more\n") == [(3, "tags")]


def test_rows_are_capped() -> None:
    body = "contact_key,plan\n" + "".join(f"u-{i},x\n" for i in range(6))
    assert problems(body, max_rows=5) == [(7, None)]
    assert imported(body, max_rows=6).counts()["rows"] == 6


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"contact_key\n\xff\n", [(None, None)]),
        ("", [(1, None)]),
        ("contact_key,plan\n\n", [(2, None)]),
        ('contact_key,plan\nu,"open\n', [(2, None)]),
    ],
)
def test_a_file_that_is_not_csv_text_is_refused(
    body: str | bytes, expected: list[tuple[int | None, str | None]]
) -> None:
    assert problems(body) == expected


def test_problems_read_as_row_and_column() -> None:
    assert str(ImportProblem(3, "tags", "too long")) == "row 3, tags: too long"
    assert str(ImportProblem(None, None, "not UTF-8")) == "not UTF-8"


def test_contacts_without_a_stored_profile_are_named_at_their_first_row() -> None:
    found = imported("contact_key,plan\nu-1,a\nu-2,b\nu-2,c\n")
    assert [(p.row, p.column) for p in unknown_contacts(found, {"u-1"})] == [(3, "contact_key")]
    assert unknown_contacts(found, {"u-1", "u-2"}) == []


DIGEST = ContactDigest(b"an-audit-secret-of-enough-length-for-a-test")


def test_the_audit_entry_keeps_the_counts_never_the_file() -> None:
    entry = audit_entry(
        at=NOW,
        key="ops",
        role="publisher",
        required_role="publisher",
        method="POST",
        route="/v1/contacts/import",
        action="Import tags and traits",
        params={},
        status=202,
        refused_for_role=False,
        digest=DIGEST,
        counts={"rows": 3, "contacts": 2},
    )
    assert entry.summary == "Import tags and traits: done (rows 3, contacts 2)"
    assert entry.as_document()["counts"] == {"rows": 3, "contacts": 2}
    plain = audit_entry(
        at=NOW,
        key="ops",
        role="publisher",
        required_role="publisher",
        method="POST",
        route="/v1/x",
        action="X",
        params={},
        status=200,
        refused_for_role=False,
        digest=DIGEST,
    )
    assert "counts" not in plain.as_document()
