"""Signed links that reach the ingest service: unsubscribe, open pixel, click and SMS status.

The dispatcher writes them into messages; ingest reads them back. Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import html
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any, Literal, get_args

from pydantic_core import to_json

LinkKind = Literal["unsubscribe", "open", "click", "sms_status"]
LINK_KINDS: tuple[LinkKind, ...] = get_args(LinkKind)

# Mail clients keep messages for years, but tracking a 13-month-old open is no longer useful
# and bounds how long a leaked link can write events; unsubscribing must always work.
TRACKING_LINK_LIFETIME_SECONDS = 400 * 24 * 3600
_EXPIRING: frozenset[LinkKind] = frozenset({"open", "click"})

# Short keys keep tokens (and so URLs) short; `url` is the longest part of a click token.
_KEYS: dict[str, str] = {
    "kind": "k",
    "message_id": "m",
    "contact_key": "c",
    "is_user": "u",
    "channel": "ch",
    "template_id": "t",
    "journey_id": "j",
    "step_id": "s",
    "link_id": "l",
    "url": "r",
    "issued_at": "i",
}
_FIELDS = {short: name for name, short in _KEYS.items()}
# The order a token's JSON writes them in: by short key.
_SORTED_KEYS = tuple(sorted(_KEYS.items(), key=lambda item: item[1]))
_REQUIRED_TEXT = ("message_id", "contact_key", "channel")
_OPTIONAL_TEXT = ("template_id", "journey_id", "step_id", "link_id", "url")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# Far above any token we sign (a click token carries its destination URL), far below a URL
# that costs anything to check.
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True)
class LinkClaims:
    """What a signed link says about the message it came in."""

    kind: LinkKind
    message_id: str
    contact_key: str
    is_user: bool  # contact_key is a userId (else an anonymousId)
    channel: str
    template_id: str | None = None
    journey_id: str | None = None
    step_id: str | None = None
    link_id: str | None = None  # click only
    url: str | None = None  # click only: the original destination
    issued_at: int = 0  # unix seconds


class InvalidLink(Exception):
    """A token that is malformed, badly signed, of another kind or expired."""


class LinkSigner:
    """Signs and verifies link tokens with one server secret (HMAC-SHA256)."""

    def __init__(self, secret: str, public_url: str) -> None:
        if not secret:
            raise ValueError("the link secret must not be empty")
        self._key = secret.encode()
        self.public_url = public_url.rstrip("/")

    def token(self, claims: LinkClaims) -> str:
        """`base64url(claims JSON)` + "." + `base64url(signature)`, without padding."""
        payload = _b64encode(_claims_json(claims))
        return f"{payload}.{self._signature(claims.kind, payload)}"

    def read(self, token: str, kind: LinkKind, now: datetime) -> LinkClaims:
        """The claims of a token of `kind`, or `InvalidLink` saying why not.

        The signature is checked before anything of the payload is decoded: only tokens we
        signed are ever parsed."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidLink(f"malformed token: longer than {MAX_TOKEN_CHARS} characters")
        payload, sep, signature = token.partition(".")
        if not sep or not _BASE64URL.fullmatch(payload) or not _BASE64URL.fullmatch(signature):
            raise InvalidLink("malformed token")
        # The signature covers the kind it was issued for: a token that verifies for another
        # kind is intact but in the wrong place, one that verifies for none was tampered with.
        if not hmac.compare_digest(signature, self._signature(kind, payload)):
            others = (k for k in LINK_KINDS if k != kind)
            issued_as = next(
                (k for k in others if hmac.compare_digest(signature, self._signature(k, payload))),
                None,
            )
            if issued_as is None:
                raise InvalidLink("bad signature")
            raise InvalidLink(f"wrong kind: a {issued_as} link, not {kind}")
        claims = _claims_from_json(_b64decode(payload))
        if claims.kind != kind:
            raise InvalidLink(f"wrong kind: a {claims.kind} link, not {kind}")
        if (
            kind in _EXPIRING
            and now.timestamp() > claims.issued_at + TRACKING_LINK_LIFETIME_SECONDS
        ):
            raise InvalidLink("expired link")
        return claims

    def unsubscribe_url(self, claims: LinkClaims) -> str:
        return f"{self.public_url}/u/{self.token(_as(claims, 'unsubscribe'))}"

    def open_url(self, claims: LinkClaims) -> str:
        return f"{self.public_url}/o/{self.token(_as(claims, 'open'))}.gif"

    def click_url(self, claims: LinkClaims) -> str:
        return f"{self.public_url}/c/{self.token(_as(claims, 'click'))}"

    def sms_status_url(self, claims: LinkClaims) -> str:
        return f"{self.public_url}/v1/sms/status/{self.token(_as(claims, 'sms_status'))}"

    def _signature(self, kind: str, payload: str) -> str:
        signed = f"{kind}.{payload}".encode()
        return _b64encode(hmac.new(self._key, signed, hashlib.sha256).digest())


