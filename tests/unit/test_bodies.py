"""Bodies at the edge: byte caps while streaming, gzip with a cap on what it inflates to, JSON
nesting and malformed strings refused with the field named; YAML and JSON text fields read to the
same bounds (no aliases, no deep nesting, JSON values only)."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from shared.bodies import (
    MAX_JSON_DEPTH,
    MAX_YAML_CHARS,
    BadInput,
    BodyReader,
    YamlRefused,
    check_depth,
    few_containers,
    parse_json,
    parse_json_text,
    parse_yaml,
    read_yaml,
    too_deep,
)


def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = {"a": value}
    return value


def nested_text(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    with pytest.raises(BadInput) as refused:
        BodyReader(100, b"101", None)

    assert refused.value.status == 413
    assert refused.value.field == "Content-Length"


def test_a_body_is_refused_at_the_chunk_that_passes_the_cap() -> None:
    reader = BodyReader(100, None, None)
    reader.feed(b"x" * 60)

    with pytest.raises(BadInput) as refused:
        reader.feed(b"x" * 41)

    assert refused.value.status == 413


def test_chunks_within_the_cap_are_joined() -> None:
    reader = BodyReader(100, b"6", None)
    for chunk in (b"ab", b"", b"cd", b"ef"):
        reader.feed(chunk)

    assert reader.body() == b"abcdef"


def test_a_gzip_body_is_inflated() -> None:
    original = json.dumps({"userId": "u", "event": "Signed Up"}).encode()
    packed = gzip.compress(original)
    reader = BodyReader(1000, None, b"gzip")
    for start in range(0, len(packed), 7):
        reader.feed(packed[start : start + 7])

    assert reader.body() == original


def test_a_gzip_bomb_is_refused_without_inflating_past_the_cap() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB of zeros, about 50 KB packed
    reader = BodyReader(64 * 1024, None, b"gzip")

    with pytest.raises(BadInput) as refused:
        reader.feed(bomb[: 64 * 1024])

    assert refused.value.status == 413
    assert "decompressed" in refused.value.message
    assert sum(len(chunk) for chunk in reader._chunks) <= 64 * 1024


def test_packed_bytes_count_against_the_cap_too() -> None:
    reader = BodyReader(10, None, b"gzip")

    with pytest.raises(BadInput) as refused:
        reader.feed(gzip.compress(b"x" * 100))

    assert refused.value.status == 413


@pytest.mark.parametrize(
    "packed",
    [b"not gzip at all", gzip.compress(b'{"a":1}')[:-6], zlib.compress(b'{"a":1}')],
    ids=["garbage", "truncated", "zlib-not-gzip"],
)
def test_broken_gzip_is_a_bad_request_naming_the_encoding(packed: bytes) -> None:
    def read() -> bytes:
        reader = BodyReader(1000, None, b"gzip")
        reader.feed(packed)
        return reader.body()

    with pytest.raises(BadInput) as refused:
        read()

    assert refused.value.status == 400
    assert refused.value.field == "Content-Encoding"


def test_an_encoding_other_than_gzip_is_unsupported() -> None:
    with pytest.raises(BadInput) as refused:
        BodyReader(1000, None, b"br")

    assert refused.value.status == 415
    assert refused.value.field == "Content-Encoding"


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_not() -> None:
    assert too_deep({"properties": nested(MAX_JSON_DEPTH)}) is None
    path = too_deep({"properties": nested(MAX_JSON_DEPTH + 1)})

    assert path is not None
    assert path[0] == "properties"


def test_check_depth_names_the_field_with_its_prefix() -> None:
    with pytest.raises(BadInput) as refused:
        check_depth({"event": "x", "traits": [nested(MAX_JSON_DEPTH)]}, prefix="batch[3].")

    assert refused.value.status == 400
    assert refused.value.field == "batch[3].traits"


@pytest.mark.parametrize("levels", [250, 5000])
def test_a_document_too_deep_to_parse_names_the_field(levels: int) -> None:
    body = ('{"userId":"u","context":' + nested_text(levels) + "}").encode()

    with pytest.raises(BadInput) as refused:
        parse_json(body)

    assert refused.value.status == 400
    assert refused.value.field == "context"
    assert f"deeper than {MAX_JSON_DEPTH} levels" in refused.value.message


def test_a_too_deep_batch_item_is_named_by_its_index() -> None:
    items = ['{"event":"ok"}', '{"properties":' + nested_text(300) + "}"]
    body = ('{"batch":[' + ",".join(items) + "]}").encode()

    with pytest.raises(BadInput) as refused:
        parse_json(body)

    assert refused.value.field == "batch[1].properties"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (rb'{"userId":"u","event":"E\ud800"}', "event"),
        (rb'{"userId":"u","properties":{"name":"\udc00x"}}', "properties.name"),
        (b'{"userId":"u","event":"E\xed\xa0\x80"}', "event"),
        (b'{"userId":"u","properties":{"a":[1,2,}}', "properties.a[2]"),
    ],
    ids=["lone-high", "lone-low", "utf8-encoded-surrogate", "syntax"],
)
def test_malformed_json_and_lone_surrogates_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(BadInput) as refused:
        parse_json(body)

    assert refused.value.status == 400
    assert refused.value.field == field


def test_paired_surrogates_are_a_character_like_any_other() -> None:
    assert parse_json(rb'{"emoji":"\ud83d\ude00"}') == {"emoji": "\U0001f600"}


def test_a_body_with_few_brackets_needs_no_walk() -> None:
    assert few_containers(b'{"properties":{"a":[1]}}')
    assert not few_containers(("[" * (MAX_JSON_DEPTH + 1)).encode())


@pytest.mark.parametrize("opening", ["{", "[", "{["])
def test_every_opening_bracket_counts_and_nothing_else(opening: str) -> None:
    """Objects and arrays count alike, wherever they are (in a string too: the count only ever
    sends a body to the walk); closing brackets and other bytes do not."""
    half = MAX_JSON_DEPTH // 2
    at_limit = (opening * MAX_JSON_DEPTH)[:MAX_JSON_DEPTH]
    assert few_containers(f'"{at_limit}"'.encode() + b"}]" * MAX_JSON_DEPTH + b"\x00\xff")
    assert not few_containers(f'"{at_limit}"{opening[0]}'.encode())
    assert few_containers(b'{"a":[' * half)
    assert not few_containers(b'{"a":[' * half + b"[")


# --- YAML and JSON text fields ----------------------------------------------------------------

# Nine anchors, each a list of nine of the one before: a billion copies of "lol" once expanded.
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{', '.join(['*' + before] * 9)}]\n"
    for before, name in zip("abcdefgh", "bcdefghi", strict=True)
)


def nested_yaml(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


def test_a_yaml_text_reads_as_the_json_value_it_spells() -> None:
    lines = ["journey:", "  id: j", "  at: 2026-03-01T10:00:00Z", "  day: 2026-13-45"]
    text = "\n".join([*lines, "  n: [1, 2.5, yes, ~]"])

    assert read_yaml(text) == {
        "journey": {
            "id": "j",
            "at": "2026-03-01T10:00:00Z",  # a time stays the text it is, as in JSON
            "day": "2026-13-45",  # so a date that is no date is not an error
            "n": [1, 2.5, True, None],
        }
    }
    assert read_yaml(nested_yaml(MAX_JSON_DEPTH + 1)) is not None  # the outermost is no level


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (nested_yaml(MAX_JSON_DEPTH + 2), "line 1: nested deeper than 32 levels"),
        (nested_yaml(3000), "line 1: nested deeper than 32 levels"),
        ("a:\n" + "".join("  " * i + "- \n" for i in range(1, 40)), "line 34: nested deeper"),
        (ALIAS_BOMB, "line 2: an alias (*name) is not allowed"),
        ("a: &x [1]\nb: *x\n", "line 2: an alias (*name) is not allowed"),
        ("a: .nan\n", "line 1: .nan is not a number JSON can hold"),
        ("a: -.inf\n", "line 1: -.inf is not a number JSON can hold"),
        ("a: " + "7" * 5000, "line 1: Exceeds the limit (4300 digits)"),
        ("a: !!binary aGk=\n", "line 1: could not determine a constructor for the tag"),
        ("a: !!set {x}\n", "line 1: could not determine a constructor for the tag"),
        ("a: !!timestamp 2026-03-01\n", "line 1: could not determine a constructor"),
        ("a: !!python/object/apply:os.system [ls]\n", "line 1: could not determine"),
        ("? [1]\n: 2\n", "line 1: found unhashable key"),
        ("a: [\n", "line 2: expected the node content"),
        ("a: \x00\n", "not YAML: unacceptable character #x0000"),
        ("a: \ud800\n", "not YAML: unacceptable character #xd800"),
        ("a: " + "x" * MAX_YAML_CHARS, f"characters; the limit is {MAX_YAML_CHARS}"),
    ],
    ids=[
        "34-levels",
        "3000-levels",
        "block-nesting",
        "alias-bomb",
        "alias",
        "nan",
        "infinity",
        "5000-digits",
        "binary",
        "set",
        "timestamp-tag",
        "python-tag",
        "unhashable-key",
        "syntax",
        "nul",
        "lone-surrogate",
        "too-long",
    ],
)
def test_yaml_text_that_json_could_not_hold_or_that_would_not_end_is_refused_saying_where(
    text: str, said: str
) -> None:
    with pytest.raises(YamlRefused) as refused:
        read_yaml(text)

    assert said in refused.value.detail


def test_a_refused_yaml_field_is_a_422_naming_the_field() -> None:
    with pytest.raises(BadInput) as refused:
        parse_yaml(ALIAS_BOMB, "definition")

    assert refused.value.status == 422
    assert refused.value.field == "definition"
    assert refused.value.message.startswith("definition: line 2: an alias")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[" * 3000 + "]" * 3000, "events: nested deeper than 32 levels"),
        (nested_text(MAX_JSON_DEPTH + 2), "events: nested deeper than 32 levels"),
        ('[{"event": "\\ud800"}]', "events: not JSON"),
        ('[{"event": "\ud800"}]', "events: not JSON"),
        ("[{]", "events: not JSON"),
    ],
    ids=["3000-levels", "34-levels", "escaped-lone-surrogate", "lone-surrogate", "syntax"],
)
def test_a_json_text_field_is_refused_with_a_422_naming_the_field(text: str, said: str) -> None:
    with pytest.raises(BadInput) as refused:
        parse_json_text(text, "events")

    assert (refused.value.status, refused.value.field) == (422, "events")
    assert refused.value.message.startswith(said)


def test_a_json_text_field_within_the_limits_is_read() -> None:
    assert parse_json_text('[{"event": "Order Completed", "after": "1h"}]', "events") == [
        {"event": "Order Completed", "after": "1h"}
    ]
    # The outermost container is no level, as in a body (`too_deep`).
    deepest = nested_text(MAX_JSON_DEPTH + 1)
    assert parse_json_text(deepest, "events") == nested(MAX_JSON_DEPTH + 1)
