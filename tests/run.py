"""`make test`: every test, in three pytest runs on one local stack that this script starts.

1. The first-start tests, on the brand-new stack, and the tests that need no server (unit,
   contract, scenarios in virtual time), in two processes (the machine's two cores).
2. The end-to-end tests that share the stack without disturbing one another, several at once
   (pytest-xdist: `WAYPOST_TEST_WORKERS` processes, 4 by default, each test module on one of
   them). They spend their time waiting on the pipeline, not computing.
3. One at a time: the tests that take the stack's parts down or load it heavily (`serial`,
   then `chaos`, then `soak`).

The stack is stopped at the end, also on a failure or Ctrl-C (`WAYPOST_KEEP_TEST_STACK=1` leaves
it up). Each run goes on whatever the one before it did, so one failure does not hide another;
the exit status is 0 only when all three passed. Arguments go to each pytest run, for example
`.venv/bin/python -m tests.run -x`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import ROOT, fresh_stack

SHARED = "e2e and not first_start and not serial and not chaos and not soak"
RUNS = (
    ("first start, then the tests without servers", "first_start or not e2e", 2),
    ("end-to-end tests sharing the stack, several at once", SHARED, None),
    ("end-to-end tests that disturb the stack, one at a time", "serial or chaos or soak", 1),
)


def main(extra: list[str]) -> int:
    workers = os.environ.get("WAYPOST_TEST_WORKERS", "4")
    started = time.monotonic()
    failed: list[str] = []
    with fresh_stack():
        for number, (what, marks, processes) in enumerate(RUNS, start=1):
            print(f"\n[test {number}/{len(RUNS)}] {what} (-m {marks!r})", flush=True)
            argv = [sys.executable, "-m", "pytest", "-m", marks, *extra]
            if processes != 1:  # each test module in one process: its fixtures, its order
                argv += ["-n", str(processes or workers), "--dist", "loadfile"]
            env = {**os.environ, "WAYPOST_TEST_STACK": "attach"}
            status = subprocess.call(argv, cwd=ROOT, env=env)
            # 5: no test selected (a narrowed run); anything else non-zero is a failure.
            if status not in (0, 5):
                failed.append(f"run {number} ({what}) exited {status}")
    minutes = (time.monotonic() - started) / 60
    if failed:
        print(f"\n[test] FAILED after {minutes:.1f} min: {'; '.join(failed)}", flush=True)
        return 1
    print(f"\n[test] all {len(RUNS)} runs passed in {minutes:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
