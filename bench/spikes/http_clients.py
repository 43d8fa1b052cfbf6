"""Spike: which asyncio HTTP client sends provider calls with the least CPU, httpx or aiohttp?

The dispatcher's SMS, push and WeChat adapters post one HTTP request per message. At the
issue's target (1,000 sends/s per worker) the client library's CPU per request decides how much
of a core the worker has left for everything else. This runs both clients against the local
sandbox's Twilio-style endpoint, with the worker's form and 50 ms of provider latency, the same
number of requests in flight, rounds alternating so that both see the same machine, and reports
per client: sends/s, this process's CPU per send, and the sandbox's CPU per send.

    python bench/spikes/http_clients.py [--messages 3000] [--in-flight 64] [--rounds 2]

Run it from an environment with both clients (aiohttp is not a project dependency unless the
spike says it should be); the sandbox runs with the project's `.venv`. Ends with a `RESULT` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
ACCOUNT = "ACwaypostsandbox"
TOKEN = "waypost-sandbox-sms-token"  # noqa: S105  (the sandbox's public default)
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_of(pid: int) -> float:
    """CPU seconds a process has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def form(n: int) -> dict[str, str]:
    return {
        "To": f"+1555{n:07d}",
        "From": "+15005550006",
        "Body": f"Your order {n} has shipped. Track it at https://example.com/t/{n:08d}",
        "StatusCallback": f"http://127.0.0.1:9/v1/sms/status?m=msg-{n:08d}&s=0123456789abcdef",
    }


Post = Callable[[dict[str, str]], Awaitable[int]]


async def run(
    label: str, post: Post, messages: int, in_flight: int, sandbox: int
) -> dict[str, float]:
    gate = asyncio.Semaphore(in_flight)
    failures = 0

    async def one(n: int) -> None:
        nonlocal failures
        async with gate:
            if await post(form(n)) != 201:
                failures += 1

    for n in range(20):  # warm-up: connections opened, code paths hot
        await one(n)
    cpu0, sandbox0, wall0 = time.process_time(), cpu_of(sandbox), time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(messages)))
    wall = time.perf_counter() - wall0
    cpu, sandbox_cpu = time.process_time() - cpu0, cpu_of(sandbox) - sandbox0
    figures = {
        "per_s": messages / wall,
        "client_cpu_ms": cpu * 1000 / messages,
        "sandbox_cpu_ms": sandbox_cpu * 1000 / messages,
        "failures": float(failures),
    }
    print(
        f"  {label:8s} {figures['per_s']:7.1f} sends/s  client {figures['client_cpu_ms']:.3f} ms "
        f"CPU/send  sandbox {figures['sandbox_cpu_ms']:.3f} ms CPU/send  failures {failures}",
        flush=True,
    )
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="http-clients-"))
    http_port = free_port()
    env = {**os.environ, "WAYPOST_SMS_CALLBACK_DELAY": "3600"}
    sandbox = subprocess.Popen(
        [
            str(PROJECT_PYTHON),
            str(ROOT / "deploy/local/sandbox.py"),
            "--host",
            "127.0.0.1",
            "--smtp-port",
            str(free_port()),
            "--http-port",
            str(http_port),
            "--fcm-service-account",
            str(home / "fcm.json"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(home / "sandbox.log").open("w"),
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/messages", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)  # the sandbox is starting; the deadline bounds it
        httpx.post(
            f"{base}/control/latency", json={"seconds": args.latency_ms / 1000}, timeout=10
        ).raise_for_status()
        url = f"{base}/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
        headers = {"Accept": "application/json"}

        # The worker's httpx client: every connection kept alive (as the dispatcher builds it),
        # Basic auth per request, as the adapter posts.
        hx = httpx.AsyncClient(
            timeout=15.0,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )
        hx_auth = httpx.BasicAuth(ACCOUNT, TOKEN)

        async def httpx_post(data: dict[str, str]) -> int:
            answer = await hx.post(url, data=data, auth=hx_auth, headers=headers)
            return answer.status_code

        # aiohttp with a pool of the same size, Basic auth per request.
        ah = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=100),
            timeout=aiohttp.ClientTimeout(total=15.0),
        )
        ah_headers = {**headers, "Authorization": aiohttp.encode_basic_auth(ACCOUNT, TOKEN)}

        async def aiohttp_post(data: dict[str, str]) -> int:
            async with ah.post(url, data=data, headers=ah_headers) as answer:
                await answer.read()
                return answer.status

        results: dict[str, list[dict[str, float]]] = {"httpx": [], "aiohttp": []}
        print(
            f"{args.messages} SMS per run, {args.in_flight} in flight, {args.latency_ms:g} ms "
            f"provider latency, {args.rounds} rounds",
            flush=True,
        )
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", flush=True)
            for label, post in (("httpx", httpx_post), ("aiohttp", aiohttp_post)):
                httpx.post(f"{base}/control/reset", timeout=30).raise_for_status()
                httpx.post(
                    f"{base}/control/latency",
                    json={"seconds": args.latency_ms / 1000},
                    timeout=10,
                ).raise_for_status()
                results[label].append(
                    await run(label, post, args.messages, args.in_flight, sandbox.pid)
                )
        await hx.aclose()
        await ah.close()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=30)

    def best(label: str, key: str, pick: Callable[..., float]) -> float:
        return pick(r[key] for r in results[label])

    hx_rate, ah_rate = best("httpx", "per_s", max), best("aiohttp", "per_s", max)
    hx_cpu = best("httpx", "client_cpu_ms", min)
    ah_cpu = best("aiohttp", "client_cpu_ms", min)
    print(json.dumps(results))
    print(
        f"RESULT httpx_per_s={hx_rate:.1f} aiohttp_per_s={ah_rate:.1f} "
        f"httpx_cpu_ms={hx_cpu:.3f} aiohttp_cpu_ms={ah_cpu:.3f} "
        f"cpu_ratio={ah_cpu / hx_cpu:.3f}"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