def link_id_of(url: str) -> str:
    """A stable id of a destination: the first 10 hex digits of its SHA-256."""
    return hashlib.sha256(url.encode()).hexdigest()[:10]


def urls_written_in(*sources: str | None) -> frozenset[str]:
    """The web URLs written literally in template sources (before rendering): the only ones
    `track_email` may rewrite. A URL that comes from data, or is put together from a literal
    and data (`https://shop.example/p/{{ id }}`), is not among them."""
    found: set[str] = set()
    for source in sources:
        if source:
            found |= _urls_in(source)
    return frozenset(found)


@lru_cache(maxsize=256)
def _urls_in(source: str) -> frozenset[str]:
    # Every form a written URL can take once rendered and read back: as written, with its
    # entities decoded (an href's `&amp;`), and without the trailing punctuation that the text
    # rewriting leaves out. Each is a string of the source, so data can never add one.
    found: set[str] = set()
    for match in _TEXT_URL.finditer(source):
        for url in (match.group(0), html.unescape(match.group(0))):
            found.update((url, url.strip(), _trim_url(url)[0]))
    return frozenset(found)


def track_email(
    html: str | None,
    text: str,
    signer: LinkSigner,
    base: LinkClaims,
    *,
    opens: bool,
    clicks: bool,
    template_urls: Collection[str],
) -> tuple[str | None, str]:
    """Rewrite http(s) links for click tracking and add the open pixel (HTML only).

    Only links in `template_urls` (`urls_written_in` the template's sources) are tracked: a
    URL that arrived in profile or event data stays as it is, or tracking would turn it into a
    signed redirect through our domain (an open redirect). Links to the unsubscribe page (and
    to tracking itself) are left alone, as are mailto: and tel:. An anchor's `data-link-id`
    names its link, else `link_id_of(url)`. The same input gives the same output: `issued_at`
    comes from `base`.
    """
    untracked = tuple(f"{signer.public_url}/{route}/" for route in ("u", "c", "o"))
    # A link written in both the HTML and the text is signed once (the same claims give the
    # same token).
    signed: dict[tuple[str, str | None], str] = {}

    def tracked(url: str, link_id: str | None) -> str | None:
        if not _is_web_url(url) or url.startswith(untracked) or url not in template_urls:
            return None
        found = signed.get((url, link_id))
        if found is not None:
            return found
        claims = dataclasses.replace(
            base, kind="click", link_id=link_id or link_id_of(url), url=url
        )
        signed[(url, link_id)] = click = signer.click_url(claims)
        return click

    new_html = html
    if new_html is not None and clicks:
        new_html = _rewrite_anchors(new_html, tracked)
    if new_html is not None and opens:
        new_html = _with_pixel(new_html, signer.open_url(base))
    new_text = _rewrite_text_urls(text, tracked) if clicks else text
    return new_html, new_text


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """`X-Twilio-Signature`: base64 HMAC-SHA1 of the URL followed by each sorted name+value."""
    signed = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_signature_valid(
    url: str, params: Mapping[str, str], auth_token: str, signature: str
) -> bool:
    expected = twilio_signature(url, params, auth_token)
    return hmac.compare_digest(expected.encode(), signature.encode())


# --- tokens ----------------------------------------------------------------------------------


def _as(claims: LinkClaims, kind: LinkKind) -> LinkClaims:
    return claims if claims.kind == kind else dataclasses.replace(claims, kind=kind)


