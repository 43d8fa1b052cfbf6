"""Click tracking rewrites only the links written in the template, never a URL from data (which
would otherwise become a signed redirect through our domain: an open redirect)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from services.dispatcher.channels.email.domain import EmailContent, render
from services.dispatcher.domain.messages import RenderContext
from shared.contracts import Profile, SendRequest
from shared.links import LinkClaims, LinkSigner, urls_written_in
from shared.rendering import render_variables

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
PUBLIC = "https://go.example.com"
SIGNER = LinkSigner("test-secret", PUBLIC)
CLAIMS = LinkClaims(
    kind="open",
    message_id="msg-1",
    contact_key="user-1",
    is_user=True,
    channel="email",
    template_id="news",
    issued_at=int(T0.timestamp()),
)
CLICK = re.compile(re.escape(PUBLIC) + r"/c/([\w-]+\.[\w-]+)")
SALE = "https://shop.example/sale?a=1&b=2"
EVIL = "https://evil.example/login"


def email(html: str, text: str, **traits: Any) -> EmailContent:
    """The email the dispatcher renders from this template for a contact with these traits."""
    profile = Profile(
        contact_key="user-1", traits=traits, first_seen=T0, last_seen=T0, updated_at=T0
    )
    request = SendRequest(
        message_id="msg-1",
        contact_key="user-1",
        channel="email",
        template_id="news",
        journey_id="news",
        journey_version=1,
        instance_id="inst-1",
        step_id="send",
        requested_at=T0,
        profile=profile,
    )
    template = {"subject": "News", "text": text, "html": html}
    context = RenderContext(SIGNER, CLAIMS, transactional=True, track_opens=False)
    return render(template, render_variables(request), context)


def destinations(part: str) -> list[str]:
    """Where each click link in the part leads."""
    return [SIGNER.read(token, "click", T0).url or "" for token in CLICK.findall(part)]


def test_a_link_written_in_the_template_is_tracked() -> None:
    sent = email(
        '<p><a href="https://shop.example/sale?a=1&amp;b=2">Sale</a></p>',
        "The sale: https://shop.example/sale?a=1&b=2.",
    )

    assert sent.html is not None
    assert destinations(sent.html) == [SALE]
    assert destinations(sent.text) == [SALE]
    assert sent.text.endswith(".")  # the sentence's full stop is not part of the link


def test_a_url_from_a_trait_is_left_as_it_is() -> None:
    sent = email(
        '<p><a href="{{ contact.website }}">Your site</a> or <a href="https://shop.example/">shop</a></p>',
        "Your site: {{ contact.website }}\nShop: https://shop.example/",
        website=EVIL,
    )

    assert sent.html is not None
    assert destinations(sent.html) == ["https://shop.example/"]
    assert f'<a href="{EVIL}">' in sent.html  # still a link, just not through our domain
    assert destinations(sent.text) == ["https://shop.example/"]
    assert f"Your site: {EVIL}\n" in sent.text


def test_a_url_built_from_a_written_prefix_and_data_is_not_tracked() -> None:
    sent = email(
        '<a href="https://shop.example/p/{{ contact.sku }}">Yours</a>',
        "Yours: https://shop.example/p/{{ contact.sku }}",
        sku="../../redirect?to=https://evil.example",
    )

    assert sent.html is not None
    assert destinations(sent.html) == []
    assert destinations(sent.text) == []
    assert "https://shop.example/p/../../redirect?to=https://evil.example" in sent.text


def test_a_trait_holding_a_url_the_template_also_writes_is_tracked() -> None:
    sent = email(
        '<a href="https://shop.example/">Shop</a> <a href="{{ contact.favourite }}">Favourite</a>',
        "",
        favourite="https://shop.example/",
    )

    assert sent.html is not None
    assert destinations(sent.html) == ["https://shop.example/", "https://shop.example/"]


def test_only_the_template_source_names_trackable_urls() -> None:
    written = urls_written_in(
        '<a href="https://a.example/x?y=1&amp;z=2">a</a> {{ contact.url }}',
        "See https://b.example/page. Or https://c.example/{{ path }}",
        None,
    )

    assert "https://a.example/x?y=1&z=2" in written
    assert "https://b.example/page" in written
    assert not any(url.startswith("https://c.example/") and "{{" not in url for url in written)
