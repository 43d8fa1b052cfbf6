"""The provider sandbox over real sockets: SMS, FCM, WeChat and injected failures."""

from __future__ import annotations

from tests.integration.conftest import SandboxInfo


def test_the_sandbox_starts_empty(clean_sandbox: SandboxInfo) -> None:
    assert clean_sandbox.messages() == []
    assert clean_sandbox.fcm_project == "waypost-sandbox"
    assert clean_sandbox.fcm_service_account_file.exists()
