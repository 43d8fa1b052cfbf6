"""Request bodies from the public edge: read under a byte cap as they stream (gzip included),
parsed as JSON no deeper than a fixed nesting, every refusal naming the field it is about; and
YAML text (a definition typed or posted as text) read to the same bounds.

Ingest, the admin API and the CLI use it. Pure apart from the ASGI `receive` wrapper at the end.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar, Literal

import yaml
from pydantic_core import from_json

# No JSON value a client sends (properties, traits, context, a journey draft…) nests deeper:
# every reader downstream (the stream workers' rows wrap profiles and events a few levels more,
# and pydantic's JSON parser stops at 200) then has room to spare.
MAX_JSON_DEPTH = 32
# JSON is parsed with only its keys' strings cached: pydantic-core's parser caches every string by
# default, and the values of a body or a record (ids, timestamps, names) seldom repeat. The same
# values, parsed in about a third less time for a batch's calls, and an `Event` record decoded in
# about 5 % less (docs/ingest-performance.md).
STRINGS_CACHED: Literal["keys"] = "keys"
# The `Content-Encoding`s a body may come in (several SDKs gzip their batches).
ENCODINGS = ("identity", "gzip")

_JSON_ERROR_AT = re.compile(r" at line (\d+) column (\d+)$")
# What the path scanner needs of JSON: strings (keys and values) and structure.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


class BadInput(Exception):
    """Input refused at the edge: the HTTP status, and a message naming the field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class TooDeep(BadInput):
    """Input nested deeper than `MAX_JSON_DEPTH` (or than the parser goes): a 400 like any other
    refusal, told apart by readers that keep what they can of an answer (webhook results)."""


class BodyReader:
    """Collects a body chunk by chunk, refusing it (413) as soon as it is known to pass `limit`:
    first by `Content-Length`, then by the bytes received, then by the bytes decompressed, so a
    gzip bomb never allocates more than `limit`."""

    def __init__(self, limit: int, content_length: bytes | None, encoding: bytes | None) -> None:
        self.limit = limit
        if content_length is not None and content_length.isdigit():
            declared = int(content_length)
            if declared > limit:
                raise BadInput(
                    413,
                    f"request body is {declared} bytes (Content-Length); "
                    f"the limit is {limit} bytes",
                    field="Content-Length",
                )
        name = (encoding or b"identity").strip().lower()
        self._inflater = None
        if name == b"gzip" or name == b"x-gzip":
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif name != b"identity":
            shown = name.decode("latin-1")
            raise BadInput(
                415,
                f"Content-Encoding '{shown}' is not supported; send gzip or no encoding",
                field="Content-Encoding",
            )
        self._chunks: list[bytes] = []
        self._received = 0
        self._size = 0

    @property
    def compressed(self) -> bool:
        return self._inflater is not None

    def feed(self, chunk: bytes) -> None:
        """One more piece of the body as it came over the wire."""
        if not chunk:
            return
        self._received += len(chunk)
        if self._received > self.limit:
            raise BadInput(
                413, f"request body is over {self.limit} bytes; the limit is {self.limit} bytes"
            )
        if self._inflater is None:
            self._chunks.append(chunk)
            self._size += len(chunk)
            return
        self._inflate(chunk)

    def body(self) -> bytes:
        """The whole body, decompressed; call once the last chunk was fed."""
        if self._inflater is not None and not self._inflater.eof:
            raise BadInput(400, "body is not valid gzip: it ends early", field="Content-Encoding")
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def _inflate(self, chunk: bytes) -> None:
        assert self._inflater is not None
        room = self.limit - self._size + 1  # one byte more tells "over the limit" apart
        try:
            out = self._inflater.decompress(chunk, room)
        except zlib.error as exc:
            raise BadInput(400, f"body is not valid gzip: {exc}", field="Content-Encoding") from exc
        self._size += len(out)
        if self._size > self.limit or self._inflater.unconsumed_tail:
            raise BadInput(
                413,
                f"request body is over {self.limit} bytes once decompressed; "
                f"the limit is {self.limit} bytes",
            )
        if out:
            self._chunks.append(out)
        if self._inflater.eof and self._inflater.unused_data.strip(b"\x00"):
            raise BadInput(
                400, "body is not valid gzip: data after the end", field="Content-Encoding"
            )


