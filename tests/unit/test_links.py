"""Signed links: tokens, expiry, email link rewriting and Twilio request signatures."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from shared.links import (
    InvalidLink,
    LinkClaims,
    LinkKind,
    LinkSigner,
    link_id_of,
    track_email,
    twilio_signature,
    twilio_signature_valid,
    urls_written_in,
)

PUBLIC = "https://go.example.com"
ISSUED = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
SIGNER = LinkSigner("test-secret", PUBLIC)
BASE = LinkClaims(
    kind="open",
    message_id="msg-1",
    contact_key="user-1",
    is_user=True,
    channel="email",
    template_id="welcome",
    journey_id="onboarding",
    step_id="send-welcome",
    issued_at=int(ISSUED.timestamp()),
)
CLICK_URL = re.compile(re.escape(PUBLIC) + r"/c/([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)")


def claims(kind: LinkKind, **changes: object) -> LinkClaims:
    return dataclasses.replace(BASE, kind=kind, **changes)  # type: ignore[arg-type]


def clicked(document: str) -> list[LinkClaims]:
    """The claims of every click-tracking link in the document, in order."""
    return [SIGNER.read(token, "click", ISSUED) for token in CLICK_URL.findall(document)]


# --- tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unsubscribe", "open", "click", "sms_status"])
def test_a_token_reads_back_as_its_claims(kind: LinkKind) -> None:
    original = claims(kind, link_id="cta", url="https://shop.example/a?b=1&c=2")

    token = SIGNER.token(original)

    assert SIGNER.read(token, kind, ISSUED) == original
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)


def test_claims_without_optional_fields_read_back() -> None:
    original = LinkClaims(
        kind="unsubscribe", message_id="m", contact_key="anon-7", is_user=False, channel="sms"
    )

    assert SIGNER.read(SIGNER.token(original), "unsubscribe", ISSUED) == original


def test_text_beyond_ascii_reads_back_and_the_payload_is_compact_json_in_key_order() -> None:
    original = claims("click", contact_key="zoë-東京", url="https://shop.example/ü?q=café")

    token = SIGNER.token(original)

    assert SIGNER.read(token, "click", ISSUED) == original
    payload = token.partition(".")[0]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    decoded = json.loads(raw)
    assert list(decoded) == sorted(decoded)
    assert raw == json.dumps(decoded, separators=(",", ":"), ensure_ascii=False).encode()
    assert decoded["u"] == 1


def test_a_token_is_deterministic() -> None:
    assert SIGNER.token(BASE) == SIGNER.token(dataclasses.replace(BASE))


def test_a_tampered_payload_is_refused() -> None:
    payload, signature = SIGNER.token(BASE).split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields["c"] = "user-2"
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()

    with pytest.raises(InvalidLink, match="bad signature"):
        SIGNER.read(f"{forged}.{signature}", "open", ISSUED)


def test_a_tampered_signature_is_refused() -> None:
    payload, signature = SIGNER.token(BASE).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]

    with pytest.raises(InvalidLink, match="bad signature"):
        SIGNER.read(f"{payload}.{flipped}", "open", ISSUED)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = LinkSigner("another-secret", PUBLIC).token(BASE)

    with pytest.raises(InvalidLink, match="bad signature"):
        SIGNER.read(token, "open", ISSUED)


def test_a_token_of_another_kind_is_refused() -> None:
    token = SIGNER.token(claims("open"))

    with pytest.raises(InvalidLink, match="wrong kind"):
        SIGNER.read(token, "unsubscribe", ISSUED)


def test_a_payload_relabelled_to_another_kind_keeps_a_signature_that_fails() -> None:
    payload, signature = SIGNER.token(claims("open")).split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields["k"] = "unsubscribe"
    relabelled = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()

    with pytest.raises(InvalidLink, match="bad signature"):
        SIGNER.read(f"{relabelled}.{signature}", "unsubscribe", ISSUED)


@pytest.mark.parametrize(
    "token",
    ["", "no-dot", "a.b.c", "!!!.abc", "abc.", ".abc", "e30.abc", "bm90IGpzb24.abc"],
)
def test_a_malformed_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidLink):
        SIGNER.read(token, "open", ISSUED)


def test_the_signature_is_checked_before_the_payload_is_decoded() -> None:
    # A payload that would take a JSON parser thousands of levels down, unsigned.
    deep = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()

    with pytest.raises(InvalidLink, match="bad signature"):
        SIGNER.read(f"{deep}.abc", "unsubscribe", ISSUED)


def test_a_deeply_nested_payload_signed_by_us_is_malformed_not_a_crash() -> None:
    deep = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).rstrip(b"=").decode()
    token = f"{deep}.{SIGNER._signature('open', deep)}"

    with pytest.raises(InvalidLink, match="malformed"):
        SIGNER.read(token, "open", ISSUED)


def test_a_token_longer_than_any_we_sign_is_refused_unread() -> None:
    with pytest.raises(InvalidLink, match="longer than"):
        SIGNER.read("a" * 10_000 + ".abc", "open", ISSUED)


@pytest.mark.parametrize("kind", ["open", "click"])
def test_tracking_links_expire_400_days_after_issue(kind: LinkKind) -> None:
    token = SIGNER.token(claims(kind, link_id="x", url="https://a.example/"))

    assert SIGNER.read(token, kind, ISSUED + timedelta(days=400)).kind == kind
    with pytest.raises(InvalidLink, match="expired"):
        SIGNER.read(token, kind, ISSUED + timedelta(days=400, seconds=1))


@pytest.mark.parametrize("kind", ["unsubscribe", "sms_status"])
def test_unsubscribe_and_sms_status_links_never_expire(kind: LinkKind) -> None:
    token = SIGNER.token(claims(kind))

    assert SIGNER.read(token, kind, ISSUED + timedelta(days=3650)).kind == kind


def test_each_url_has_its_route_and_kind() -> None:
    routes = {
        "unsubscribe": (SIGNER.unsubscribe_url(BASE), r"/u/(.+)"),
        "open": (SIGNER.open_url(BASE), r"/o/(.+)\.gif"),
        "click": (SIGNER.click_url(claims("click", url="https://a.example/")), r"/c/(.+)"),
        "sms_status": (SIGNER.sms_status_url(BASE), r"/v1/sms/status/(.+)"),
    }

    for kind, (url, route) in routes.items():
        match = re.fullmatch(re.escape(PUBLIC) + route, url)
        assert match, url
        assert SIGNER.read(match.group(1), kind, ISSUED).kind == kind  # type: ignore[arg-type]


def test_a_trailing_slash_on_the_public_url_is_ignored() -> None:
    signer = LinkSigner("test-secret", PUBLIC + "/")

    assert signer.unsubscribe_url(BASE) == SIGNER.unsubscribe_url(BASE)


def test_link_ids_are_stable_short_hex() -> None:
    assert link_id_of("https://a.example/") == link_id_of("https://a.example/")
    assert link_id_of("https://a.example/") != link_id_of("https://b.example/")
    assert re.fullmatch(r"[0-9a-f]{10}", link_id_of("https://a.example/"))


# --- email rewriting -------------------------------------------------------------------------


def track(
    html: str | None,
    text: str,
    signer: LinkSigner,
    base: LinkClaims,
    *,
    opens: bool,
    clicks: bool,
) -> tuple[str | None, str]:
    """`track_email` of a message rendered from a template without variables: every URL in it
    was written in the template."""
    return track_email(
        html,
        text,
        signer,
        base,
        opens=opens,
        clicks=clicks,
        template_urls=urls_written_in(html, text),
    )


UNSUBSCRIBE = SIGNER.unsubscribe_url(BASE)
HTML = f"""<html><body>
<p>Hello <a class=cta href="https://shop.example/sale?a=1&amp;b=2">the sale</a>.</p>
<p><a title='href="not this"' HREF='http://blog.example/post' data-link-id="blog">blog</a></p>
<p><a href="mailto:help@example.com">mail us</a> <a href="tel:+48123456789">call</a></p>
<p><a href="{UNSUBSCRIBE}">Unsubscribe</a> <a name="top">top</a></p>
<script>document.write('<a href="https://not-a-link.example/">');</script>
</body></html>"""
TEXT = (
    "Hello! The sale: https://shop.example/sale?a=1&b=2.\n"
    "Read (https://en.wikipedia.org/wiki/Sale_(retail)) or write to mailto:help@example.com.\n"
    f"Unsubscribe: {UNSUBSCRIBE}\n"
)


def test_html_links_are_rewritten_to_signed_click_links() -> None:
    html, _text = track(HTML, TEXT, SIGNER, BASE, opens=False, clicks=True)

    assert html is not None
    sale, blog = clicked(html)
    assert (sale.url, sale.link_id) == (
        "https://shop.example/sale?a=1&b=2",
        link_id_of("https://shop.example/sale?a=1&b=2"),
    )
    assert (blog.url, blog.link_id) == ("http://blog.example/post", "blog")
    assert (sale.kind, sale.message_id, sale.contact_key, sale.template_id) == (
        "click",
        "msg-1",
        "user-1",
        "welcome",
    )
    assert "shop.example" not in html
    assert """title='href="not this"'""" in html


def test_mailto_tel_unsubscribe_and_script_content_are_left_alone() -> None:
    html, _text = track(HTML, TEXT, SIGNER, BASE, opens=False, clicks=True)

    assert html is not None
    assert '<a href="mailto:help@example.com">' in html
    assert '<a href="tel:+48123456789">' in html
    assert f'<a href="{UNSUBSCRIBE}">' in html
    assert '<a name="top">' in html
    assert "https://not-a-link.example/" in html


def test_the_new_href_is_entity_escaped() -> None:
    signer = LinkSigner("test-secret", "https://go.example.com/t?x=1&y=2")

    html, _text = track(
        '<a href="https://a.example/">a</a>', "", signer, BASE, opens=False, clicks=True
    )

    assert html is not None
    assert "/t?x=1&amp;y=2/c/" in html
    assert "&y" not in html


def test_the_pixel_goes_right_before_the_closing_body_tag() -> None:
    html, _text = track(HTML, TEXT, SIGNER, BASE, opens=True, clicks=False)

    pixel = f'<img src="{SIGNER.open_url(BASE)}" width="1" height="1" alt="" style="display:none">'
    assert html == HTML.replace("</body>", pixel + "</body>")


def test_the_pixel_goes_at_the_end_without_a_body_tag() -> None:
    html, _text = track("<p>Hi</p>", "Hi", SIGNER, BASE, opens=True, clicks=False)

    assert html is not None
    assert html.startswith("<p>Hi</p><img ")
    assert html.endswith('style="display:none">')


def test_the_pixel_token_is_an_open_token() -> None:
    html, _text = track("<p>Hi</p>", "Hi", SIGNER, BASE, opens=True, clicks=False)

    assert html is not None
    token = re.search(r"/o/([A-Za-z0-9_.-]+)\.gif", html)
    assert token
    assert SIGNER.read(token.group(1), "open", ISSUED) == claims("open")


def test_text_urls_are_rewritten_without_their_trailing_punctuation() -> None:
    _html, text = track(None, TEXT, SIGNER, BASE, opens=True, clicks=True)

    sale, wiki = clicked(text)
    assert sale.url == "https://shop.example/sale?a=1&b=2"
    assert wiki.url == "https://en.wikipedia.org/wiki/Sale_(retail)"
    lines = text.splitlines()
    assert re.fullmatch(r"Hello! The sale: \S+/c/[\w-]+\.[\w-]+\.", lines[0])
    assert lines[1].endswith(") or write to mailto:help@example.com.")
    assert lines[2] == f"Unsubscribe: {UNSUBSCRIBE}"
    assert "<img" not in text


def test_without_an_html_part_only_the_text_is_tracked() -> None:
    html, text = track(None, "Go: https://a.example/", SIGNER, BASE, opens=True, clicks=True)

    assert html is None
    assert [c.url for c in clicked(text)] == ["https://a.example/"]


def test_nothing_changes_when_tracking_is_off() -> None:
    assert track(HTML, TEXT, SIGNER, BASE, opens=False, clicks=False) == (HTML, TEXT)


def test_the_same_link_gets_the_same_id_in_both_parts_and_every_run() -> None:
    first = track(HTML, TEXT, SIGNER, BASE, opens=True, clicks=True)
    second = track(HTML, TEXT, SIGNER, BASE, opens=True, clicks=True)

    assert first == second
    html, text = first
    assert html is not None
    assert clicked(html)[0].link_id == clicked(text)[0].link_id


def test_already_tracked_links_are_not_wrapped_again() -> None:
    once = track(HTML, TEXT, SIGNER, BASE, opens=False, clicks=True)

    assert track(*once, SIGNER, BASE, opens=False, clicks=True) == once


# --- Twilio signatures -----------------------------------------------------------------------

# The example of Twilio's webhook security documentation.
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}


def test_twilio_signature_matches_twilios_documented_example() -> None:
    assert twilio_signature(TWILIO_URL, TWILIO_PARAMS, "12345") == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_a_twilio_signature_is_checked_against_url_params_and_token() -> None:
    signature = twilio_signature(TWILIO_URL, TWILIO_PARAMS, "12345")

    assert twilio_signature_valid(TWILIO_URL, TWILIO_PARAMS, "12345", signature)
    assert not twilio_signature_valid(TWILIO_URL, TWILIO_PARAMS, "54321", signature)
    assert not twilio_signature_valid(TWILIO_URL + "&x=1", TWILIO_PARAMS, "12345", signature)
    assert not twilio_signature_valid(
        TWILIO_URL, {**TWILIO_PARAMS, "Digits": "1235"}, "12345", signature
    )
    assert not twilio_signature_valid(TWILIO_URL, TWILIO_PARAMS, "12345", "")
    assert not twilio_signature_valid(TWILIO_URL, TWILIO_PARAMS, "12345", "ünicode")


def test_a_token_carries_every_claim_as_compact_sorted_json() -> None:
    """Every field of `LinkClaims` is in the payload, under its short name, and reads back (a
    field left out of the short names would vanish from every token without a word)."""
    original = claims("click", link_id="abc", url="https://shop.example.com/", is_user=False)
    assert all(getattr(original, f.name) is not None for f in dataclasses.fields(LinkClaims))
    token = SIGNER.token(original)
    payload = token.partition(".")[0]
    assert base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) == (
        b'{"c":"user-1","ch":"email","i":%d,"j":"onboarding","k":"click","l":"abc",'
        b'"m":"msg-1","r":"https://shop.example.com/","s":"send-welcome","t":"welcome","u":0}'
        % int(ISSUED.timestamp())
    )
    assert SIGNER.read(token, "click", ISSUED) == original
