"""Scenario journeys on the real stack, with durations shortened to seconds.

S5 cart abandonment (with the purchase that ends it mid-wait), tags that one journey sets
triggering another through the segmenter, a webhook answer feeding a message, and SIGKILL of the
orchestrator while many contacts wait.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.helpers import (
    outbox,
    post,
    publish_inline,
    publish_journey,
    shopper,
    unique,
    wait_drained,
    wait_for,
)

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


def shortened(tmp_path: Path, example: str, durations: dict[str, str]) -> tuple[str, Path]:
    """The example file with a unique journey id and the named steps' waits shortened."""
    definition = yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text())
    journey = definition["journey"]
    journey["id"] = unique(journey["id"])
    for step in journey["steps"]:
        if step["id"] in durations:
            key = "timeout" if step["type"] == "wait_for_event" else "duration"
            step[key] = durations[step["id"]]
    for goal in journey.get("goals", []):
        goal.pop("within", None)
    path = tmp_path / f"{journey['id']}.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return journey["id"], path


def track(stack: Any, user: str, event: str, **properties: Any) -> None:
    answer = post(stack, "track", {"userId": user, "event": event, "properties": properties})
    assert answer.status_code == 200, answer.text


def journey_counts(stack: Any, journey_id: str) -> dict[str, int]:
    stats = httpx.get(f"{stack.admin_url}/v1/stats", headers=ADMIN, timeout=10).json()
    counts: dict[str, int] = stats["journeys"].get(journey_id, {})
    return counts


