"""Rows kept decoded beside their bytes: the same bytes skip the decode, other bytes never read
a stale value, and the cache stays within its size."""

from __future__ import annotations

import json
from typing import Any

from shared.decoded import DecodedRows


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, raw: bytes) -> Any:
        self.calls += 1
        return json.loads(raw)


def test_the_same_bytes_return_the_kept_value_without_decoding() -> None:
    decode = Counting()
    rows = DecodedRows(decode, 4)
    first = rows.decode(b"ada", b'{"n": 1}')
    again = rows.decode(b"ada", b'{"n": 1}')
    assert again is first
    assert decode.calls == 1
    assert (rows.hits, rows.misses) == (1, 1)


def test_other_bytes_under_the_same_key_are_decoded_again() -> None:
    decode = Counting()
    rows = DecodedRows(decode, 4)
    rows.decode(b"ada", b'{"n": 1}')
    # Another writer (a restore after a rebalance, say) stored something else.
    assert rows.decode(b"ada", b'{"n": 2}') == {"n": 2}
    assert decode.calls == 2


def test_a_remembered_value_is_returned_for_the_bytes_written_with_it() -> None:
    decode = Counting()
    rows = DecodedRows(decode, 4)
    value = {"n": 3}
    rows.remember(b"ada", b'{"n": 3}', value)
    assert rows.decode(b"ada", b'{"n": 3}') is value
    assert decode.calls == 0


def test_the_least_recently_used_key_leaves_first() -> None:
    decode = Counting()
    rows = DecodedRows(decode, 2)
    rows.decode(b"a", b"1")
    rows.decode(b"b", b"2")
    rows.decode(b"a", b"1")  # a is now the most recently used
    rows.decode(b"c", b"3")
    assert len(rows) == 2
    rows.decode(b"a", b"1")
    assert decode.calls == 3  # a stayed
    rows.decode(b"b", b"2")
    assert decode.calls == 4  # b had left


def test_size_zero_keeps_nothing() -> None:
    decode = Counting()
    rows = DecodedRows(decode, 0)
    rows.decode(b"a", b"1")
    rows.decode(b"a", b"1")
    assert decode.calls == 2
    assert len(rows) == 0
