"""The demo: the whole local stack, the scenario journeys, and a simulated storefront.

`make demo` runs it. Every figure in the closing summary is read back from the system (the ingest
metrics, Kafka, the admin API over the document store, the SMTP outbox), not from the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack as local_stack  # noqa: E402

from shared.cli import publish, publish_segments  # noqa: E402
from shared.settings import CommonSettings  # noqa: E402

WRITE_KEY = "wp_dev_write_key"
ADMIN_KEY = "wp_dev_admin_key"
FIRST_NAMES = ["Ana", "Ben", "Chloé", "Dawid", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
# The subject of examples/journeys/s02-welcome.yaml's first email.
WELCOME_SUBJECT = "Welcome to Acme"
PRODUCTS = [
    ("sku-101", "Trail running shoes", "shoes", 129.0),
    ("sku-202", "Merino base layer", "apparel", 79.0),
    ("sku-303", "Ultralight tent", "outdoor", 349.0),
    ("sku-404", "Headlamp", "outdoor", 39.0),
]


def shopper_calls(
    rng: random.Random, run: str, index: int
) -> tuple[list[dict[str, Any]], str | None]:
    """One visitor's session as Segment calls; returns the calls and, when they registered,
    their e-mail address. `run` keeps each demo run's shoppers apart from earlier runs'."""
    anonymous_id = f"anon-demo-{run}-{index:05d}"
    user_id = f"demo-{run}-{index:05d}"
    calls: list[dict[str, Any]] = [
        {"type": "page", "anonymousId": anonymous_id, "name": "Home"},
    ]
    for _ in range(rng.randint(1, 4)):
        sku, name, category, price = rng.choice(PRODUCTS)
        calls.append(
            {
                "type": "track",
                "anonymousId": anonymous_id,
                "event": "Product Viewed",
                "properties": {
                    "product_id": sku,
                    "name": name,
                    "category": category,
                    "price": price,
                },
            }
        )
    email: str | None = None
    if rng.random() < 0.7:
        name = rng.choice(FIRST_NAMES)
        email = f"{user_id}@shop.example"
        traits: dict[str, Any] = {"email": email, "first_name": name}
        # Some shoppers also have the app (a push token), a phone, or follow the WeChat account.
        if rng.random() < 0.4:
            traits["push_tokens"] = [f"fcm-{user_id}"]
        if rng.random() < 0.4:
            traits["phone"] = f"+4860{rng.randrange(10**7):07d}"
        if rng.random() < 0.2:
            traits["wechat_openid"] = f"o-{user_id}"
            traits["wechat_unionid"] = f"u-{user_id}"
        calls.append({"type": "identify", "userId": user_id, "traits": traits})
        calls.append(
            {
                "type": "track",
                "userId": user_id,
                "event": "Registered",
                "properties": {"plan": rng.choice(["free", "pro"])},
            }
        )
        if rng.random() < 0.3:
            calls.append({"type": "track", "userId": user_id, "event": "Newsletter Subscribed"})
        if rng.random() < 0.4:
            sku, name, category, price = rng.choice(PRODUCTS)
            calls.append(
                {
                    "type": "track",
                    "userId": user_id,
                    "event": "Product Added",
                    "properties": {
                        "product_id": sku,
                        "name": name,
                        "category": category,
                        "price": price,
                        "quantity": 1,
                    },
                }
            )
            if rng.random() < 0.5:
                calls.append(
                    {
                        "type": "track",
                        "userId": user_id,
                        "event": "Order Completed",
                        "properties": {
                            "order_id": f"order-{run}-{index:05d}",
                            "revenue": price,
                            "total": price,
                            "currency": "EUR",
                        },
                    }
                )
    return calls, email


def progress(label: str, done: int, total: int, *, final: bool = False) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    print(
        f"\r[demo] {label:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  ",
        end="\n" if final else "",
        flush=True,
    )


async def drive_storefront(
    stack: local_stack.Stack, shoppers: int, seed: int, run: str
) -> set[str]:
    """Post every shopper's session; returns the e-mail addresses of those who registered."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not security
    sessions = [shopper_calls(rng, run, i) for i in range(shoppers)]
    done = 0
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(
        base_url=stack.ingest_url, auth=(WRITE_KEY, ""), timeout=30
    ) as client:

        async def visit(calls: list[dict[str, Any]]) -> None:
            nonlocal done
            async with gate:
                answer = await client.post("/v1/batch", json={"batch": calls})
                answer.raise_for_status()
                done += 1
                if done % 10 == 0 or done == shoppers:
                    progress("simulating shoppers", done, shoppers, final=done == shoppers)

        await asyncio.gather(*(visit(calls) for calls, _ in sessions))
    return {email for _, email in sessions if email is not None}


