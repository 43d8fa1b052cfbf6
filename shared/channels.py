"""Channels: each one's name, where its address lives on a profile, what consent means for it,
and the events only it reports. The orchestrator picks a channel, the dispatcher sends on it and
the segmenter folds consent with these same rules, so they cannot disagree (pure, no I/O).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from shared.contracts import Channel, Event, Profile
from shared.system_events import (
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    MESSAGE_DELIVERED,
    MESSAGE_FAILED,
    MESSAGE_UNDELIVERED,
    SUBSCRIBED,
    UNSUBSCRIBED,
)

# Every channel, in the order the wire contract names them.
CHANNELS: tuple[Channel, ...] = get_args(Channel)
# What a consent event's `channel` property may name: one channel, or every channel at once.
ALL = "all"
ConsentScope = Literal[Channel, "all"]
# The channel a consent event means when it names none (unsubscribe links predate the property).
DEFAULT_CONSENT_CHANNEL: Channel = "email"


# --- addresses ---------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _email(traits: Mapping[str, Any]) -> str | None:
    value = traits.get("email")
    return value.strip() if isinstance(value, str) and "@" in value else None


def _phone(traits: Mapping[str, Any]) -> str | None:
    value = traits.get("phone")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _push_token(traits: Mapping[str, Any]) -> str | None:
    # The newest registered device: the last usable entry of `push_tokens`, else `push_token`.
    tokens = traits.get("push_tokens")
    if isinstance(tokens, list):
        usable = [t for t in tokens if _text(t)]
        if usable:
            return str(usable[-1])
    return _text(traits.get("push_token"))


def _wechat_openid(traits: Mapping[str, Any]) -> str | None:
    # A unionid names the person across the company's apps, but only the Official Account's
    # openid can be sent to: a unionid alone is no address.
    return _text(traits.get("wechat_openid"))


_ADDRESSES: dict[Channel, Callable[[Mapping[str, Any]], str | None]] = {
    "email": _email,
    "sms": _phone,
    "push": _push_token,
    "wechat": _wechat_openid,
}
# The traits each channel's address is read from (a dead address is taken off these).
ADDRESS_TRAITS: dict[Channel, tuple[str, ...]] = {
    "email": ("email",),
    "sms": ("phone",),
    "push": ("push_tokens", "push_token"),
    "wechat": ("wechat_openid",),
}


def address_of(channel: Channel, profile: Profile) -> str | None:
    """The contact's address on `channel`, or None when the profile holds none it can be sent to.

    email: `traits.email` holding an "@" (trimmed); sms: a non-blank `traits.phone` (trimmed);
    push: the last non-empty string of `traits.push_tokens`, else `traits.push_token`; wechat:
    `traits.wechat_openid`. An address holding a line break (CR, LF, U+2028, …) counts as none:
    in a header or a request it would add lines of its own.
    """
    address = _ADDRESSES[channel](profile.traits)
    if address is None or address.splitlines() != [address]:
        return None
    return address


def consented(channel: Channel, profile: Profile) -> bool:
    """Whether the profile lets `channel` be used: consent is given until it is withdrawn."""
    return profile.consent.get(channel) is not False


def reachable(channel: Channel, profile: Profile) -> bool:
    """The contact can receive messages on `channel`: consent not withdrawn and an address."""
    return consented(channel, profile) and address_of(channel, profile) is not None


# --- consent -----------------------------------------------------------------------------------


def channels_named(value: object) -> tuple[Channel, ...]:
    """The channels a consent event's `channel` property names: one, all, or none it knows."""
    if value == ALL:
        return CHANNELS
    return tuple(c for c in CHANNELS if c == value)


def consent_changes(event: Event) -> dict[Channel, bool]:
    """The consent an event records, per channel: `Unsubscribed` withdraws and `Subscribed`
    gives back the channel its `channel` property names (email when absent, every channel for
    `all`). Empty for any other event."""
    if event.label not in (UNSUBSCRIBED, SUBSCRIBED):
        return {}
    given = event.label == SUBSCRIBED
    named = event.properties.get("channel", DEFAULT_CONSENT_CHANNEL)
    return dict.fromkeys(channels_named(named), given)


def with_consent(profile: Profile, event: Event) -> Profile:
    """The profile after a consent event (unchanged by any other)."""
    changes = consent_changes(event)
    if not changes:
        return profile
    return profile.model_copy(update={"consent": {**profile.consent, **changes}})


def merged_consent(mine: Mapping[str, bool], theirs: Mapping[str, bool]) -> dict[str, bool]:
    """Two profiles' consent as one: a withdrawal on either side wins (never message someone
    who said no)."""
    return {c: mine.get(c, True) and theirs.get(c, True) for c in {*mine, *theirs}}


# --- channel-specific events -------------------------------------------------------------------

# Events about a channel's messages that come back from outside the dispatcher: opens and clicks
# through signed email links, final statuses from SMS status callbacks.
REPORTS: dict[Channel, tuple[str, ...]] = {
    "email": (EMAIL_OPENED, EMAIL_LINK_CLICKED),
    "sms": (MESSAGE_DELIVERED, MESSAGE_UNDELIVERED),
    "push": (),
    "wechat": (),
}
# Channels whose dead address is taken off the profile when a provider calls it permanently bad
# (`Message Failed` with `address_invalid` and the `address`); the others are suppressed by the
# dispatcher instead, since the address may still be right on another channel or later.
FORGETS_DEAD_ADDRESS: frozenset[Channel] = frozenset({"push"})


def without_dead_address(profile: Profile, event: Event) -> Profile:
    """The profile without the address a `Message Failed` calls permanently invalid, for the
    channels in `FORGETS_DEAD_ADDRESS` (a push token the provider unregistered)."""
    if event.label != MESSAGE_FAILED:  # nearly every event: nothing else to look at
        return profile
    props = event.properties
    channel = next((c for c in FORGETS_DEAD_ADDRESS if c == props.get("channel")), None)
    dead = props.get("address")
    if not (channel is not None and props.get("address_invalid") is True and isinstance(dead, str)):
        return profile
    traits = dict(profile.traits)
    for name in ADDRESS_TRAITS[channel]:
        value = traits.get(name)
        if isinstance(value, list) and dead in value:
            traits[name] = [v for v in value if v != dead]
        elif value == dead:
            del traits[name]
    if traits == profile.traits:
        return profile
    return profile.model_copy(update={"traits": traits})