def parse_json(body: bytes) -> Any:
    """The JSON value of `body`, or `BadInput` (400) naming where it is malformed: bad syntax, a
    lone surrogate in a string, or nesting too deep for the parser (`TooDeep`)."""
    try:
        return from_json(body, cache_strings=STRINGS_CACHED)
    except ValueError as exc:
        message = str(exc)
        offset = _offset_of(body, message)
        if "recursion limit" in message:
            path = deep_path_in(body, MAX_JSON_DEPTH)
            field = _field_of(_named_part(path)) if path else None
            raise TooDeep(400, _too_deep(field), field=field) from exc
        field = _field_of(path_at(body, offset)) if offset is not None else None
        where = f"{field}: " if field else ""
        raise BadInput(400, f"{where}body is not valid JSON: {message}", field=field) from exc


def parse_json_text(text: str, field: str) -> Any:
    """The JSON value of a request's text field (a form's box for an event, say), or
    `BadInput` (422) naming the field: bad syntax, a lone surrogate, or nesting past the limit."""
    try:
        value = from_json(text.encode("utf-8", "surrogatepass"))
    except ValueError as exc:
        detail = _too_deep(None) if "recursion limit" in str(exc) else f"not JSON: {exc}"
        raise BadInput(422, f"{field}: {detail}", field=field) from exc
    if too_deep(value) is not None:
        raise BadInput(422, f"{field}: {_too_deep(None)}", field=field)
    return value


def too_deep(value: Any, max_depth: int = MAX_JSON_DEPTH) -> list[str | int] | None:
    """The path to the first object or array nested more than `max_depth` levels inside `value`
    (an object or array directly in `value` is level 1), or None."""
    if type(value) is dict:
        items: Any = value.items()
    elif type(value) is list:
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if type(item) is dict or type(item) is list:
            if max_depth == 0:
                return [key]
            below = too_deep(item, max_depth - 1)
            if below is not None:
                return [key, *below]
    return None


def check_depth(fields: dict[str, Any], prefix: str = "") -> None:
    """`BadInput` (400) naming the first field of `fields` that nests deeper than the limit."""
    path = too_deep(fields, MAX_JSON_DEPTH)
    if path is not None:
        field = prefix + _field_of(path[:1])
        raise TooDeep(400, _too_deep(field), field=field)


_BRACKETS = b"{["


def few_containers(body: bytes) -> bool:
    """True when `body` has too few brackets to nest past the limit (most events): no need to
    walk it. (Deleting the brackets is one table-driven pass, in half the time of two `count`s,
    which compare byte by byte.)"""
    return len(body) - len(body.translate(None, _BRACKETS)) <= MAX_JSON_DEPTH


def path_at(body: bytes, offset: int) -> list[str | int]:
    """The path of the value being read at byte `offset` of a JSON document."""
    return _scan(body, stop_at=offset, max_depth=None) or []


def deep_path_in(body: bytes, max_depth: int) -> list[str | int] | None:
    """The path to the first container nested deeper than `max_depth` below the top level,
    read from the raw text (for documents too deep to parse)."""
    return _scan(body, stop_at=None, max_depth=max_depth + 1)


def _scan(body: bytes, stop_at: int | None, max_depth: int | None) -> list[str | int] | None:
    # Each level: [is_object, key or index, awaiting a key].
    stack: list[list[Any]] = []
    for token in _TOKENS.finditer(body):
        if stop_at is not None and token.start() >= stop_at:
            break
        text = token.group()
        if text in (b"{", b"["):
            if stack and not stack[-1][0] and stack[-1][1] is None:
                stack[-1][1] = 0
            stack.append([text == b"{", None, text == b"{"])
            if max_depth is not None and len(stack) > max_depth:
                return _path(stack)
        elif text in (b"}", b"]"):
            if stack:
                stack.pop()
        elif text == b",":
            if stack:
                level = stack[-1]
                if level[0]:
                    level[2] = True
                else:
                    level[1] = (level[1] or 0) + 1
        elif text == b":":
            if stack:
                stack[-1][2] = False
        elif stack:  # a string
            level = stack[-1]
            if level[0] and level[2]:
                level[1] = text[1:-1].decode("utf-8", errors="replace")
            elif not level[0] and level[1] is None:
                level[1] = 0
    if stop_at is None:
        return None
    return _path(stack)


def _path(stack: list[list[Any]]) -> list[str | int]:
    return [level[1] for level in stack if level[1] is not None]


def _named_part(path: list[str | int]) -> list[str | int]:
    """The path down to its first key that is not a list's name (`properties`,
    `batch[3].properties`): the field a client wrote, not the depths inside it."""
    for index, part in enumerate(path):
        if isinstance(part, str) and not (
            index + 1 < len(path) and isinstance(path[index + 1], int)
        ):
            return path[: index + 1]
    return path


