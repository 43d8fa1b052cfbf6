"""SMTP replies read from a pipelined group's bytes (`parse_replies`): whole replies only, in
order, however the bytes were cut into segments; a line that is no reply is refused."""

from __future__ import annotations

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.dispatcher.channels.email.adapter import parse_replies

codes = st.integers(min_value=200, max_value=599)
texts = st.lists(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.strip
    ),
    min_size=1,
    max_size=3,
)


def _wire(code: int, lines: list[str]) -> bytes:
    return b"".join(
        f"{code}{'-' if n < len(lines) - 1 else ' '}{line}\r\n".encode()
        for n, line in enumerate(lines)
    )


def test_a_multi_line_reply_is_one_reply_and_an_incomplete_one_stays() -> None:
    buffer = bytearray(b"250-first\r\n250-second\r\n250 last\r\n354 go ahead\r\n550-half")
    replies = parse_replies(buffer)
    assert [(r.code, r.message) for r in replies] == [
        (250, "first\nsecond\nlast"),
        (354, "go ahead"),
    ]
    assert buffer == bytearray(b"550-half")


def test_a_bare_code_is_a_reply() -> None:
    assert [(r.code, r.message) for r in parse_replies(bytearray(b"250\r\n"))] == [(250, "")]


@pytest.mark.parametrize("line", [b"hello there\r\n", b"25 short\r\n", b"250x odd\r\n"])
def test_a_line_that_is_no_reply_is_refused(line: bytes) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed"):
        parse_replies(bytearray(line))


@given(st.lists(st.tuples(codes, texts), min_size=1, max_size=4), st.data())
def test_replies_are_the_same_however_the_bytes_are_cut(
    sent: list[tuple[int, list[str]]], data: st.DataObject
) -> None:
    wire = b"".join(_wire(code, lines) for code, lines in sent)
    cuts = sorted(data.draw(st.sets(st.integers(min_value=1, max_value=len(wire) - 1))))
    buffer = bytearray()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        buffer += wire[start:end]
        got += parse_replies(buffer)
    assert [(r.code, r.message) for r in got] == [(code, "\n".join(lines)) for code, lines in sent]
    assert buffer == bytearray()
