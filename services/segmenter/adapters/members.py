"""Who is in which segment on this worker's partitions: exact counts, audience snapshots.

The truth is the `memberships` table (one small row per contact: its partition, the definitions
digest it was evaluated against, its segment ids), written in the same turn as the contact's
row. The in-memory index is rebuilt from that table after every recovery, then kept by
increments; so after a crash or a partition move the counts are recounted from the truth, never
carried over (no double count, no gap).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

SEPARATOR = b"\x00"


def membership_row(partition: int, digest: str, segments: Iterable[str]) -> bytes:
    return SEPARATOR.join(
        (str(partition).encode(), digest.encode(), *(s.encode() for s in segments))
    )


def read_membership(value: bytes) -> tuple[int, str, tuple[str, ...]]:
    partition, digest, *segments = value.split(SEPARATOR)
    return int(partition), digest.decode(), tuple(s.decode() for s in segments)


class MemberIndex:
    """Members per partition and segment; `dirty` names the counts to publish again."""

    def __init__(self) -> None:
        self._members: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.dirty: set[tuple[str, int]] = set()

    def rebuild(self, rows: Iterable[tuple[bytes, bytes]], partitions: Iterable[int]) -> int:
        """Index every membership row; every count of `partitions` is published again."""
        members: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        rows_seen = 0
        for key, value in rows:
            partition, _digest, segments = read_membership(value)
            contact = key.decode()
            for segment in segments:
                members[partition][segment].add(contact)
            rows_seen += 1
        self._members = members
        owned = set(partitions) | set(members)
        self.dirty = {(s, p) for p in owned for s in members.get(p, {})}
        return rows_seen

    def update(
        self, contact: str, partition: int, before: Iterable[str], after: Iterable[str]
    ) -> None:
        old, new = set(before), set(after)
        by_segment = self._members[partition]
        for segment in old - new:
            by_segment[segment].discard(contact)
            self.dirty.add((segment, partition))
        for segment in new - old:
            by_segment[segment].add(contact)
            self.dirty.add((segment, partition))

    def count(self, segment: str, partition: int) -> int:
        return len(self._members.get(partition, {}).get(segment, ()))

    def members(self, partition: int, segments: Iterable[str]) -> list[str]:
        """Members of any of `segments` on `partition`, each once, sorted."""
        by_segment = self._members.get(partition, {})
        found: set[str] = set()
        for segment in segments:
            found.update(by_segment.get(segment, ()))
        return sorted(found)

    def take_dirty(self) -> Iterator[tuple[str, int, int]]:
        """(segment, partition, count) for every count that changed since the last call."""
        dirty, self.dirty = self.dirty, set()
        for segment, partition in sorted(dirty):
            yield segment, partition, self.count(segment, partition)

    def announce(self, segments: Iterable[str], partitions: Iterable[int]) -> None:
        """Publish these counts again (new segments start at zero, moved partitions recount)."""
        self.dirty.update((s, p) for s in segments for p in partitions)
