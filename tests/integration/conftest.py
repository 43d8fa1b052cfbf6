"""Integration fixtures: the provider sandbox (SMTP + outbox + SMS/FCM/WeChat/email events APIs)
as a process.

The sandbox runs as a real subprocess on ports chosen by the OS, so these tests talk to it over
real sockets exactly like the dispatcher does, and never collide with a running local stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.dispatcher.channels.http import ProviderClient
from tests.integration.providers import RequestLog

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_SCRIPT = ROOT / "deploy" / "local" / "sandbox.py"
READY = re.compile(
    # up to the newline, so a line still being written is never taken for a whole one
    r"waypost sandbox ready: smtp=(?P<host>[^:\s]+):(?P<smtp>\d+) http=(?P<http>\S+)\n"
)
START_TIMEOUT = 30.0

# The credentials the session sandbox is started with (the sandbox's own defaults, passed
# explicitly so a WAYPOST_* variable in the developer's shell cannot change them).
SMS_ACCOUNT_SID = "ACwaypostsandbox"
SMS_AUTH_TOKEN = "waypost-sandbox-sms-token"
WECHAT_APP_ID = "wxwaypostsandbox"
WECHAT_APP_SECRET = "waypost-sandbox-wechat-secret"
EMAIL_EVENTS_API_KEY = "waypost-sandbox-email-events-key"


@dataclass(frozen=True)
class SandboxInfo:
    """Where a running sandbox listens, the credentials it accepts, and its control API."""

    http_url: str
    smtp_port: int
    fcm_service_account_file: Path
    fcm_project: str
    sms_account_sid: str
    sms_auth_token: str
    wechat_app_id: str
    wechat_app_secret: str
    email_events_api_key: str

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, f"{self.http_url}{path}", timeout=10.0, **kwargs)
        if response.is_error:  # say what the sandbox objected to, not just the status
            raise httpx.HTTPStatusError(
                f"{method} {path} -> {response.status_code}: {response.text}",
                request=response.request,
                response=response,
            )
        return response

    def messages(self, channel: str | None = None, to: str | None = None) -> list[dict[str, Any]]:
        """Outbox records, oldest first, optionally filtered by channel and recipient."""
        params = {key: value for key, value in (("channel", channel), ("to", to)) if value}
        found: list[dict[str, Any]] = self._request("GET", "/messages", params=params).json()[
            "messages"
        ]
        return found

    def fail(self, **rule: Any) -> None:
        """Add a failure rule: channel, recipient, error, and optionally retry_after, seconds,
        times (see POST /control/failures)."""
        self._request("POST", "/control/failures", json=rule)

    def reset(self) -> None:
        """Forget messages, failure rules, latency, SMTP refusals and issued provider tokens."""
        self._request("POST", "/control/reset")

    # -- conveniences beyond the shared contract ------------------------------------------

    def failures(self) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = self._request("GET", "/control/failures").json()["rules"]
        return rules

    def set_latency(self, seconds: float) -> None:
        """Delay every provider API answer (SMS, FCM, WeChat sends and tokens, email events)
        by `seconds`."""
        self._request("POST", "/control/latency", json={"seconds": seconds})

    def revoke_fcm_tokens(self) -> None:
        self._request("POST", "/control/fcm/revoke")

    def wechat_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._request("GET", "/control/wechat").json()
        return status

    def wait_messages(
        self,
        channel: str | None = None,
        to: str | None = None,
        *,
        count: int = 1,
        timeout: float = 10.0,
        where: Callable[[list[dict[str, Any]]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Poll the outbox until at least `count` records match (and `where` holds, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(channel, to)
            if len(found) >= count and (where is None or where(found)):
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"outbox: wanted {count} {channel or 'any'} message(s) to {to or 'anyone'} "
                    f"within {timeout}s; have {json.dumps(found)[:2000]}"
                )
            time.sleep(0.05)  # poll again; the deadline above bounds the whole wait


def _output(log_file: Path) -> str:
    try:
        return log_file.read_text(errors="replace")
    except OSError:
        return ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def running_sandbox(
    workdir: Path,
    extra_args: Sequence[str] = (),
    *,
    sms_account_sid: str = SMS_ACCOUNT_SID,
    sms_auth_token: str = SMS_AUTH_TOKEN,
    wechat_app_id: str = WECHAT_APP_ID,
    wechat_app_secret: str = WECHAT_APP_SECRET,
    email_events_api_key: str = EMAIL_EVENTS_API_KEY,
) -> Iterator[SandboxInfo]:
    """Start deploy/local/sandbox.py on free ports, wait for its ready line, stop it after.

    Its output goes to `workdir`/sandbox.log (a file, not a pipe, so a chatty sandbox can never
    block on a full pipe); a start failure shows that output.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    account_file = workdir / "fcm-service-account.json"
    log_file = workdir / "sandbox.log"
    command = [
        sys.executable,
        str(SANDBOX_SCRIPT),
        "--host",
        "127.0.0.1",
        "--smtp-port",
        "0",
        "--http-port",
        "0",
        "--log-level",
        "info",
        "--fcm-service-account",
        str(account_file),
        "--sms-account-sid",
        sms_account_sid,
        "--sms-auth-token",
        sms_auth_token,
        "--wechat-app-id",
        wechat_app_id,
        "--wechat-app-secret",
        wechat_app_secret,
        "--email-events-api-key",
        email_events_api_key,
        *extra_args,
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAYPOST_")}
    env["PYTHONUNBUFFERED"] = "1"
    with log_file.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            found = READY.search(_output(log_file))
            if found is not None:
                break
            if process.poll() is not None:
                pytest.fail(
                    f"sandbox exited with {process.returncode} before it was ready:\n"
                    f"{_output(log_file)}"
                )
            if time.monotonic() >= deadline:
                pytest.fail(f"sandbox not ready within {START_TIMEOUT}s:\n{_output(log_file)}")
            time.sleep(0.05)  # poll again; the deadline above bounds the whole wait
        account = json.loads(account_file.read_text())
        yield SandboxInfo(
            http_url=found["http"].rstrip("/"),
            smtp_port=int(found["smtp"]),
            fcm_service_account_file=account_file,
            fcm_project=str(account["project_id"]),
            sms_account_sid=sms_account_sid,
            sms_auth_token=sms_auth_token,
            wechat_app_id=wechat_app_id,
            wechat_app_secret=wechat_app_secret,
            email_events_api_key=email_events_api_key,
        )
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxInfo]:
    """One provider sandbox process for the whole test session."""
    with running_sandbox(tmp_path_factory.mktemp("sandbox")) as info:
        yield info


@pytest.fixture
def clean_sandbox(sandbox: SandboxInfo) -> SandboxInfo:
    """The session sandbox, emptied: no messages, failure rules, latency or issued tokens."""
    sandbox.reset()
    return sandbox


@pytest.fixture
def requests() -> RequestLog:
    return RequestLog()


@pytest.fixture
async def http(requests: RequestLog) -> AsyncIterator[ProviderClient]:
    """The dispatcher's provider client, logging every request's path."""
    client = ProviderClient(max_connections=16, timeout=10.0, trace_configs=[requests.trace])
    try:
        yield client
    finally:
        await client.aclose()
