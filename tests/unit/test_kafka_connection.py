"""Connecting to a secured Kafka cluster: settings checked at start and named by their variable,
the librdkafka settings every client starts from, and a SASL password kept out of reprs, errors
and logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from services.admin.settings import AdminSettings
from services.dispatcher.settings import DispatcherSettings
from services.ingest.settings import IngestSettings
from services.orchestrator.settings import OrchestratorSettings
from services.segmenter.settings import SegmenterSettings
from shared.kafka_connection import KafkaConnection, client_config
from shared.secrets import WeakSecrets, require_strong
from shared.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Zq7-kafka-pw-41"  # any length the cluster gives
SASL = {
    "WAYPOST_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "WAYPOST_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "WAYPOST_KAFKA_SASL_USERNAME": "waypost",
    "WAYPOST_KAFKA_SASL_PASSWORD": PASSWORD,
}


@pytest.fixture(autouse=True)
def _no_waypost_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in os.environ:
        if key.startswith("WAYPOST_"):
            monkeypatch.delenv(key)


def _settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> CommonSettings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return CommonSettings()


def _refusal(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    with pytest.raises(ValidationError) as refused:
        _settings_from(monkeypatch, env)
    return str(refused.value)


def test_plaintext_is_the_default_and_only_names_the_bootstrap() -> None:
    settings = CommonSettings(kafka_bootstrap="kafka:9092")
    assert settings.kafka() == KafkaConnection("kafka:9092")
    assert settings.kafka().config() == {"bootstrap.servers": "kafka:9092"}
    assert client_config("127.0.0.1:1") == {"bootstrap.servers": "127.0.0.1:1"}
    assert settings.secrets() == []


def test_sasl_over_tls_with_mutual_tls_gives_librdkafka_every_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("PEM")
    settings = _settings_from(
        monkeypatch,
        {
            **SASL,
            "WAYPOST_KAFKA_BOOTSTRAP": "b1:9093,b2:9093",
            "WAYPOST_KAFKA_SSL_CA_LOCATION": str(tmp_path / "ca.pem"),
            "WAYPOST_KAFKA_SSL_CERTIFICATE_LOCATION": str(tmp_path / "client.pem"),
            "WAYPOST_KAFKA_SSL_KEY_LOCATION": str(tmp_path / "client.key"),
            "WAYPOST_KAFKA_SSL_KEY_PASSWORD": "key-pw-8d2",
        },
    )
    assert settings.kafka().config() == {
        "bootstrap.servers": "b1:9093,b2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "waypost",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.certificate.location": str(tmp_path / "client.pem"),
        "ssl.key.location": str(tmp_path / "client.key"),
        "ssl.key.password": "key-pw-8d2",
    }


def test_tls_alone_needs_no_credentials_and_lower_case_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings_from(monkeypatch, {"WAYPOST_KAFKA_SECURITY_PROTOCOL": "ssl"})
    assert settings.kafka().config() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "SSL",  # the system's trusted CAs verify the brokers
    }


def test_empty_variables_mean_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(
        monkeypatch,
        {"WAYPOST_KAFKA_SASL_PASSWORD": "", "WAYPOST_KAFKA_SSL_CA_LOCATION": ""},
    )
    assert settings.kafka() == KafkaConnection("127.0.0.1:9092")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"WAYPOST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
            [
                "WAYPOST_KAFKA_SASL_MECHANISM must be set with "
                "WAYPOST_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
                "WAYPOST_KAFKA_SASL_USERNAME must be set",
                "WAYPOST_KAFKA_SASL_PASSWORD must be set",
            ],
        ),
        (
            {**SASL, "WAYPOST_KAFKA_SASL_PASSWORD": ""},
            ["WAYPOST_KAFKA_SASL_PASSWORD must be set with WAYPOST_KAFKA_SECURITY_PROTOCOL"],
        ),
        (
            {"WAYPOST_KAFKA_SASL_MECHANISM": "PLAIN"},
            [
                "WAYPOST_KAFKA_SASL_MECHANISM is set, but "
                "WAYPOST_KAFKA_SECURITY_PROTOCOL=PLAINTEXT uses no SASL"
            ],
        ),
        (
            {"WAYPOST_KAFKA_SECURITY_PROTOCOL": "SSL", "WAYPOST_KAFKA_SASL_USERNAME": "waypost"},
            ["WAYPOST_KAFKA_SASL_USERNAME is set, but WAYPOST_KAFKA_SECURITY_PROTOCOL=SSL"],
        ),
        (
            {**SASL, "WAYPOST_KAFKA_SSL_CA_LOCATION": "/nowhere/ca.pem"},
            ["WAYPOST_KAFKA_SSL_CA_LOCATION: no such file /nowhere/ca.pem"],
        ),
        (
            {**SASL, "WAYPOST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
            | {"WAYPOST_KAFKA_SSL_CA_LOCATION": "/etc/hostname"},
            ["WAYPOST_KAFKA_SSL_CA_LOCATION is set, but"],
        ),
        (
            {"WAYPOST_KAFKA_SECURITY_PROTOCOL": "SSL"}
            | {"WAYPOST_KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/hostname"},
            [
                "WAYPOST_KAFKA_SSL_CERTIFICATE_LOCATION and WAYPOST_KAFKA_SSL_KEY_LOCATION go "
                "together"
            ],
        ),
        (
            {"WAYPOST_KAFKA_SECURITY_PROTOCOL": "SSL", "WAYPOST_KAFKA_SSL_KEY_PASSWORD": "k"},
            ["WAYPOST_KAFKA_SSL_KEY_PASSWORD is set without WAYPOST_KAFKA_SSL_KEY_LOCATION"],
        ),
        ({"WAYPOST_KAFKA_SECURITY_PROTOCOL": "TLS"}, ["kafka_security_protocol"]),
        ({**SASL, "WAYPOST_KAFKA_SASL_MECHANISM": "GSSAPI"}, ["kafka_sasl_mechanism"]),
    ],
)
def test_a_setting_that_cannot_connect_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: list[str]
) -> None:
    message = _refusal(monkeypatch, env)
    for text in named:
        assert text in message


def test_the_password_stays_out_of_reprs_strings_and_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _settings_from(monkeypatch, SASL)
    connection = settings.kafka()
    assert str(connection) == "SASL_SSL://127.0.0.1:9092 as waypost (SCRAM-SHA-512)"
    for shown in (repr(connection), str(connection), repr(settings), str(settings)):
        assert PASSWORD not in shown
    # A refused setting's error names the variables, never the values given.
    message = _refusal(monkeypatch, {**SASL, "WAYPOST_KAFKA_SSL_CA_LOCATION": "/nowhere"})
    assert "WAYPOST_KAFKA_SSL_CA_LOCATION" in message
    assert PASSWORD not in message
    with pytest.raises(ValueError, match="WAYPOST_KAFKA_SASL_USERNAME") as direct:
        KafkaConnection("b:9092", "SASL_SSL", "PLAIN", None, SecretStr(PASSWORD))
    assert PASSWORD not in str(direct.value)


@pytest.mark.parametrize(
    "settings_class",
    [
        IngestSettings,
        AdminSettings,
        DispatcherSettings,
        SegmenterSettings,
        OrchestratorSettings,
    ],
)
def test_every_service_names_the_sasl_password_among_its_secrets(
    monkeypatch: pytest.MonkeyPatch, settings_class: type[CommonSettings]
) -> None:
    for key, value in SASL.items():
        monkeypatch.setenv(key, value)
    secrets = {s.variable: s.value for s in settings_class().secrets()}
    assert secrets["WAYPOST_KAFKA_SASL_PASSWORD"] == PASSWORD
    monkeypatch.setenv("WAYPOST_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    for key in ("MECHANISM", "USERNAME", "PASSWORD"):
        monkeypatch.delenv(f"WAYPOST_KAFKA_SASL_{key}")
    assert "WAYPOST_KAFKA_SASL_PASSWORD" not in {s.variable for s in settings_class().secrets()}


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("waypost-dev-kafka-password", "is a default published with Waypost"),
        ("change-me", "looks like a placeholder"),
    ],
)
def test_a_published_or_placeholder_sasl_password_is_refused_outside_dev(
    password: str, why: str
) -> None:
    settings = SegmenterSettings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="waypost",
        kafka_sasl_password=SecretStr(password),
        erasure_secret=SecretStr("0b8d6f4a2c1e3b5d7f9a0c2e4b6d8f1a3c5e7b9d"),  # its own: strong
    )
    with pytest.raises(WeakSecrets, match=f"WAYPOST_KAFKA_SASL_PASSWORD {why}"):
        require_strong("production", settings.secrets())
    require_strong("dev", settings.secrets())  # logged, not refused
    short = settings.model_copy(update={"kafka_sasl_password": SecretStr("k3y")})
    require_strong("production", short.secrets())  # its length is the cluster's business


def _start(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("WAYPOST_") and key != "PYTHONPATH"
    }
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        cwd=ROOT,
        env=base | {"WAYPOST_KAFKA_BOOTSTRAP": "127.0.0.1:1"} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_service_refusing_its_kafka_settings_logs_no_password() -> None:
    placeholder = "change-me-kafka-password-Q81"
    refused = _start(
        "segmenter",
        {**SASL, "WAYPOST_ENV": "production", "WAYPOST_KAFKA_SASL_PASSWORD": placeholder}
        | {"WAYPOST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-2000:]
    assert "WAYPOST_KAFKA_SASL_PASSWORD looks like a placeholder" in output
    assert placeholder not in output
    invalid = _start("segmenter", {**SASL, "WAYPOST_KAFKA_SSL_CA_LOCATION": "/nowhere/ca.pem"})
    output = invalid.stdout + invalid.stderr
    assert invalid.returncode != 0
    assert "WAYPOST_KAFKA_SSL_CA_LOCATION: no such file /nowhere/ca.pem" in output
    assert PASSWORD not in output
