"""Segmenter fold micro-benchmark: the pure `contact.apply` per event, no Kafka, no store.

`.venv/bin/python -m bench.segmenter_fold [--events N] [--contacts M] [--rounds R]` builds the
definitions of `bench.segmenter` (11 aggregates, 20 segments) and a deterministic storefront
stream (the same mix and contact skew as that bench, times relative to a fixed instant, with a
few re-sent duplicates), then times, best of R rounds:

1. decode (the baseline): each event's JSON into `shared.contracts.Event`, the part of handling
   an event no fold can avoid;
2. fold: `contact.apply` over the decoded events in order, each contact's row carried from one
   event to the next, from empty rows (the rows grow as in the real topic).

Both are timed in this process's CPU time, not wall time: on a shared machine the time spent
waiting for a core would otherwise count (caches shared with other work still shift both figures;
the ratio moves less). It also prints a digest of every outcome (rows, events, timer changes) so
two versions of the fold can be checked to agree on the same stream.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from bench.segmenter import DAY, MIX, definitions, make_event
from services.segmenter.domain import contact
from services.segmenter.domain.contact import ContactRow
from services.segmenter.domain.definitions import Definitions
from shared.contracts import Event

# Every event time is relative to this instant, so the stream is the same on every run.
START = datetime(2025, 6, 1, 12, tzinfo=UTC)
# Events arrive this far apart (the fold's `now`).
SPACING = timedelta(milliseconds=10)
# Share of events sent again later (a client retry): the fold drops them as duplicates.
RESENT = 0.02


def stream(seed: int, count: int, contacts: int) -> list[tuple[bytes, datetime]]:
    """`count` storefront events as wire JSON, each with the instant the segmenter folds it."""
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    out: list[tuple[bytes, datetime]] = []
    for n in range(count):
        now = START + n * SPACING
        if out and rng.random() < RESENT:
            out.append((rng.choice(out)[0], now))
            continue
        key = f"c-{int(contacts * rng.random() ** 2):06d}"
        at = now - timedelta(seconds=min(rng.expovariate(1 / (5 * DAY)), 60 * DAY))
        event = make_event(rng, key, rng.choices(names, weights)[0], at)
        # As ingest stamps it: received when the segmenter sees it (not this machine's clock).
        out.append((event.model_copy(update={"received_at": now}).to_wire(), now))
    return out


def decode(records: Sequence[tuple[bytes, datetime]]) -> list[Event]:
    return [Event.model_validate_json(raw) for raw, _ in records]


def fold(
    events: Sequence[Event], records: Sequence[tuple[bytes, datetime]], defs: Definitions
) -> dict[str, ContactRow]:
    rows: dict[str, ContactRow] = {}
    for event, (_, now) in zip(events, records, strict=True):
        key = event.contact_key
        outcome = contact.apply(rows.get(key), event, defs, now)
        if not outcome.duplicate and outcome.row is not None:
            rows[key] = outcome.row
    return rows


def outputs_digest(
    events: Sequence[Event], records: Sequence[tuple[bytes, datetime]], defs: Definitions
) -> str:
    """A hash over every outcome: row JSON, announced events, retime and duplicate flags."""
    digest = hashlib.sha256()
    rows: dict[str, ContactRow] = {}
    for event, (_, now) in zip(events, records, strict=True):
        key = event.contact_key
        outcome = contact.apply(rows.get(key), event, defs, now)
        digest.update(f"{outcome.duplicate}|{outcome.retime}|{outcome.linked}|".encode())
        for announced in outcome.events:
            digest.update(announced.to_wire())
        if outcome.row is not None:
            digest.update(outcome.row.model_dump_json().encode())
        if not outcome.duplicate and outcome.row is not None:
            rows[key] = outcome.row
    return digest.hexdigest()[:16]


def best(seconds: list[float]) -> tuple[float, float]:
    return min(seconds), statistics.median(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=10_000, help="events in the stream (N)")
    parser.add_argument("--contacts", type=int, default=750, help="storefront contacts (M)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (best is reported)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the event generator")
    args = parser.parse_args(argv)
    parsed = definitions()
    defs = Definitions.of(parsed.aggregates, parsed.segments)
    records = stream(args.seed, args.events, args.contacts)
    events = decode(records)
    print(
        f"{len(records):,} events for {args.contacts:,} contacts; {len(defs.aggregates)} "
        f"aggregates, {len(defs.segments)} segments; best and median of {args.rounds} rounds",
        flush=True,
    )
    print(f"outputs digest {outputs_digest(events, records, defs)}", flush=True)
    decode_s: list[float] = []
    fold_s: list[float] = []
    for _ in range(args.rounds):
        gc.collect()
        started = time.process_time()
        decode(records)
        decode_s.append(time.process_time() - started)
        gc.collect()
        started = time.process_time()
        fold(events, records, defs)
        fold_s.append(time.process_time() - started)
    per_event = 1e6 / len(records)
    (decode_best, decode_median), (fold_best, fold_median) = best(decode_s), best(fold_s)
    print(f"{'':24}{'best µs/event':>16}{'median µs/event':>18}")
    for name, low, mid in (
        ("decode JSON -> Event", decode_best, decode_median),
        ("fold (contact.apply)", fold_best, fold_median),
    ):
        print(f"{name:24}{low * per_event:>16.1f}{mid * per_event:>18.1f}")
    ratio, median_ratio = fold_best / decode_best, fold_median / decode_median
    print(f"fold / decode: {ratio:.2f} (best), {median_ratio:.2f} (median)")
    print(
        f"RESULT fold_us_per_event={fold_best * per_event:.1f} "
        f"decode_us_per_event={decode_best * per_event:.1f} ratio={ratio:.2f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
