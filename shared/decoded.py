"""Decoded rows kept beside their bytes, so a row read again is not decoded again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DecodedRows(Generic[T]):
    """The last decoded value of up to `size` keys, each with the bytes it came from.

    `decode(key, raw)` returns the kept value when `raw` equals the bytes it was decoded from
    (comparing bytes costs far less than parsing them), else decodes and keeps the result. Any
    writer, another worker's rows restored after a rebalance included, changes the bytes, so a
    kept value is never stale. The values must be immutable: callers share them. The least
    recently used key goes first when the cache is full.
    """

    def __init__(self, decode: Callable[[bytes], T], size: int) -> None:
        self._decode = decode
        self._size = size
        self._entries: dict[bytes, tuple[bytes, T]] = {}
        self.hits = 0
        self.misses = 0

    def decode(self, key: bytes, raw: bytes) -> T:
        entry = self._entries.pop(key, None)
        if entry is not None and entry[0] == raw:
            self._entries[key] = entry
            self.hits += 1
            return entry[1]
        self.misses += 1
        value = self._decode(raw)
        self.remember(key, raw, value)
        return value

    def remember(self, key: bytes, raw: bytes, value: T) -> None:
        """Keep `value` as what `raw` decodes to (a writer that encoded it has both)."""
        entries = self._entries
        entries.pop(key, None)
        if self._size <= 0:
            return
        if len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = (raw, value)

    def forget(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
