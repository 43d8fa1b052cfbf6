"""The email writer (`services/dispatcher/channels/email/mime.py`) against the standard
library's compat32 build of the same message: the same bytes, whatever the content."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher.channels.email.mime import data_block, email_bytes, header_value

# What the dispatcher built its messages with before: lines in CRLF, folded past 998.
WIRE = email.policy.compat32.clone(linesep="\r\n", max_line_length=998)
BOUNDARY = "=_waypost_0123456789abcdef0123456789abcdef"


def reference(headers: list[tuple[str, str]], text: str, html: str | None) -> bytes:
    msg: Message
    if html:
        msg = MIMEMultipart("alternative", boundary=BOUNDARY, policy=WIRE)
        msg.attach(MIMEText(text, "plain", "utf-8", policy=WIRE))
        msg.attach(MIMEText(html, "html", "utf-8", policy=WIRE))
    else:
        msg = MIMEText(text, "plain", "utf-8", policy=WIRE)
    for name, value in headers:
        msg[name] = value
    return msg.as_bytes(policy=WIRE)


# Text as templates render it: any characters but lone surrogates (UTF-8 cannot hold them).
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=400)
one_line = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=120
)
long_ascii = st.text(st.sampled_from("abc xyz,;=<>/:?&"), min_size=900, max_size=1300)


@settings(max_examples=300, deadline=None)
@given(
    subject=one_line | long_ascii,
    text=texts,
    html=st.none() | texts,
    unsubscribe=st.none() | long_ascii | st.just("https://links.example.com/u/" + "x" * 1100),
)
def test_the_bytes_are_the_compat32_build_of_the_same_message(
    subject: str, text: str, html: str | None, unsubscribe: str | None
) -> None:
    headers = [
        ("From", "=?utf-8?q?Acme_Caf=C3=A9?= <hello@acme.example>"),
        ("To", header_value("To", "ada@example.com")),
        ("Subject", header_value("Subject", subject)),
        ("Date", "Sat, 05 Dec 2026 10:00:00 +0000"),
        ("Message-ID", "<m-1@waypost.local>"),
    ]
    if unsubscribe is not None:
        headers.append(("List-Unsubscribe", header_value("List-Unsubscribe", f"<{unsubscribe}>")))
    assert email_bytes(headers, text, html, BOUNDARY) == reference(headers, text, html)


def test_a_message_reads_back_as_written() -> None:
    subject = "Ein Geschenk für Zoë — 20 % Rabatt"
    headers = [("Subject", header_value("Subject", subject)), ("To", "ada@example.com")]
    raw = email_bytes(headers, "Hallo Zoë\n", "<p>Hallo Zoë</p>", BOUNDARY)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == subject
    parts = {part.get_content_type(): part.get_content() for part in parsed.iter_parts()}
    assert parts == {"text/plain": "Hallo Zoë\n", "text/html": "<p>Hallo Zoë</p>"}


@pytest.mark.parametrize("value", ["Hi\r\nBcc: x@example.com", "line\nbreak", "cr\ronly"])
def test_a_line_break_in_a_header_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="Subject"):
        header_value("Subject", value)


@pytest.mark.parametrize("mark", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x00", "\x7f"])
def test_a_control_character_goes_out_encoded_and_starts_no_header(mark: str) -> None:
    """Python's header folding takes some control characters for line breaks: such a value is
    written as encoded words, and stays one header (a reader may show the character as a
    space)."""
    subject = f"Hi{mark}Bcc: evil@example.com"
    raw = email_bytes([("Subject", header_value("Subject", subject))], "x", None, BOUNDARY)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert not any(line.startswith(b"Bcc") for line in head.split(b"\r\n"))
    assert mark.encode() not in head
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert parsed["Subject"] in (subject, subject.replace(mark, " "))


def test_the_data_block_stuffs_dots_and_ends_every_line_with_crlf() -> None:
    assert data_block(b".a\r\nb\n.\r.c") == b"..a\r\nb\r\n..\r\n..c\r\n"
    assert data_block(b"plain\r\n") == b"plain\r\n"


def _data_block_by_substitution(raw: bytes) -> bytes:
    """The data block the slow way: every line ending rewritten, every leading dot doubled."""
    block = re.sub(rb"(?m)^\.", b"..", re.sub(rb"\r\n|\r|\n", b"\r\n", raw))
    return block if block.endswith(b"\r\n") else block + b"\r\n"


@settings(max_examples=500)
@given(
    st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"a", b"..", b"\r\n."])).map(b"".join)
    | st.binary(max_size=200)
)
def test_the_data_block_of_a_message_already_in_crlf_is_the_substitutions_one(
    raw: bytes,
) -> None:
    """The shortcut for a message whose lines all end in CRLF gives the same bytes."""
    assert data_block(raw) == _data_block_by_substitution(raw)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_the_data_block_never_ends_data_early_and_the_server_reads_back_the_lines(
    raw: bytes,
) -> None:
    """No line of the block is the lone "." that ends DATA, and a server taking one "." off
    each line that starts with it (RFC 5321 4.5.2) reads the message's lines as written."""
    block = data_block(raw)
    assert block.endswith(b"\r\n")
    lines = block[:-2].split(b"\r\n")
    assert b"." not in lines
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    written = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    expected = written[:-1] if written.endswith(b"\n") else written
    assert unstuffed == expected.split(b"\n")
