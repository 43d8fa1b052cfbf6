"""The delivery channels, one package each, and the registry the dispatcher reads them from.

A channel's package holds everything about it: `domain.py` (pure: its content, rendering from a
template, the provider's request and what its answers mean), `adapter.py` (the provider calls)
and, in `__init__.py`, its `ChannelKit`. What a channel's addresses and consent are is shared
with the other services (`shared/channels.py`). Adding a channel is one package here, its
settings, and its name in the wire contract's `Channel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.dispatcher.channels.common import MonotonicClock, TemplateDocument
from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.domain.messages import MessageContent, Provider, RenderContext
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel

Render = Callable[[TemplateDocument, dict[str, Any], RenderContext], MessageContent]
BuildProvider = Callable[[DispatcherSettings, MonotonicClock, ProviderClient], Provider | None]


@dataclass(frozen=True)
class ChannelKit:
    """One channel as the dispatcher uses it: render a template into its content (raises
    `RenderError` or `ValueError` for a template that does not render for the contact), and
    build its provider from the settings (None when the channel is not configured)."""

    name: Channel
    render: Render
    provider: BuildProvider


def kits() -> Mapping[Channel, ChannelKit]:
    """Every channel's kit, by name."""
    from services.dispatcher.channels import email, push, sms, wechat

    return {kit.name: kit for kit in (email.KIT, sms.KIT, push.KIT, wechat.KIT)}


def build_providers(
    settings: DispatcherSettings, clock: MonotonicClock, http: ProviderClient
) -> dict[Channel, Provider]:
    """The configured channels' providers (a channel without its settings is left out, and its
    sends are skipped with a reason so the step's next channel is tried)."""
    providers: dict[Channel, Provider] = {}
    for name, kit in kits().items():
        provider = kit.provider(settings, clock, http)
        if provider is not None:
            providers[name] = provider
    return providers
