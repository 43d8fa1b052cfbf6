"""A batch's view of its worker's tables: writes held in memory until the batch's outputs are
acknowledged, record by record, so a record that fails leaves no trace in the batch.

A stream worker folds a batch of records in offset order. A later record of the same contact
reads what an earlier one wrote (`get` sees the batch's writes first), but nothing reaches the
tables before every output of the batch was acknowledged by Kafka (`writes`, then the caller
stores them and commits). A crash anywhere before that repeats the batch; it never skips one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

Output = tuple[str, str | None, bytes | None]
# A value worked out only when the batch is sent, and only if it is still the newest of its key
# then (a profile snapshot superseded in the batch is never encoded).
Deferred = Callable[[], bytes | None]
Latest = tuple[str, str | None, bytes | Deferred | None]
# Makes a partition the one the tables address (`shared.streams.focus` in a worker).
Focus = Callable[[int], None]
# A table name and a key in it.
Slot = tuple[str, bytes]


@dataclass(frozen=True)
class Write:
    """One pending write: `value` None deletes the key. `partition` is the stream partition of
    the record that wrote it (the table's changelog partition)."""

    table: str
    key: bytes
    partition: int
    value: Any


@dataclass
class Overlay:
    """Pending writes, outputs and after-store effects of one batch (and of its current record).

    `keep()` adds the current record's share to the batch; `discard()` forgets it (the record
    failed and is dead-lettered instead).
    """

    _batch: dict[Slot, Write] = field(default_factory=dict)
    _record: dict[Slot, Write] = field(default_factory=dict)
    _loaded: dict[Slot, Any] = field(default_factory=dict)
    outputs: list[Output] = field(default_factory=list)
    _record_outputs: list[Output] = field(default_factory=list)
    _effects: list[Callable[[], None]] = field(default_factory=list)
    _record_effects: list[Callable[[], None]] = field(default_factory=list)
    # Outputs of which only the batch's last per topic and key is sent (`emit_latest`).
    _latest: dict[tuple[str, str | None], Latest] = field(default_factory=dict)
    _record_latest: dict[tuple[str, str | None], Latest] = field(default_factory=dict)

    def get(self, table: str, key: bytes, load: Callable[[], Any]) -> Any:
        """The value as this batch sees it; `load` reads (and decodes) the stored one, once."""
        slot = (table, key)
        if slot in self._record:
            return self._record[slot].value
        if slot in self._batch:
            return self._batch[slot].value
        if slot not in self._loaded:
            self._loaded[slot] = load()
        return self._loaded[slot]

    def put(self, table: str, key: bytes, partition: int, value: Any) -> None:
        self._record[(table, key)] = Write(table, key, partition, value)

    def delete(self, table: str, key: bytes, partition: int) -> None:
        self.put(table, key, partition, None)

    def emit(self, *records: Output) -> None:
        self._record_outputs.extend(records)

    def emit_latest(self, record: Latest) -> None:
        """An output of a compacted topic whose readers want only the newest value per key (a
        profile snapshot): a later one of the same topic and key in the batch replaces it. Its
        value may be `Deferred`: called by `to_send`, once, for the newest of its key only."""
        self._record_latest[(record[0], record[1])] = record

    def to_send(self) -> list[Output]:
        """Every output of the batch: those emitted, in order, then the latest of each key."""
        resolved: list[Output] = []
        for slot, (topic, key, value) in self._latest.items():
            encoded = value() if callable(value) else value
            self._latest[slot] = (topic, key, encoded)  # once, should the batch be sent again
            resolved.append((topic, key, encoded))
        return [*self.outputs, *resolved]

    def after_store(self, effect: Callable[[], None]) -> None:
        """Run `effect` once the batch's writes are stored (in-memory indexes follow the
        tables, never run ahead of them)."""
        self._record_effects.append(effect)

    def keep(self) -> None:
        self._batch.update(self._record)
        self.outputs.extend(self._record_outputs)
        self._effects.extend(self._record_effects)
        self._latest.update(self._record_latest)
        self.discard()

    def discard(self) -> None:
        self._record.clear()
        self._record_outputs.clear()
        self._record_effects.clear()
        self._record_latest.clear()

    @property
    def empty(self) -> bool:
        return not (self._batch or self.outputs or self._latest or self._effects or self._record)

    def writes(self) -> Iterator[Write]:
        return iter(self._batch.values())

    def abandon(self) -> None:
        """Nothing of the batch was stored: forget it all (the batch is folded again)."""
        self._effects.clear()
        self.stored()

    def stored(self) -> None:
        """The writes are in the tables: run the effects, start the next batch afresh."""
        for effect in self._effects:
            effect()
        self._batch.clear()
        self._loaded.clear()
        self.outputs.clear()
        self._latest.clear()
        self._effects.clear()
        self.discard()


def no_focus(_partition: int) -> None:
    """Tables that are not split by partition (dicts in tests) need no focus."""
