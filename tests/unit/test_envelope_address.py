"""MAIL and RCPT carry each address as aiosmtplib's `quote_address` would write it; the
dispatcher quotes plain addresses itself (`envelope_address`), and must agree byte for byte."""

from __future__ import annotations

import pytest
from aiosmtplib.email import quote_address
from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher.channels.email.adapter import envelope_address

ATOM = st.text("abcXYZ019_%+-", min_size=1, max_size=6)
PLAIN = st.builds(
    lambda local, domain: ".".join(local) + "@" + ".".join(domain),
    st.lists(ATOM, min_size=1, max_size=3),
    st.lists(st.text("abcXYZ019-", min_size=1, max_size=6), min_size=1, max_size=3),
)


def _library(address: str) -> bytes:
    return quote_address(address).encode("ascii")


@settings(max_examples=500)
@given(PLAIN)
def test_a_plain_address_is_quoted_as_the_library_quotes_it(address: str) -> None:
    assert envelope_address(address) == _library(address)


@settings(max_examples=500)
@given(st.text("ab.@<>\"' ()\\,;:%+-_é", max_size=24))
def test_any_other_address_is_quoted_by_the_library(address: str) -> None:
    try:
        expected = _library(address)
    except ValueError as exc:  # UnicodeEncodeError among them: the same error either way
        with pytest.raises(type(exc)):
            envelope_address(address)
        return
    assert envelope_address(address) == expected


@pytest.mark.parametrize(
    ("address", "quoted"),
    [
        ("shopper-1@example.com", b"<shopper-1@example.com>"),
        ("Waypost <news@waypost.example>", b"<news@waypost.example>"),
        ("a..b@example.com", _library("a..b@example.com")),
        ('"odd local"@example.com', _library('"odd local"@example.com')),
    ],
)
def test_examples(address: str, quoted: bytes) -> None:
    assert envelope_address(address) == quoted