def _field_of(path: list[str | int]) -> str:
    field = ""
    for part in path:
        if isinstance(part, int):
            field += f"[{part}]"
        else:
            field += f".{part}" if field else part
    return field


def _too_deep(field: str | None) -> str:
    where = f"{field}: " if field else ""
    return f"{where}nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays"


def _offset_of(body: bytes, message: str) -> int | None:
    found = _JSON_ERROR_AT.search(message)
    if found is None:
        return None
    line, column = int(found.group(1)), int(found.group(2))
    start = 0
    for _ in range(line - 1):
        start = body.find(b"\n", start) + 1
    return start + column - 1


# --- YAML text -------------------------------------------------------------------------------

# A definition as YAML text: the longest example journey is under 3,000 characters. PyYAML reads
# about 150,000 characters a second, so the cap also bounds the time one text can take.
MAX_YAML_CHARS = 200_000
# What a JSON value can hold; other tags (timestamps, binary, sets, ordered maps) are refused.
_JSON_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "seq", "map")
)
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class YamlRefused(ValueError):
    """YAML text that is not read: malformed, too big, too deep, or using what JSON cannot hold
    (`detail` says where: `line 3: …`)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _JsonValueLoader(yaml.SafeLoader):
    """PyYAML's safe loader, kept to JSON values: no aliases (an alias repeats a value, so a few
    bytes could stand for billions: "billion laughs"), containers no deeper than
    `MAX_JSON_DEPTH` (counted while composing, so a deep text never reaches Python's recursion
    limit), finite numbers, and a date or time left as the text it is."""

    yaml_constructors: ClassVar[dict[Any, Any]] = {
        tag: construct
        for tag, construct in yaml.SafeLoader.yaml_constructors.items()
        if tag is None or tag in _JSON_TAGS
    }
    yaml_implicit_resolvers: dict[Any, Any] = {  # noqa: RUF012 - PyYAML's own declaration
        first: [(tag, pattern) for tag, pattern in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "an alias (*name) is not allowed; write the value out",
                self._next_mark(),
            )
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_JSON_DEPTH + 1:  # the outermost container is not a level
                raise yaml.composer.ComposerError(None, None, _too_deep(None), self._next_mark())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _next_mark(self) -> Any:
        return self.peek_event().start_mark  # type: ignore[no-untyped-call]

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            value = super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # an integer of 5,000 digits, say
            problem = str(exc).split(";")[0]
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from exc
        if isinstance(value, float) and not math.isfinite(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value} is not a number JSON can hold", node.start_mark
            )
        return value


def read_yaml(text: str) -> Any:
    """The value of a YAML document as JSON would hold it, or `YamlRefused` saying where it is
    at fault: bad syntax, over `MAX_YAML_CHARS`, nested deeper than `MAX_JSON_DEPTH`, an alias,
    a tag JSON has no value for, a number that is not finite."""
    if len(text) > MAX_YAML_CHARS:
        raise YamlRefused(f"{len(text)} characters; the limit is {MAX_YAML_CHARS}")
    loader = None
    try:
        loader = _JsonValueLoader(text)  # reading starts here: a NUL is refused at once
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise YamlRefused(f"{where}{exc.problem or exc.context or 'not YAML'}") from exc
    except yaml.YAMLError as exc:
        raise YamlRefused("not YAML: " + " ".join(str(exc).split())) from exc
    except RecursionError as exc:  # not expected past the depth check; never a 500 either way
        raise YamlRefused(_too_deep(None)) from exc
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, field: str) -> Any:
    """`read_yaml` of a request's text field, or `BadInput` (422) naming the field."""
    try:
        return read_yaml(text)
    except YamlRefused as exc:
        raise BadInput(422, f"{field}: {exc.detail}", field=field) from exc


# --- ASGI: a byte cap on bodies a framework reads itself ------------------------------------

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


def capped_receive(
    receive: Receive, limit: int, refuse: Callable[[BadInput], Exception]
) -> Receive:
    """`receive`, raising `refuse(BadInput(413))` from inside the app's body read once more than
    `limit` bytes arrived (the app's own error handling answers it)."""
    received = 0

    async def capped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise refuse(
                    BadInput(413, f"request body is over {limit} bytes; the limit is {limit} bytes")
                )
        return message

    return capped