@pytest.fixture(scope="module")
def cart_journey(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    journey_id, path = shortened(
        tmp_path_factory.mktemp("s5"),
        "s05-cart-abandonment",
        # Waits run on the wall clock. The first is long enough for an order posted right
        # after the cart to reach the orchestrator within it on a loaded machine (once, with
        # the whole suite running, it took more than 4 s and the cart email went out). The
        # second is long enough for a shopper to see the cart email and order within it, where
        # the email took more than 4 s to arrive.
        {"wait-for-order": "10s", "wait-more": "15s"},
    )
    publish_journey(stack, path)
    return journey_id


def test_s5_an_abandoned_cart_gets_the_reminder_then_a_coupon(
    stack: Any, cart_journey: str
) -> None:
    user, email = shopper(stack, "ada")
    track(stack, user, "Product Added", product_id="p1", name="Boots")

    reminder = wait_for(
        lambda: outbox(stack, to=email, subject_contains="left something"), what="the cart email"
    )
    coupon = wait_for(
        lambda: outbox(stack, to=email, subject_contains="for your cart"), what="the coupon email"
    )

    assert reminder[0]["subject"] == "You left something in your cart, ada"
    code = coupon[0]["subject"].split()[2]
    assert code.startswith("CART-")
    assert f"code {code} for 10% off" in coupon[0]["text"]
    wait_drained(stack)
    assert len(outbox(stack, to=email)) == 2


def test_s5_an_order_ends_the_journey_at_once_in_either_wait(stack: Any, cart_journey: str) -> None:
    early, early_email = shopper(stack, "bea")  # orders during the first wait
    late, late_email = shopper(stack, "cy")  # orders after the reminder, during the second wait
    control, control_email = shopper(stack, "dee")  # never orders: paces the test
    for user in (early, late, control):
        track(stack, user, "Product Added", product_id="p9")
    track(stack, early, "Order Completed", order_id=unique("o"))

    wait_for(lambda: outbox(stack, to=late_email), what="the late shopper's cart email")
    track(stack, late, "Order Completed", order_id=unique("o"))
    wait_for(
        lambda: outbox(stack, to=control_email, subject_contains="for your cart"),
        what="the control shopper's coupon email",
    )
    wait_drained(stack)

    assert outbox(stack, to=early_email) == []
    assert [m["subject"] for m in outbox(stack, to=late_email)] == [
        "You left something in your cart, cy"
    ]
    counts = wait_for(
        lambda: (c := journey_counts(stack, cart_journey)).get("converted", 0) >= 2 and c,
        what="two conversions in the journey log",
    )
    assert counts["converted"] == 2
    report = httpx.get(
        f"{stack.admin_url}/v1/journeys/{cart_journey}/conversion", headers=ADMIN, timeout=10
    ).json()
    assert report["treated"]["converted"] == 2
    assert report["treated"]["entered"] >= 3
    assert report["holdout"] == {"entered": 0, "converted": 0, "rate": None}


def test_a_tag_set_by_one_journey_enters_another_through_the_segmenter(
    stack: Any, tmp_path: Path
) -> None:
    tag = unique("vip")
    event = unique("Loyalty Reached")
    tagger, listener = unique("tagger"), unique("welcome-vip")
    publish_inline(
        stack,
        tmp_path,
        tagger,
        {"type": "event", "event": event},
        [{"id": "tag", "type": "update_contact", "add_tags": [tag]}],
    )
    publish_inline(
        stack,
        tmp_path,
        listener,
        {"type": "tag_added", "tag": tag},
        [{"id": "hello", "type": "send", "template": f"{listener}-hello"}],
        {
            f"{listener}-hello": {
                "subject": "Welcome to the club, {{ contact.first_name }}",
                "text": "You are {{ context.trigger.properties.tag }} now.",
            }
        },
    )
    user, email = shopper(stack, "eli")

    track(stack, user, event)

    message = wait_for(lambda: outbox(stack, to=email), what="the email of the tag journey")
    assert message[0]["subject"] == "Welcome to the club, eli"
    assert message[0]["text"].strip() == f"You are {tag} now."


class _Scores(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        raw = json.dumps({"tier": "gold" if body.get("plan") == "pro" else "silver"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture
def scoring_service() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), _Scores)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/score"
    server.shutdown()
    server.server_close()


def test_a_webhook_answer_lands_in_the_context_and_the_message(
    stack: Any, tmp_path: Path, scoring_service: str
) -> None:
    journey_id, event = unique("scored"), unique("Plan Chosen")
    publish_inline(
        stack,
        tmp_path,
        journey_id,
        {"type": "event", "event": event},
        [
            {
                "id": "score",
                "type": "webhook",
                "url": scoring_service,
                "body": {"plan": {"from": "context.trigger.properties.plan"}},
                "timeout": "5s",
                "save_as": "score",
            },
            {"id": "tell", "type": "send", "template": f"{journey_id}-tier"},
        ],
        {
            f"{journey_id}-tier": {
                "subject": "Your tier: {{ context.score.body.tier }}",
                "text": "Status {{ context.score.status }}",
            }
        },
    )
    user, email = shopper(stack, "fay")

    track(stack, user, event, plan="pro")

    message = wait_for(lambda: outbox(stack, to=email), what="the email after the webhook")
    assert message[0]["subject"] == "Your tier: gold"
    assert message[0]["text"].strip() == "Status 200"


@pytest.mark.serial
def test_sigkill_while_many_contacts_wait_loses_no_timer_and_duplicates_no_send(
    stack: Any, tmp_path: Path
) -> None:
    journey_id = unique("durable")
    publish_inline(
        stack,
        tmp_path,
        journey_id,
        {"type": "event", "event": f"Joined {journey_id}"},
        [
            {"id": "welcome-email", "type": "send", "template": f"{journey_id}-hello"},
            {"id": "pause", "type": "wait", "duration": "8s"},
            {"id": "reminder", "type": "send", "template": f"{journey_id}-again"},
        ],
        {
            f"{journey_id}-hello": {"subject": "Hello {{ contact.first_name }}", "text": "hello"},
            f"{journey_id}-again": {"subject": "Again {{ contact.first_name }}", "text": "again"},
        },
    )
    contacts = [shopper(stack, f"w{n}") for n in range(24)]
    for user, _email in contacts:
        track(stack, user, f"Joined {journey_id}")
    for _user, email in contacts:
        wait_for(lambda e=email: outbox(stack, to=e), what="every first email")

    stack.stop("orchestrator", signal.SIGKILL)
    assert stack.pid("orchestrator") is None
    stack.start_service("orchestrator")
    stack.wait_service("orchestrator")

    for _user, email in contacts:
        wait_for(
            lambda e=email: outbox(stack, to=e, subject_contains="Again"),
            timeout=90,
            what="every reminder after the restart",
        )
    wait_drained(stack)
    for user, email in contacts:
        subjects = sorted(m["subject"] for m in outbox(stack, to=email))
        assert subjects == [f"Again {user.split('-')[0]}", f"Hello {user.split('-')[0]}"]


def test_s18_the_order_coupon_is_compared_with_the_code_this_instance_sent(
    stack: Any, tmp_path: Path
) -> None:
    journey_id, path = shortened(tmp_path, "s18-coupon-used", {"wait-for-order": "20s"})
    publish_journey(stack, path)
    listener = unique("not-used")
    publish_inline(
        stack,
        tmp_path,
        listener,
        {"type": "tag_added", "tag": "coupon not used"},
        [{"id": "nudge", "type": "send", "template": f"{listener}-nudge"}],
        {
            f"{listener}-nudge": {
                "subject": "Your code {{ contact.first_name }} is still waiting",
                "text": "nudge",
            }
        },
    )
    keen, keen_email = shopper(stack, "gus")
    other, other_email = shopper(stack, "hal")
    for user in (keen, other):
        track(stack, user, "Newsletter Subscribed")

    sent = wait_for(lambda: outbox(stack, to=keen_email), what="the coupon email")
    code = sent[0]["subject"].rsplit(" ", 1)[-1]
    assert code.startswith("HELLO-")
    wait_for(lambda: outbox(stack, to=other_email), what="the other coupon email")
    track(stack, keen, "Order Completed", order_id="o-1", coupon=code)
    track(stack, other, "Order Completed", order_id="o-2", coupon=code.replace("HELLO-", "OTHER-"))

    thanks = wait_for(
        lambda: outbox(stack, to=keen_email, subject_contains="Thanks for your order"),
        what="the thank-you for using the code",
    )
    nudge = wait_for(
        lambda: outbox(stack, to=other_email, subject_contains="still waiting"),
        what="the nudge after the tag 'coupon not used'",
    )
    assert thanks[0]["subject"] == "Thanks for your order o-1"
    assert code in thanks[0]["text"]
    assert nudge[0]["subject"] == "Your code hal is still waiting"
    wait_drained(stack)
    assert len(outbox(stack, to=keen_email)) == 2
    assert len(outbox(stack, to=other_email)) == 2
    wait_for(
        lambda: journey_counts(stack, journey_id).get("exited") == 2,
        what="both instances exited in the journey log",
    )
