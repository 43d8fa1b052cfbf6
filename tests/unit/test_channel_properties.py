"""The orchestrator and the dispatcher agree on channels, by construction: for any profile, the
channel a send step picks, and every fallback it hands on, passes the dispatcher's consent and
address checks; a channel the step leaves out is one the dispatcher would skip too."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.dispatcher.domain.policy import consent_refusal, line_break_refusal
from shared.channels import CHANNELS, address_of
from shared.contracts import Channel, Profile
from shared.journey_engine.simulator import Simulation
from shared.journeys import Journey

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CONTACT = "ada"

# Values an address trait may hold, well-formed or not: blanks, line breaks, text with and
# without "@", numbers, lists of tokens of any kind, nothing.
_TEXT = st.text(st.sampled_from(["a", "@", " ", ".", "+", "1", "\r", "\n", "\u2028", "\t"]))
_VALUE = st.one_of(
    st.none(),
    _TEXT,
    st.sampled_from(["ada@example.com", "+48500100200", "tok-1", "o-openid", "", " ", "@"]),
    st.integers(-5, 5),
    st.booleans(),
    st.lists(st.one_of(st.none(), _TEXT, st.integers(0, 3), st.just("tok-2")), max_size=4),
    st.dictionaries(st.sampled_from(["token"]), _TEXT, max_size=1),
)
_TRAIT_NAMES = ("email", "phone", "push_tokens", "push_token", "wechat_openid", "wechat_unionid")
_TRAITS = st.dictionaries(st.sampled_from(_TRAIT_NAMES), _VALUE, max_size=len(_TRAIT_NAMES))
_CONSENT = st.dictionaries(st.sampled_from(CHANNELS), st.booleans(), max_size=len(CHANNELS))
_PRIORITY = st.permutations(CHANNELS).flatmap(
    lambda order: st.integers(1, len(order)).map(lambda n: tuple(order[:n]))
)


def _journey(priority: tuple[Channel, ...]) -> Journey:
    return Journey.model_validate(
        {
            "id": "reach",
            "name": "Reach",
            "trigger": {"event": "Go"},
            "steps": [
                {
                    "id": "announce",
                    "type": "send",
                    "channels": [{"channel": c, "template": f"t-{c}"} for c in priority],
                },
                {"id": "done", "type": "exit"},
            ],
        }
    )


def _dispatcher_sends_on(channel: Channel, profile: Profile) -> bool:
    """The dispatcher's consent and address checks (`_prepare`), without its stores."""
    if consent_refusal(channel, profile, None) is not None:
        return False
    address = address_of(channel, profile)
    return address is not None and line_break_refusal(channel, address) is None


@settings(max_examples=400, deadline=None)
@given(traits=_TRAITS, consent=_CONSENT, priority=_PRIORITY)
def test_the_orchestrator_picks_only_channels_the_dispatcher_can_send_on(
    traits: dict[str, Any], consent: dict[str, bool], priority: tuple[Channel, ...]
) -> None:
    sim = Simulation([_journey(priority)], T0)
    sim.identify(CONTACT, **traits)
    sim.profiles[CONTACT] = sim.profile(CONTACT).model_copy(update={"consent": consent})

    sim.track(CONTACT, "Go")

    profile = sim.profile(CONTACT)
    sendable = [c for c in priority if _dispatcher_sends_on(c, profile)]
    requests = sim.sent(CONTACT)
    if not sendable:
        assert requests == []
        skipped = [r.reason for r in sim.log if r.kind == "skipped"]
        assert skipped == ["unreachable"]
        return
    (request,) = requests
    # The first choice and the fallbacks, in priority order, are exactly the channels the
    # dispatcher can send on: it never skips one as unsubscribed or without an address.
    chosen = [request.channel, *(f.channel for f in request.fallbacks)]
    assert chosen == sendable
    for channel in chosen:
        assert _dispatcher_sends_on(channel, request.profile)
