"""Properties of the engine over random stimuli, played through the simulator on example journeys.

Events of a few kinds for a few contacts, segment changes, tags and time passing, in any order:
no message is requested twice, an exit is final, replays decide the same, a holdout receives
nothing, and a redelivered event changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cli import load_journey_file
from shared.contracts import ContactEvent, Event
from shared.ids import stable_id
from shared.journey_engine.engine import decide
from shared.journey_engine.simulator import Simulation
from shared.journey_engine.state import EventArrived
from shared.journeys import EntryRules, Journey

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
CONTACTS = ("ada", "bob", "cyd")
# Journeys whose exit rules end them on `Order Completed`.
ENDED_BY_ORDERS = {"cart-abandonment", "churn-prevention"}


def _journey(name: str) -> Journey:
    return load_journey_file(EXAMPLES / f"{name}.yaml").journey


def _journeys() -> list[Journey]:
    churn = _journey("s09-churn-prevention")
    # Half the contacts held out, so that holdouts are common in every example.
    held_out_half = churn.model_copy(update={"entry": EntryRules(reentry="after_exit", holdout=50)})
    return [
        _journey("s05-cart-abandonment"),
        held_out_half,
        _journey("s12-reactivation"),
        _journey("s19-top-spenders"),
        _journey("s03-incubate-trial-users"),
    ]


JOURNEYS = _journeys()

Action = tuple[Any, ...]
_EVENTS = st.sampled_from(
    ["Product Added", "Order Completed", "Order Completed", "Page Viewed", "Form Submitted"]
)
_REVENUES = st.sampled_from([40, 100, 150, 400])
_PAUSES = st.sampled_from([0, 1, 2, 24, 72, 24 * 7, 24 * 31, 24 * 61]) | st.integers(0, 48)
_TRACK = st.tuples(st.just("track"), st.sampled_from(CONTACTS), _EVENTS, _REVENUES)
_ADVANCE = st.tuples(st.just("advance"), _PAUSES)
# Events and time passing are the common stimuli; membership and tag changes are rarer.
_ACTIONS = st.lists(
    st.one_of(
        _TRACK,
        _TRACK,
        _TRACK,
        _ADVANCE,
        _ADVANCE,
        st.tuples(st.just("segment"), st.sampled_from(CONTACTS), st.booleans()),
        st.tuples(st.just("tag"), st.sampled_from(CONTACTS), st.booleans()),
    ),
    min_size=5,
    max_size=40,
)


def _world() -> Simulation:
    sim = Simulation(JOURNEYS, T0)
    sim.identify("ada", email="ada@example.com")
    sim.identify("bob", email="bob@example.com", push_tokens=["tok-bob"])
    sim.identify("cyd", first_name="Cyd")  # reachable on no channel
    return sim


def play(
    actions: Sequence[Action],
    after_each: Callable[[Simulation, Action, Event | None], None] | None = None,
) -> Simulation:
    """Play the actions in a fresh world; `after_each` sees the world after every action."""
    sim = _world()
    for action in actions:
        event: Event | None = None
        if action[0] == "track":
            _kind, contact, name, revenue = action
            event = sim.track(contact, name, {"revenue": revenue, "currency": "EUR"})
        elif action[0] == "segment":
            sim.segment_changed(action[1], "churn-risk", entered=action[2])
        elif action[0] == "tag":
            sim.tag(action[1], "trial not placed", added=action[2])
        else:
            sim.advance(timedelta(hours=action[1]))
        if after_each is not None:
            after_each(sim, action, event)
    return sim


def _visit_of(instance_id: str, step_id: str, message_id: str) -> int:
    for visit in range(200):
        if stable_id(instance_id, step_id, visit) == message_id:
            return visit
    raise AssertionError(f"message id {message_id} is not derived from its step run")


def _exited(sim: Simulation) -> set[str]:
    return {r.instance_id for r in sim.log if r.kind == "exited"}


@settings(max_examples=150, deadline=None)
@given(actions=_ACTIONS)
def test_no_step_run_sends_twice_and_an_exit_is_final(actions: list[Action]) -> None:
    def check(sim: Simulation, action: Action, _event: Event | None) -> None:
        exited = _exited(sim)
        running = {i for state in sim.states.values() for i in state.instances}
        assert not running & exited
        sends_so_far = len(sim.sent())
        assert all(s.instance_id not in ended_before for s in sim.sent()[checked[0] :])
        checked[0] = sends_so_far
        ended_before.clear()
        ended_before.update(exited)
        if action[0] == "track" and action[2] == "Order Completed":
            state = sim.states[action[1]]
            assert not {i.journey_id for i in state.instances.values()} & ENDED_BY_ORDERS

    checked = [0]
    ended_before: set[str] = set()
    sim = play(actions, check)

    message_ids = [s.message_id for s in sim.sent()]
    assert len(message_ids) == len(set(message_ids))
    runs = [
        (s.instance_id, s.step_id, _visit_of(s.instance_id, s.step_id, s.message_id))
        for s in sim.sent()
    ]
    assert len(runs) == len(set(runs))


@settings(max_examples=100, deadline=None)
@given(actions=_ACTIONS)
def test_replaying_the_same_stimuli_from_scratch_decides_the_same(actions: list[Action]) -> None:
    first = play(actions)
    second = play(actions)

    assert first.sent() == second.sent()
    assert first.log == second.log
    assert first.changes == second.changes
    assert first.states == second.states
    assert first.profiles == second.profiles


@settings(max_examples=150, deadline=None)
@given(actions=_ACTIONS)
def test_holdout_contacts_never_receive_a_message(actions: list[Action]) -> None:
    sim = play(actions)

    held_out = {r.instance_id for r in sim.log if r.kind == "holdout"}
    assert not any(s.instance_id in held_out for s in sim.sent())
    # The holdout is a stable property of the contact, not of one entry.
    holdout_contacts = {r.contact_key for r in sim.log if r.kind == "holdout"}
    churn_sends = {s.contact_key for s in sim.sent() if s.journey_id == "churn-prevention"}
    assert not holdout_contacts & churn_sends
    converted = [r for r in sim.log if r.kind == "converted" and r.journey_id == "churn-prevention"]
    assert all(r.holdout == (r.instance_id in held_out) for r in converted)


@settings(max_examples=150, deadline=None)
@given(actions=_ACTIONS)
def test_a_redelivered_event_changes_nothing(actions: list[Action]) -> None:
    def redeliver(sim: Simulation, _action: Action, event: Event | None) -> None:
        if event is None:
            return
        contact = event.contact_key
        again = ContactEvent(contact_key=contact, event=event, profile=sim.profile(contact))
        state = sim.states[contact]

        decision = decide(
            state,
            EventArrived(again),
            sim.catalog,
            sim.now + timedelta(minutes=1),
            coupon_key=sim.coupon_key,
        )

        assert decision.commands == ()
        assert decision.state == state
        # Through the segmenter's fold it is dropped before the engine sees it, and the profile
        # does not count it again.
        sends, log, profile = len(sim.sent()), len(sim.log), sim.profile(contact)
        sim.deliver(event)
        assert (len(sim.sent()), len(sim.log)) == (sends, log)
        assert sim.profile(contact) == profile

    play(actions, redeliver)
