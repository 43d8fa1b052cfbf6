"""S12 Re-activation: every view (or order) restarts one 60-day timer; silence sends a message."""

from __future__ import annotations

from datetime import timedelta

from shared.contracts import ContactEvent, Event
from shared.journey_engine.engine import decide
from shared.journey_engine.simulator import Simulation
from shared.journey_engine.state import CancelTimer, EventArrived, ScheduleTimer
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s12-reactivation")
REACTIVATION = FILE.journey
VARIANT_FILE = definition("s12-reactivation-after-order")
AFTER_ORDER = VARIANT_FILE.journey
SIXTY_DAYS = timedelta(days=60)


def visitor(sim: Simulation, contact: str = "ada") -> None:
    sim.identify(contact, email=f"{contact}@example.com")


def test_sixty_quiet_days_after_one_view_send_the_message() -> None:
    sim = Simulation([REACTIVATION], T0)
    visitor(sim)
    sim.track("ada", "Page Viewed", {"path": "/"})

    sim.advance(SIXTY_DAYS - timedelta(seconds=1))
    assert sim.sent("ada") == []
    sim.advance(timedelta(seconds=1))

    (message,) = sim.sent("ada")
    assert (message.template_id, message.requested_at) == ("reactivation-email", T0 + SIXTY_DAYS)
    assert "two months" in rendered(message, FILE).text
    assert sim.exits("ada") == ["completed"]


def test_many_views_keep_one_timer_and_the_message_comes_sixty_days_after_the_last() -> None:
    sim = Simulation([REACTIVATION], T0)
    visitor(sim)
    last_view = T0
    for _ in range(300):
        sim.track("ada", "Page Viewed", {"path": "/products"})
        last_view = sim.now
        assert sim.waiting("ada") == 1
        sim.advance(timedelta(hours=5))

    (instance,) = sim.states["ada"].instances.values()
    assert instance.timer is not None
    assert instance.timer.due_at == last_view + SIXTY_DAYS
    assert sum(1 for r in sim.log if r.kind == "entered") == 1

    sim.advance(last_view + SIXTY_DAYS - sim.now - timedelta(seconds=1))
    assert sim.sent("ada") == []
    sim.advance(timedelta(seconds=1))

    (message,) = sim.sent("ada")
    assert message.requested_at == last_view + SIXTY_DAYS
    assert message.context["last_view"]["timestamp"] == last_view.isoformat()


def test_a_view_after_the_message_starts_a_new_quiet_period() -> None:
    sim = Simulation([REACTIVATION], T0)
    visitor(sim)
    sim.track("ada", "Page Viewed")
    sim.advance(SIXTY_DAYS + timedelta(days=5))

    sim.track("ada", "Page Viewed")
    sim.advance(SIXTY_DAYS)

    sends = sim.sent("ada")
    assert [s.requested_at for s in sends] == [T0 + SIXTY_DAYS, T0 + 2 * SIXTY_DAYS + timedelta(5)]
    assert sends[0].instance_id != sends[1].instance_id


def test_contacts_restart_their_own_timers_only() -> None:
    sim = Simulation([REACTIVATION], T0)
    visitor(sim, "ada")
    visitor(sim, "bob")
    sim.track("ada", "Page Viewed")
    sim.track("bob", "Page Viewed")
    sim.advance(timedelta(days=30))

    sim.track("bob", "Page Viewed")
    sim.advance(timedelta(days=30))

    assert len(sim.sent("ada")) == 1
    assert sim.sent("bob") == []
    assert (sim.waiting("ada"), sim.waiting("bob")) == (0, 1)


def test_variant_each_order_restarts_and_silence_sends_a_discount() -> None:
    sim = Simulation([AFTER_ORDER], T0)
    visitor(sim)
    sim.track("ada", "Order Completed", {"order_id": "o-1"})
    sim.advance(timedelta(days=40))
    sim.track("ada", "Order Completed", {"order_id": "o-2"})

    sim.advance(timedelta(days=59))
    assert sim.sent("ada") == []
    sim.advance(timedelta(days=1))

    (message,) = sim.sent("ada")
    assert message.requested_at == T0 + timedelta(days=100)
    code = message.context["coupon"]["code"]
    assert code.startswith("BACK-")
    assert code in rendered(message, VARIANT_FILE).text
    assert message.context["last_order"]["properties"]["order_id"] == "o-2"


def test_variant_a_page_view_does_not_restart_the_order_timer() -> None:
    sim = Simulation([AFTER_ORDER, REACTIVATION], T0)
    visitor(sim)
    sim.track("ada", "Order Completed", {"order_id": "o-1"})
    sim.advance(timedelta(days=30))
    sim.track("ada", "Page Viewed")

    sim.advance(timedelta(days=30))

    assert sim.templates_sent("ada") == ["reactivation-discount-email"]


def test_a_restart_schedules_exactly_one_timer_command_and_cancels_none() -> None:
    sim = Simulation([REACTIVATION], T0)
    visitor(sim)
    sim.track("ada", "Page Viewed")
    view = Event(
        type="track",
        event="Page Viewed",
        user_id="ada",
        message_id="view-2",
        timestamp=T0,
        received_at=T0,
        properties={},
    )
    stimulus = EventArrived(ContactEvent(contact_key="ada", event=view, profile=sim.profile("ada")))
    decision = decide(
        sim.states["ada"], stimulus, sim.catalog, T0 + timedelta(days=1), coupon_key=sim.coupon_key
    )

    timers = [c for c in decision.commands if isinstance(c, ScheduleTimer)]
    assert [t.due_at for t in timers] == [T0 + timedelta(days=61)]
    assert not any(isinstance(c, CancelTimer) for c in decision.commands)
    (instance,) = decision.state.instances.values()
    assert instance.visits["quiet-for-60-days"] == 2
