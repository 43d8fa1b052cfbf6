"""Who may do what on the admin API: named keys, each with one of three ordered roles.

`WAYPOST_ADMIN_API_KEYS` is a comma-separated list of `name:role:key` entries; a bare key (no
colon), as configured before roles existed, is a publisher named `key-1`, `key-2`, … by its place
among the bare keys. Nothing here ever puts a key's secret into a message or a repr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

Role = Literal["viewer", "editor", "publisher"]
# Lowest first: each role may do everything the roles before it may.
ROLES: tuple[Role, ...] = get_args(Role)
LEGACY_ROLE: Role = "publisher"
VARIABLE = "WAYPOST_ADMIN_API_KEYS"
# Shorter than any key a service accepts outside dev (32 bytes): a key written where the name
# goes is refused as a name, so it never reaches a log line or an answer as one.
MAX_NAME_CHARS = 24
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_CHARS - 1}}}")


def allows(held: Role, needed: Role) -> bool:
    """Whether a key of role `held` may make a call that needs `needed`."""
    return ROLES.index(held) >= ROLES.index(needed)


@dataclass(frozen=True)
class AdminKey:
    """One admin API key: the name that audit entries and refusals show, its role, its secret."""

    name: str
    role: Role
    secret: str = field(repr=False)


class BadAdminKeys(ValueError):
    """`WAYPOST_ADMIN_API_KEYS` cannot be read; the message names entries by position and name,
    never by their text."""


def parse_admin_keys(text: str) -> tuple[AdminKey, ...]:
    """Every key of `text` (`name:role:key` or a bare key), in order; empty entries are skipped.

    Raises `BadAdminKeys` naming every entry at fault: an entry with a colon that is not
    `name:role:key` (a misspelt role must not quietly become a bare publisher key), a name used
    twice, a key given twice."""
    keys: list[AdminKey] = []
    problems: list[str] = []
    bare = 0
    entries = [entry.strip() for entry in text.split(",")]
    for position, entry in enumerate((e for e in entries if e), start=1):
        if ":" not in entry:
            bare += 1
            keys.append(AdminKey(f"key-{bare}", LEGACY_ROLE, entry))
            continue
        name, _, rest = entry.partition(":")
        role, sep, secret = rest.partition(":")
        where = f"entry {position}"
        if not _NAME.fullmatch(name):
            problems.append(
                f"{where}: the name must be 1 to {MAX_NAME_CHARS} letters, digits, '_', '.' or "
                "'-', starting with a letter or digit (entries are name:role:key)"
            )
            continue
        where = f"entry {position} ({name})"
        known = next((r for r in ROLES if r == role.lower()), None) if sep else None
        if known is None:
            problems.append(f"{where}: the role must be one of {', '.join(ROLES)} (name:role:key)")
            continue
        if not secret:
            problems.append(f"{where}: the key is empty")
            continue
        keys.append(AdminKey(name, known, secret))
    names = [key.name for key in keys]
    problems += [f"the name '{n}' is used twice" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [
        f"the keys named {key.name} and {other.name} are the same"
        for i, key in enumerate(keys)
        for other in keys[i + 1 :]
        if key.secret == other.secret
    ]
    if problems:
        raise BadAdminKeys(f"{VARIABLE}: " + "; ".join(problems))
    return tuple(keys)
