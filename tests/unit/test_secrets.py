"""Services refuse weak secrets outside dev: empty, published, placeholders, too short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.admin.settings import AdminSettings
from services.dispatcher.settings import DispatcherSettings
from services.ingest.settings import IngestSettings
from services.orchestrator.settings import OrchestratorSettings
from services.segmenter.settings import SegmenterSettings
from shared.secrets import Secret, WeakSecrets, provider_credential, require_strong, weakness

ROOT = Path(__file__).resolve().parents[2]
STRONG = "9f1c2b7e4d5a6c8b0e3f1a2d4c6b8e0f9a1c3e5b"  # 40 random-looking bytes
STRONG_2 = "0b8d6f4a2c1e3b5d7f9a0c2e4b6d8f1a3c5e7b9d"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (None, "is empty"),
        ("waypost-dev-link-secret", "is a default published with Waypost"),
        ("wp_dev_admin_key", "is a default published with Waypost"),
        ("CHANGE-ME-long-random-string-of-more-than-32", "looks like a placeholder"),
        ("please-replace-me-with-a-real-secret-value", "looks like a placeholder"),
        ("<your-link-secret-of-at-least-32-bytes>", "looks like a placeholder"),
        ("short-but-random-9f1c2b", "is shorter than 32 bytes"),
    ],
)
def test_a_weak_secret_is_named_with_its_fault(value: str | None, why: str) -> None:
    assert weakness(Secret("WAYPOST_LINK_SECRET", value)) == why


def test_a_long_random_secret_passes() -> None:
    assert weakness(Secret("WAYPOST_LINK_SECRET", STRONG)) is None


def test_a_provider_credential_may_be_short_or_empty_but_not_published() -> None:
    assert weakness(provider_credential("WAYPOST_SMS_AUTH_TOKEN", "a1b2c3")) is None
    assert weakness(provider_credential("WAYPOST_SMS_AUTH_TOKEN", "")) is None  # SMS off
    assert weakness(provider_credential("WAYPOST_SMS_AUTH_TOKEN", "waypost-sandbox-sms-token"))
    assert weakness(provider_credential("WAYPOST_WECHAT_APP_SECRET", "CHANGE-ME"))


def test_production_refuses_naming_every_weak_variable_and_dev_only_logs() -> None:
    weak = [
        Secret("WAYPOST_LINK_SECRET", "waypost-dev-link-secret"),
        Secret("WAYPOST_ADMIN_API_KEYS", "short"),
        Secret("WAYPOST_INGEST_WRITE_KEYS", STRONG),
    ]
    with pytest.raises(WeakSecrets) as refused:
        require_strong("production", weak)
    message = str(refused.value)
    assert "WAYPOST_LINK_SECRET is a default published with Waypost" in message
    assert "WAYPOST_ADMIN_API_KEYS is shorter than 32 bytes" in message
    assert "WAYPOST_INGEST_WRITE_KEYS" not in message
    assert "WAYPOST_ENV=dev" in message
    require_strong("dev", weak)  # logged, not refused


def test_each_service_names_the_secrets_it_uses() -> None:
    ingest = IngestSettings(
        link_secret=SecretStr(STRONG), ingest_write_keys=f"web:{STRONG},app:{STRONG_2}"
    )
    assert [s.variable for s in ingest.secrets()] == [
        "WAYPOST_LINK_SECRET",
        "WAYPOST_INGEST_WRITE_KEYS",
        "WAYPOST_INGEST_WRITE_KEYS",
        "WAYPOST_SMS_AUTH_TOKEN",
    ]
    require_strong("production", ingest.secrets())
    admin = AdminSettings(admin_api_keys=f"{STRONG}, ", admin_audit_secret=STRONG_2)
    assert [(s.variable, s.value) for s in admin.secrets()] == [
        ("WAYPOST_ADMIN_AUDIT_SECRET", STRONG_2),
        ("WAYPOST_ADMIN_API_KEYS (key-1)", STRONG),
    ]
    require_strong("production", admin.secrets())
    no_keys = AdminSettings(admin_api_keys=" , ", admin_audit_secret=STRONG_2)
    assert [s.value for s in no_keys.secrets()] == [STRONG_2, ""]
    dispatcher = DispatcherSettings(
        link_secret=SecretStr(STRONG),
        suppression_secret=SecretStr(STRONG),
        smtp_username="mailer",
    )
    assert [s.variable for s in dispatcher.secrets()] == [
        "WAYPOST_LINK_SECRET",
        "WAYPOST_SUPPRESSION_SECRET",
        "WAYPOST_SMS_AUTH_TOKEN",
        "WAYPOST_WECHAT_APP_SECRET",
        "WAYPOST_SMTP_PASSWORD",
    ]
    require_strong("production", dispatcher.secrets())  # unset providers: channels off
    orchestrator = OrchestratorSettings(coupon_secret=SecretStr(STRONG))
    assert [s.variable for s in orchestrator.secrets()] == ["WAYPOST_COUPON_SECRET"]
    require_strong("production", orchestrator.secrets())
    segmenter = SegmenterSettings(erasure_secret=SecretStr(STRONG))
    assert [s.variable for s in segmenter.secrets()] == ["WAYPOST_ERASURE_SECRET"]
    require_strong("production", segmenter.secrets())


def test_the_defaults_are_refused_in_production() -> None:
    for settings in (
        IngestSettings(),
        AdminSettings(),
        DispatcherSettings(),
        OrchestratorSettings(),
        SegmenterSettings(),
    ):
        with pytest.raises(WeakSecrets):
            require_strong("production", settings.secrets())


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "is a default published with Waypost"),  # the setting's own default
        ("change-me-dev-coupon-secret", "is a default published with Waypost"),  # compose's
        ("9f1c2b7e4d5a6c8b0e3f", "is shorter than 32 bytes"),
    ],
)
def test_the_orchestrator_refuses_a_weak_coupon_secret(value: str | None, why: str) -> None:
    settings = (
        OrchestratorSettings() if value is None else OrchestratorSettings(coupon_secret=value)
    )
    with pytest.raises(WeakSecrets, match=f"WAYPOST_COUPON_SECRET {why}"):
        require_strong("production", settings.secrets())
    require_strong("dev", settings.secrets())  # the local stack and the tests run on it


def test_the_admin_refuses_its_default_audit_secret_in_production() -> None:
    admin = AdminSettings(admin_api_keys=STRONG)

    with pytest.raises(WeakSecrets, match="WAYPOST_ADMIN_AUDIT_SECRET is a default published"):
        require_strong("production", admin.secrets())
    require_strong("dev", admin.secrets())  # the local stack and the tests run on it


@pytest.mark.parametrize("service", ["ingest", "admin", "dispatcher", "orchestrator", "segmenter"])
def test_a_service_started_on_published_defaults_exits_before_it_serves(service: str) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("WAYPOST_") and key != "PYTHONPATH"
    }
    env |= {"WAYPOST_ENV": "production", "WAYPOST_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert '"event": "secrets.refused"' in done.stdout + done.stderr
    assert "refusing to start" in done.stdout + done.stderr


def test_write_keys_stay_out_of_the_ingest_settings_repr() -> None:
    settings = IngestSettings(ingest_write_keys=f"web:{STRONG},app:{STRONG_2}")

    shown = f"{settings!r} {settings} {settings.model_dump()}"
    assert STRONG not in shown
    assert STRONG_2 not in shown
    assert settings.write_keys() == {STRONG: "web", STRONG_2: "app"}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "is a default published with Waypost"),  # the setting's own default
        ("change-me-dev-erasure-secret", "is a default published with Waypost"),  # compose's
        ("9f1c2b7e4d5a6c8b0e3f", "is shorter than 32 bytes"),
    ],
)
def test_the_segmenter_refuses_a_weak_erasure_secret(value: str | None, why: str) -> None:
    settings = SegmenterSettings() if value is None else SegmenterSettings(erasure_secret=value)
    with pytest.raises(WeakSecrets, match=f"WAYPOST_ERASURE_SECRET {why}"):
        require_strong("production", settings.secrets())
    require_strong("dev", settings.secrets())  # the local stack and the tests run on it
    assert value is None or value not in repr(settings)


def test_the_document_store_url_keeps_its_credentials_out_of_messages() -> None:
    from shared.settings import CommonSettings

    settings = CommonSettings(mongo_url="mongodb://waypost:hunter2@mongo.internal:27017/?tls=true")
    assert "hunter2" not in repr(settings)
    assert settings.redacted_mongo_url() == "mongodb://mongo.internal:27017/"
    assert settings.mongo_url.get_secret_value().endswith("?tls=true")
