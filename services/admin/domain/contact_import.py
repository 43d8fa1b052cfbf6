"""A CSV file of tags and traits for many contacts (`POST /v1/contacts/import`): read and
checked whole before anything is sent, each problem named by its row and column. The changes
are the single-contact ones (`contact_changes`), so the segmenter applies and announces them
alike. Pure."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.admin.domain.contact_changes import (
    MAX_CHANGES,
    ContactChanges,
    change_commands,
    tag_problem,
    trait_name_problem,
    trait_problem,
)
from shared.contracts import ContactCommand

KEY_COLUMN = "contact_key"
TAGS_COLUMN = "tags"
TAG_SEPARATOR = ";"
MAX_ROWS = 10_000
# An answer lists this many problems at most; the file is read on to count its rows.
MAX_PROBLEMS = 100
# The id seed of an import's commands (a single change's is `admin-change`).
ORIGIN = "admin-import"


@dataclass(frozen=True)
class ImportProblem:
    """What is wrong at a row (the header is row 1, as a spreadsheet counts) and column."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [f"row {self.row}" if self.row is not None else "", self.column or ""]
        shown = ", ".join(w for w in where if w)
        return f"{shown}: {self.message}" if shown else self.message

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "column": self.column, "message": self.message}


@dataclass
class _Contact:
    first_row: int
    tags: dict[str, None] = field(default_factory=dict)
    traits: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContactImport:
    """A file that holds: each contact's changes, rows merged in file order (tags added up,
    a later row's trait value over an earlier one's)."""

    rows: int
    changes: dict[str, ContactChanges]
    first_rows: dict[str, int]

    def counts(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "contacts": len(self.first_rows),
            "tags_added": sum(len(c.add_tags) for c in self.changes.values()),
            "traits_set": sum(len(c.set_traits) for c in self.changes.values()),
        }

    def commands(self, now: datetime) -> list[ContactCommand]:
        """The contact commands, contact after contact in file order."""
        return [
            command
            for key, changes in self.changes.items()
            for command in change_commands(key, changes, now, ORIGIN)
        ]


def read_import(body: bytes, max_rows: int = MAX_ROWS) -> ContactImport | list[ImportProblem]:
    """The file's changes, or every problem found (up to `MAX_PROBLEMS`)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [ImportProblem(None, None, f"the file is not UTF-8 text (byte {exc.start})")]
    problems: list[ImportProblem] = []
    rows = _records(text, problems)
    header = next(rows, None)
    if header is None:
        return problems or [ImportProblem(1, None, f"no header row; it needs a {KEY_COLUMN}")]
    columns = [name.strip() for name in header[1]]
    problems.extend(_header_problems(columns))
    if problems:
        return problems[:MAX_PROBLEMS]
    contacts: dict[str, _Contact] = {}
    count = 0
    for row, cells in rows:
        count += 1
        if count > max_rows:
            problems.append(ImportProblem(row, None, f"at most {max_rows} rows after the header"))
            break
        if len(problems) < MAX_PROBLEMS:
            problems.extend(_row_problems(row, columns, cells, contacts))
    if problems:
        return problems[:MAX_PROBLEMS]
    if count == 0:
        return [ImportProblem(2, None, "no rows after the header")]
    return ContactImport(
        rows=count,
        changes={
            key: ContactChanges(add_tags=tuple(c.tags), set_traits=c.traits)
            for key, c in contacts.items()
            if c.tags or c.traits
        },
        first_rows={key: c.first_row for key, c in contacts.items()},
    )


def unknown_contacts(found: ContactImport, stored: Iterable[str]) -> list[ImportProblem]:
    """A problem for each contact of the file with no stored profile (at its first row)."""
    held = set(stored)
    return [
        ImportProblem(row, KEY_COLUMN, f"no stored profile '{key}'")
        for key, row in found.first_rows.items()
        if key not in held
    ][:MAX_PROBLEMS]


def _records(text: str, problems: list[ImportProblem]) -> Iterator[tuple[int, list[str]]]:
    """Records with their row numbers (a blank line is a row, as in a spreadsheet, but yields
    nothing); a record the reader refuses ends the file with a problem."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row = 0
    while True:
        row += 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problems.append(ImportProblem(row, None, f"not CSV: {exc}"))
            return
        if not any(cell.strip() for cell in cells):
            continue
        yield row, cells


def _header_problems(columns: list[str]) -> list[ImportProblem]:
    problems = []
    if KEY_COLUMN not in columns:
        problems.append(
            ImportProblem(
                1,
                KEY_COLUMN,
                f"the header has no {KEY_COLUMN} column (contacts are named by their key)",
            )
        )
    seen: set[str] = set()
    for place, name in enumerate(columns, start=1):
        if not name:
            problems.append(ImportProblem(1, f"column {place}", "a column has no name"))
        elif name in seen:
            problems.append(ImportProblem(1, name, "the column is given twice"))
        elif (
            name not in (KEY_COLUMN, TAGS_COLUMN)
            and (problem := trait_name_problem(name)) is not None
        ):
            problems.append(ImportProblem(1, name, problem))
        seen.add(name)
    traits = [c for c in columns if c not in (KEY_COLUMN, TAGS_COLUMN)]
    if len(traits) > MAX_CHANGES:
        problems.append(
            ImportProblem(1, None, f"at most {MAX_CHANGES} trait columns, not {len(traits)}")
        )
    return problems


def _row_problems(
    row: int, columns: list[str], cells: list[str], contacts: dict[str, _Contact]
) -> list[ImportProblem]:
    """Checks one row and adds its changes to its contact's."""
    if len(cells) > len(columns):
        return [
            ImportProblem(row, None, f"{len(cells)} cells; the header has {len(columns)} columns")
        ]
    values = dict(zip(columns, cells, strict=False))  # a short row leaves the rest unchanged
    key = values.get(KEY_COLUMN, "").strip()
    if not key:
        return [ImportProblem(row, KEY_COLUMN, "empty: each row names its contact")]
    contact = contacts.setdefault(key, _Contact(first_row=row))
    problems = []
    for name, value in values.items():
        if name == KEY_COLUMN or not value.strip():
            continue  # an empty cell leaves the contact unchanged
        if name == TAGS_COLUMN:
            for tag in (t.strip() for t in value.split(TAG_SEPARATOR)):
                if not tag:
                    continue
                if (problem := tag_problem(tag)) is not None:
                    problems.append(ImportProblem(row, TAGS_COLUMN, f"'{tag}': {problem}"))
                else:
                    contact.tags[tag] = None
            if len(contact.tags) > MAX_CHANGES:
                problems.append(
                    ImportProblem(row, TAGS_COLUMN, f"at most {MAX_CHANGES} tags for a contact")
                )
        elif (problem := trait_problem(name, value.strip())) is not None:
            problems.append(ImportProblem(row, name, problem))
        else:
            contact.traits[name] = value.strip()
    return problems
