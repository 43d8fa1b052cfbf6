"""SMTP replies read from a pipelined group's bytes (`parse_replies`): whole replies only, in
order, however the bytes were cut into segments; a line that is no reply is refused. The
stand-in protocol that collects a group's replies (`_Replies`) answers once all have come, and
fails the group on a surplus, an endless reply, a lost connection or an end of stream."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.dispatcher.channels.email.adapter import _Replies, parse_replies

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


class _SessionProtocol(asyncio.BaseProtocol):
    """What the stand-in passes on to the session's own protocol."""

    def __init__(self) -> None:
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.resumed = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


async def test_a_group_is_answered_once_every_reply_came_in_pieces() -> None:
    replies = _Replies(_SessionProtocol(), 3)
    for piece in (b"250 OK\r\n25", b"0-recipient\r\n250 fine\r", b"\n354 go ahead\r\n"):
        assert not replies.done.done()
        replies.data_received(piece)
    assert [(r.code, r.message) for r in replies.done.result()] == [
        (250, "OK"),
        (250, "recipient\nfine"),
        (354, "go ahead"),
    ]


@pytest.mark.parametrize(
    "wire", [b"250 OK\r\n250 OK\r\n354 go\r\n250 more\r\n", b"250 OK\r\n250 OK\r\n354 go\r\n25"]
)
async def test_more_than_a_reply_per_command_breaks_the_session(wire: bytes) -> None:
    replies = _Replies(_SessionProtocol(), 3)
    replies.data_received(wire)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="more replies than commands"):
        replies.done.result()


async def test_a_reply_that_never_ends_breaks_the_session() -> None:
    replies = _Replies(_SessionProtocol(), 3)
    replies.data_received(b"250-" + b"x" * 70_000)
    with pytest.raises(aiosmtplib.SMTPResponseException, match="too long"):
        replies.done.result()


async def test_a_lost_connection_fails_the_group_and_reaches_the_session() -> None:
    session = _SessionProtocol()
    replies = _Replies(session, 3)
    replies.data_received(b"250 OK\r\n")
    cause = ConnectionResetError("reset")
    replies.connection_lost(cause)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected) as raised:
        replies.done.result()
    assert raised.value.__cause__ is cause
    assert session.lost == [cause]  # the library's session learns it is closed


async def test_an_end_of_stream_fails_the_group_and_flow_control_passes_through() -> None:
    session = _SessionProtocol()
    replies = _Replies(session, 2)
    replies.pause_writing()
    replies.resume_writing()
    assert (session.paused, session.resumed) == (1, 1)
    assert replies.eof_received() is False  # the transport closes
    with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="EOF"):
        replies.done.result()
