"""Finding a document's anchors without parsing it whole gives what parsing it whole gives.

Link tracking reads each `<a>` start tag of an email's HTML (`shared.links._anchors`). A plain
document (text, start tags with quoted values, end tags) is only searched for its anchors;
any other is parsed whole by html.parser (`_parsed_anchors`). The two must agree on every
document, plain or not, down to each anchor's offset, raw text and attributes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.links import _PLAIN_DOCUMENT, _anchors, _parsed_anchors

# Pieces that make plain documents, and pieces that make any of html.parser's other paths:
# comments, declarations, script, bare and unbalanced values, a lone "<", odd whitespace.
TEXT = st.sampled_from(["Hi ", "Ann", " & ", "&amp;", "x > y", "\n", "Spring", "é"])
NAMES = st.sampled_from(["a", "A", "p", "img", "br", "abbr", "area", "span"])
ATTRIBUTE_NAMES = st.sampled_from(["href", "HREF", "data-link-id", "class", "title", "x:y"])
VALUES = st.sampled_from(["https://shop.example/sale", "https://a.example/?a=1&amp;b=2", "", "/"])
SPACES = st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "\f"])


@st.composite
def attributes(draw: st.DrawFn) -> str:
    name = draw(ATTRIBUTE_NAMES)
    if draw(st.booleans()):
        return name
    quote = draw(st.sampled_from(['"', "'"]))
    around = draw(st.sampled_from(["", " "]))
    return f"{name}{around}={around}{quote}{draw(VALUES)}{quote}"


@st.composite
def start_tags(draw: st.DrawFn) -> str:
    attrs = "".join(draw(SPACES) + a for a in draw(st.lists(attributes(), max_size=3)))
    space = draw(st.sampled_from(["", " "]))
    return f"<{draw(NAMES)}{attrs}{space}{draw(st.sampled_from(['>', '/>']))}"


PLAIN_PIECES = st.one_of(TEXT, start_tags(), NAMES.map(lambda name: f"</{name}>"))
ODD_PIECES = st.sampled_from(
    [
        "<!-- ",
        " -->",
        "<!DOCTYPE html>",
        "<?xml ?>",
        "<script>",
        "</script>",
        "<style>",
        "<a href=https://shop.example/sale>",
        '<a href="https://shop.example/sale>',
        "<a\x0bhref='x'>",
        "<a / >",
        "< a href='y'>",
        "<",
        ">",
        "</ a>",
        "<![CDATA[",
        "]]>",
        '"',
        "'",
        "=",
        "<a",
        "<p title='<a href=\"z\">'>",
    ]
)


@given(st.lists(PLAIN_PIECES, max_size=12).map("".join))
@settings(max_examples=400, deadline=None)
def test_a_plain_document_is_searched_and_finds_what_parsing_finds(document: str) -> None:
    assert _PLAIN_DOCUMENT.fullmatch(document)
    assert _anchors(document) == _parsed_anchors(document)


@given(st.lists(st.one_of(PLAIN_PIECES, ODD_PIECES), max_size=12).map("".join))
@settings(max_examples=600, deadline=None)
def test_any_document_finds_what_parsing_finds(document: str) -> None:
    assert _anchors(document) == _parsed_anchors(document)


def test_what_is_not_plain_is_parsed_whole() -> None:
    for document in (
        '<!-- <a href="x"> -->',
        '<script><a href="x"></script>',
        "<a href=x>",
        "a < b",
        '<a\x0bhref="x">',
        "<p title='<a href=\"x\">'>",
    ):
        assert not _PLAIN_DOCUMENT.fullmatch(document), document
    assert _anchors('<!-- <a href="x"> --><a href="y">') == [(21, '<a href="y">', {"href": "y"})]
