"""The bytes of an email as sent in DATA, written directly.

The standard library's compat32 classes (`email.mime`) and its generator made the same bytes at
about 500 µs of CPU per message, most of it folding headers that never need folding (each
header value goes through `email.header.Header`, whatever its length). This writer makes the
bytes in a few tens of µs: the same headers in the same order, the same base64 parts, the same
boundary lines. `tests/unit/test_mime.py` holds it byte for byte to the compat32 build.

Header values are given as they go on the wire (ASCII, RFC 2047 encoded words where needed;
`header_value`). A header line longer than SMTP's 998 characters is folded the way the
generator folds it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from email.header import Header

CRLF = b"\r\n"
# RFC 5322's limit on a line, without its CRLF.
MAX_LINE = 998
_LINE_BREAKS = ("\r", "\n")
# A line ending other than CRLF (a lone CR or LF), and a line that starts with ".".
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
# Control characters other than tab. Python's header folding takes several of them (such as
# \x0b and \x1e) for line breaks, so a value holding one goes out as encoded words.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TEXT_PART = (
    'Content-Type: text/{subtype}; charset="utf-8"\r\n'
    "MIME-Version: 1.0\r\n"
    "Content-Transfer-Encoding: base64\r\n"
)


def header_value(name: str, value: str) -> str:
    """A header value as given when it is one line of printable ASCII, else as RFC 2047 encoded
    words on one line; a line break is refused (it would start a header of the value's
    choosing)."""
    control = _CONTROL.search(value) is not None
    if control and any(mark in value for mark in _LINE_BREAKS):
        raise ValueError(f"Header values may not contain linefeed or carriage return ({name})")
    if value.isascii() and not control:
        return value
    # Encoded words of at most 75 characters each (RFC 2047), on one line.
    return Header(value, "utf-8", header_name=name).encode(splitchars=" ", linesep=" ")


def header_line(name: str, value: str) -> str:
    """`name: value` and its CRLF; `value` is ASCII (`header_value`). Folded only past the line
    limit, as the compat32 generator folds it: a long List-Unsubscribe stays on one line, since
    folding it breaks DKIM in some clients."""
    if len(name) + 2 + len(value) <= MAX_LINE:
        return f"{name}: {value}\r\n"
    folded = Header(value, header_name=name).encode(linesep="\r\n", maxlinelen=MAX_LINE)
    return f"{name}: {folded}\r\n"


def _base64_lines(text: str) -> bytes:
    """UTF-8 text as base64 in lines of 76 characters, each ending in CRLF."""
    return base64.encodebytes(text.encode("utf-8")).replace(b"\n", CRLF)


def _text_part(subtype: str, text: str, headers: str = "") -> bytes:
    head = _TEXT_PART.format(subtype=subtype) + headers + "\r\n"
    return head.encode("ascii") + _base64_lines(text)


def email_bytes(
    headers: Sequence[tuple[str, str]], text: str, html: str | None, boundary: str
) -> bytes:
    """The message: `headers` (name, wire value) after the MIME headers; the text alone, or
    the text and the HTML as alternatives between `boundary` lines. Both parts are base64, so
    no line of theirs can be a boundary line of a boundary with "-" or "_" in it."""
    written = "".join(header_line(name, value) for name, value in headers)
    if not html:
        return _text_part("plain", text, written)
    return b"".join(
        (
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
            f"MIME-Version: 1.0\r\n{written}\r\n--{boundary}\r\n".encode("ascii"),
            _text_part("plain", text),
            f"\r\n--{boundary}\r\n".encode("ascii"),
            _text_part("html", html),
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        )
    )


def data_block(raw: bytes) -> bytes:
    """A message as written after DATA, without the "." line that ends it (RFC 5321 4.5.2):
    every line ending CRLF, a line starting with "." given another, and a CRLF at the end.

    The messages `email_bytes` writes already end every line with CRLF and rarely start one
    with ".": three counts and a search tell so, at a tenth of what the substitutions cost
    (they rewrite every line ending, a few µs per kilobyte)."""
    crlf = raw.count(CRLF)
    if raw.count(b"\r") == crlf == raw.count(b"\n"):
        block = (
            raw if not raw.startswith(b".") and b"\n." not in raw else _LEADING_DOT.sub(b"..", raw)
        )
    else:
        block = _LEADING_DOT.sub(b"..", _BARE_LINE_END.sub(CRLF, raw))
    return block if block.endswith(CRLF) else block + CRLF