def _claims_json(claims: LinkClaims) -> bytes:
    """Compact JSON with the short keys in sorted order. Every field is a plain value, read
    directly: `dataclasses.asdict`'s deep copy was most of the cost of a token (several per
    email), and the json module's encoder, built again for every call with these options,
    most of the rest (5.4 µs a token, against 1.5 with pydantic-core's encoder, which writes
    text other than ASCII as UTF-8 rather than as escapes: the reader takes both)."""
    compact: dict[str, Any] = {}
    for name, short in _SORTED_KEYS:
        value = getattr(claims, name)
        if value is not None:
            compact[short] = value
    compact["u"] = int(claims.is_user)
    return to_json(compact)


def _claims_from_json(raw: bytes) -> LinkClaims:
    try:
        decoded = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidLink("malformed token") from exc
    if not isinstance(decoded, dict) or not set(decoded) <= set(_FIELDS):
        raise InvalidLink("malformed token")
    fields: dict[str, Any] = {_FIELDS[short]: value for short, value in decoded.items()}
    kind = fields.get("kind")
    issued_at = fields.get("issued_at", 0)
    well_formed = (
        kind in LINK_KINDS
        and all(isinstance(fields.get(name), str) for name in _REQUIRED_TEXT)
        and all(isinstance(fields.get(name, ""), str) for name in _OPTIONAL_TEXT)
        and fields.get("is_user") in (0, 1)
        and type(issued_at) is int
    )
    if not well_formed:
        raise InvalidLink("malformed token")
    fields["is_user"] = bool(fields["is_user"])
    return LinkClaims(**fields)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidLink("malformed token") from exc


# --- rewriting -------------------------------------------------------------------------------

# An attribute inside a start tag, as html.parser itself reads them: name, then an optional
# value that is double-quoted, single-quoted or bare.
_ATTRIBUTE = re.compile(
    r"""(?P<name>[^\s/>][^\s/=>]*)(?:\s*=\s*(?P<value>"[^"]*"|'[^']*'|(?!['"])[^>\s]*))?"""
)
_TAG_NAME = re.compile(r"<[a-zA-Z][^\t\n\r\f />\x00]*")
# Bare URLs in plain text end before whitespace and characters that cannot end a URL there.
_TEXT_URL = re.compile(r"""https?://[^\s<>"']+""", re.IGNORECASE)
_TRAILING_PUNCTUATION = ".,;:!?"
_CLOSING = {")": "(", "]": "[", "}": "{"}
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
# Given a link's url and data-link-id, its tracked url, or None to leave it as it is.
_Tracker = Callable[[str, str | None], str | None]


