"""Channel rules (`shared.channels`): addresses, reachability, consent events and dead addresses,
and the simulator folding consent like the segmenter."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

import pytest

from services.admin.domain.segments import ConsentChannel
from shared.channels import (
    CHANNELS,
    address_of,
    channels_named,
    consent_changes,
    consented,
    merged_consent,
    reachable,
    with_consent,
    without_dead_address,
)
from shared.contracts import Channel, Event, Profile
from shared.journey_engine.simulator import Simulation
from shared.journeys import Journey

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _profile(consent: dict[str, bool] | None = None, **traits: object) -> Profile:
    return Profile(
        contact_key="u-1",
        user_id="u-1",
        traits=traits,
        consent=consent or {},
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
    )


def _event(name: str, **properties: Any) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="u-1",
        message_id=f"{name}-{sorted(properties.items())}",
        timestamp=T0,
        received_at=T0,
        properties=properties,
        source="waypost-tests",
    )


def test_the_channel_list_is_the_wire_contracts_and_the_admin_adds_all() -> None:
    assert CHANNELS == ("email", "sms", "push", "wechat") == get_args(Channel)
    assert get_args(ConsentChannel) == (*CHANNELS, "all")


def test_addresses_per_channel() -> None:
    profile = _profile(
        email=" ada@example.com ",
        phone=" +48500100200 ",
        push_tokens=["old", "", 7, "new", ""],
        wechat_unionid="union-1",
    )
    assert address_of("email", profile) == "ada@example.com"
    assert address_of("sms", profile) == "+48500100200"
    assert address_of("push", profile) == "new"  # the newest registered device
    # A unionid alone cannot be sent to: WeChat needs the account's openid.
    assert address_of("wechat", profile) is None
    assert address_of("wechat", _profile(wechat_openid="o-1", wechat_unionid="u")) == "o-1"
    assert address_of("push", _profile(push_token="only")) == "only"
    assert address_of("push", _profile(push_tokens=["", None], push_token="only")) == "only"


@pytest.mark.parametrize(
    ("channel", "traits"),
    [
        ("email", {"email": "not-an-address"}),
        ("email", {"email": ["ada@example.com"]}),
        ("email", {"email": "ada@example.com\r\nBcc: eve@example.com"}),
        ("sms", {"phone": "   "}),
        ("sms", {"phone": 48500100200}),
        ("sms", {"phone": "+48500100200\n"}),  # trimmed: the line break goes with the blanks
        ("push", {"push_tokens": "tok"}),
        ("push", {"push_tokens": ["", None]}),
        ("push", {"push_token": "tok\u2028extra"}),
        ("wechat", {"wechat_unionid": "u-1"}),
        ("wechat", {"wechat_openid": ""}),
    ],
)
def test_what_is_no_address(channel: Channel, traits: dict[str, Any]) -> None:
    profile = _profile(**traits)
    expected = channel == "sms" and traits["phone"] == "+48500100200\n"
    assert (address_of(channel, profile) is not None) is expected
    assert reachable(channel, profile) is expected


def test_reachable_needs_consent_and_an_address() -> None:
    profile = _profile({"email": False, "sms": True}, email="a@ex.com", phone="+4850")
    assert not consented("email", profile)
    assert not reachable("email", profile)
    assert reachable("sms", profile)
    assert consented("push", profile)  # never withdrawn
    assert not reachable("push", profile)  # but no token


def test_consent_events_name_one_channel_all_or_email_when_silent() -> None:
    assert consent_changes(_event("Unsubscribed", channel="sms")) == {"sms": False}
    assert consent_changes(_event("Subscribed", channel="all")) == dict.fromkeys(CHANNELS, True)
    assert consent_changes(_event("Unsubscribed")) == {"email": False}
    assert consent_changes(_event("Unsubscribed", channel="fax")) == {}
    assert consent_changes(_event("Unsubscribed", channel=["sms"])) == {}
    assert consent_changes(_event("Order Completed", channel="sms")) == {}
    assert channels_named("all") == CHANNELS
    assert channels_named(None) == ()


def test_consent_folds_into_the_profile_and_a_withdrawal_wins_a_merge() -> None:
    profile = with_consent(_profile(), _event("Unsubscribed", channel="all"))
    assert profile.consent == dict.fromkeys(CHANNELS, False)
    profile = with_consent(profile, _event("Subscribed", channel="push"))
    assert profile.consent["push"] is True
    unchanged = _profile()
    assert with_consent(unchanged, _event("Page Viewed")) is unchanged
    assert merged_consent({"email": True, "sms": False}, {"email": False, "push": True}) == {
        "email": False,
        "sms": False,
        "push": True,
    }


def test_a_dead_push_token_leaves_the_profile_and_other_addresses_stay() -> None:
    profile = _profile(push_tokens=["old", "dead", "new"], push_token="dead", email="a@ex.com")
    failed = {"channel": "push", "address_invalid": True, "address": "dead"}
    cleaned = without_dead_address(profile, _event("Message Failed", **failed))
    assert cleaned.traits == {"push_tokens": ["old", "new"], "email": "a@ex.com"}
    # Email addresses are suppressed by the dispatcher, not erased from the profile.
    bounced = {"channel": "email", "address_invalid": True, "address": "a@ex.com"}
    assert without_dead_address(profile, _event("Message Failed", **bounced)) is profile
    skipped = {**failed, "address_invalid": False}
    assert without_dead_address(profile, _event("Message Failed", **skipped)) is profile


def test_the_simulator_folds_consent_like_the_segmenter() -> None:
    journey = Journey.model_validate(
        {
            "id": "reach",
            "name": "Reach",
            "trigger": {"event": "Go"},
            "steps": [
                {
                    "id": "announce",
                    "type": "send",
                    "channels": [
                        {"channel": "email", "template": "t-email"},
                        {"channel": "sms", "template": "t-sms"},
                    ],
                }
            ],
        }
    )
    sim = Simulation([journey], T0)
    sim.identify("ada", email="ada@example.com", phone="+48500100200")

    sim.track("ada", "Unsubscribed", {"channel": "email", "method": "one_click"})
    sim.track("ada", "Go")

    assert sim.profile("ada").consent == {"email": False}
    assert [(s.channel, s.fallbacks) for s in sim.sent("ada")] == [("sms", ())]