def welcomed(stack: local_stack.Stack, emails: set[str]) -> int:
    """How many of `emails` have their welcome email in the SMTP outbox."""
    answer = httpx.get(
        f"{stack.outbox_url}/messages",
        params={"channel": "email", "subject_contains": WELCOME_SUBJECT},
        timeout=30,
    )
    answer.raise_for_status()
    reached = {
        address.casefold()
        for message in answer.json()["messages"]
        for address in message.get("to", [])
    }
    return len({e.casefold() for e in emails} & reached)


def wait_for_welcomes(stack: local_stack.Stack, emails: set[str], timeout: float) -> bool:
    """Show the welcome emails arriving, out of every registered shopper; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done = welcomed(stack, emails)
        progress("welcome emails delivered", done, len(emails), final=done == len(emails))
        if done == len(emails):
            return True
        if time.monotonic() > deadline:
            print()
            return False
        time.sleep(1.0)


def admin_stats(stack: local_stack.Stack) -> dict[str, Any]:
    answer = httpx.get(
        f"{stack.admin_url}/v1/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    answer.raise_for_status()
    stats: dict[str, Any] = answer.json()
    return stats


def admin_segments(stack: local_stack.Stack) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{stack.admin_url}/v1/segments",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    answer.raise_for_status()
    segments: list[dict[str, Any]] = answer.json()["segments"]
    return segments


def ingest_accepted(stack: local_stack.Stack) -> int:
    text = httpx.get(f"{stack.ingest_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("waypost_ingest_events_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shoppers", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the welcome emails"
    )
    args = parser.parse_args()

    stack = local_stack.Stack(home=local_stack.LOCAL / "stack", ports=local_stack.Ports.from_env())
    print("[demo] starting the stack (Kafka, FerretDB, SMTP sandbox, five services) ...")
    stack.up()
    settings = CommonSettings(kafka_bootstrap=stack.bootstrap, mongo_url=stack.mongo_url)
    segments = sorted((ROOT / "examples" / "segments").glob("*.yaml"))
    print(f"[demo] publishing aggregates and segments from {len(segments)} files ...")
    publish_segments(settings, segments)
    journeys = sorted((ROOT / "examples" / "journeys").glob("*.yaml"))
    print(f"[demo] publishing {len(journeys)} scenario journeys from examples/journeys ...")
    publish(settings, journeys)

    before = admin_stats(stack)
    sent_before = before["messages"].get("sent", 0)
    accepted_before = ingest_accepted(stack)
    started = time.monotonic()
    run = f"{int(time.time()):x}"
    registered = asyncio.run(drive_storefront(stack, args.shoppers, args.seed, run))
    print(f"[demo] {len(registered)} of {args.shoppers} shoppers registered; waiting for journeys")
    if not wait_for_welcomes(stack, registered, args.timeout):
        print(
            f"[demo] not every welcome email arrived within {args.timeout:.0f}s: the pipeline is "
            f"behind or stuck; logs are in {stack.home / 'logs'}",
            file=sys.stderr,
        )
        return 1
    stats = admin_stats(stack)

    delivered = {
        channel: httpx.get(
            f"{stack.outbox_url}/messages", params={"channel": channel}, timeout=10
        ).json()["count"]
        for channel in ("email", "sms", "push", "wechat")
    }
    print()
    print("Waypost demo summary (read from the running system)")
    print("-" * 72)
    print(f"  events accepted by ingest (this run)  {ingest_accepted(stack) - accepted_before:>8}")
    print(f"  events in waypost.events.v1 (total)   {stats['events_in_log']:>8}")
    print("  journey log (all runs)       entered  waiting  skipped converted  exited")
    for journey_id, kinds in sorted(stats["journeys"].items()):
        figures = "".join(
            f"{kinds.get(kind, 0):>9}"
            for kind in ("entered", "waiting", "skipped", "converted", "exited")
        )
        print(f"    {journey_id:<26}{figures}")
    print("  segments (live exact member counts)")
    for segment in admin_segments(stack):
        print(f"    {segment['id']:<34}{segment['members']:>8}")
    print(
        f"  messages sent (ledger, this run)      "
        f"{stats['messages'].get('sent', 0) - sent_before:>8}"
    )
    for state, count in sorted(stats["messages"].items()):
        print(f"    ledger state {state:<22} {count:>8}")
    for channel, count in delivered.items():
        print(f"  {channel + ' messages in the sandbox outbox':<38}{count:>8}")
    print(f"  wall time                             {time.monotonic() - started:>7.1f}s")
    print("-" * 72)
    print("  waits run on the wall clock: cart reminders come after 1 hour, the trial email after")
    print("  6 days; every channel goes to the local sandbox (SMTP, SMS, FCM and WeChat APIs)")
    print(
        f"  outbox: {stack.outbox_url}/messages   admin: {stack.admin_url}/docs "
        f"(Bearer {ADMIN_KEY})"
    )
    print("  the stack keeps running; `make down` stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