class _AnchorFinder(HTMLParser):
    """Collects where each `<a>` start tag is, its raw text and its (unescaped) attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[tuple[int, int], str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._anchor(tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._anchor(tag, attrs)

    def _anchor(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raw = self.get_starttag_text()
        if tag == "a" and raw is not None:
            # The first occurrence wins, as in browsers and in html.parser's own dict(attrs).
            first: dict[str, str | None] = {}
            for name, value in attrs:
                first.setdefault(name, value)
            self.anchors.append((self.getpos(), raw, first))


# A document that is only text without "<", start tags with quoted attribute values free of
# "<" and ">", and end tags: html.parser reads every "<" in it as the start of the tag there
# (no comment, declaration, script or style to read otherwise, no bare value), so its anchors
# are found without parsing the text between them. Whitespace is spelled out: html.parser's
# tag names end only at these five, where `\s` would also take a vertical tab. Possessive
# and atomic throughout: a document that is not plain fails at once, never backtracking.
_WS = r"[ \t\n\r\f]"
_PLAIN_DOCUMENT = re.compile(
    rf"""(?:
        [^<]++
        | <(?!(?i:script|style)(?:{_WS}|/|>))[a-zA-Z][a-zA-Z0-9]*+
          (?>{_WS}++[a-zA-Z_:][-a-zA-Z0-9_:.]*+(?:{_WS}*+={_WS}*+(?:"[^"<>]*+"|'[^'<>]*+'))?)*+
          {_WS}*+/?>
        | </[a-zA-Z][a-zA-Z0-9]*+{_WS}*+>
    )*+""",
    re.VERBOSE,
)
_ANCHOR_TAG = re.compile(rf"<[aA](?={_WS}|/|>)[^>]*>")


def _anchors(document: str) -> list[tuple[int, str, dict[str, str | None]]]:
    """Each `<a>` start tag of the document: its offset, raw text and attributes (the first of
    a repeated name), as html.parser reads them. A plain document (`_PLAIN_DOCUMENT`) is
    only searched for its anchors, each read alone by the parser (the same attributes, in
    a fraction of the time: most of an email's parse was its other tags and text); any
    other is parsed whole."""
    if not _PLAIN_DOCUMENT.fullmatch(document):
        return _parsed_anchors(document)
    return [
        (match.start() + offset, raw, attrs)
        for match in _ANCHOR_TAG.finditer(document)
        for offset, raw, attrs in _anchor_alone(match.group(0))
    ]


@lru_cache(maxsize=4096)
def _anchor_alone(tag: str) -> tuple[tuple[int, str, dict[str, str | None]], ...]:
    """`_parsed_anchors` of one anchor tag, remembered: a template's anchors come back in every
    message rendered from it, and html.parser took about 7 µs to read one again. The
    attributes are shared by every caller, so they are only read."""
    return tuple(_parsed_anchors(tag))


def _parsed_anchors(document: str) -> list[tuple[int, str, dict[str, str | None]]]:
    """`_anchors` by parsing the whole document."""
    finder = _AnchorFinder()
    finder.feed(document)
    finder.close()
    line_starts = [0]
    line_starts.extend(m.end() for m in re.finditer("\n", document))
    return [
        (line_starts[line - 1] + column, raw, attrs)
        for (line, column), raw, attrs in finder.anchors
    ]


def _rewrite_anchors(document: str, tracked: _Tracker) -> str:
    pieces: list[str] = []
    done = 0
    for start, raw, attrs in _anchors(document):
        if document[start : start + len(raw)] != raw:
            continue  # not where the parser says: leave it rather than guess
        href = (attrs.get("href") or "").strip()
        new_url = tracked(href, attrs.get("data-link-id"))
        if new_url is None:
            continue
        pieces.append(document[done:start])
        pieces.append(_with_href(raw, new_url))
        done = start + len(raw)
    pieces.append(document[done:])
    return "".join(pieces)


def _with_href(tag: str, url: str) -> str:
    """The start tag with its first `href` value replaced (quoted, entity-escaped)."""
    name_end = _TAG_NAME.match(tag)
    position = name_end.end() if name_end else 0
    while (attribute := _ATTRIBUTE.search(tag, position)) is not None:
        if attribute.group("name").lower() == "href" and attribute.group("value") is not None:
            start, end = attribute.span("value")
            return f'{tag[:start]}"{html.escape(url, quote=True)}"{tag[end:]}'
        position = attribute.end()
    return tag


def _with_pixel(document: str, open_url: str) -> str:
    pixel = (
        f'<img src="{html.escape(open_url, quote=True)}" width="1" height="1" alt="" '
        'style="display:none">'
    )
    ends = list(_BODY_END.finditer(document))
    if not ends:
        return document + pixel
    at = ends[-1].start()
    return document[:at] + pixel + document[at:]


def _rewrite_text_urls(text: str, tracked: _Tracker) -> str:
    def replace(match: re.Match[str]) -> str:
        url, rest = _trim_url(match.group(0))
        new_url = tracked(url, None)
        return match.group(0) if new_url is None else new_url + rest

    return _TEXT_URL.sub(replace, text)


def _trim_url(candidate: str) -> tuple[str, str]:
    """Split trailing sentence punctuation and unbalanced closing brackets off a text URL."""
    url = candidate
    while url:
        last = url[-1]
        if last in _TRAILING_PUNCTUATION or (
            last in _CLOSING and url.count(_CLOSING[last]) < url.count(last)
        ):
            url = url[:-1]
        else:
            break
    return url, candidate[len(url) :]


def _is_web_url(url: str) -> bool:
    scheme = url.partition(":")[0].lower()
    return scheme in ("http", "https") and url[len(scheme) :].startswith("://")
