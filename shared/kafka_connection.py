"""How a Kafka client reaches the cluster: the bootstrap servers and, on a secured cluster, TLS and
SASL. Every producer, consumer and admin client of Waypost starts from `client_config`.

Problems are named by the `WAYPOST_KAFKA_*` variable that sets them, since that is where an
operator fixes them; the SASL and key passwords never appear in a repr, a str or a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})


def variable(name: str) -> str:
    """The environment variable that sets a field of `KafkaConnection`."""
    return f"WAYPOST_KAFKA_{name.upper()}"


@dataclass(frozen=True)
class KafkaConnection:
    """Where the cluster is and how to authenticate to it; checked when built (`ValueError`
    naming every variable at fault)."""

    bootstrap: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # PEM files. Without a CA file the system's trusted CAs verify the brokers; a certificate
    # and its key are for clusters that also authenticate clients by TLS (mutual TLS).
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None

    def __post_init__(self) -> None:
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in SASL_PROTOCOLS

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in TLS_PROTOCOLS

    def problems(self) -> list[str]:
        """Every way these settings cannot connect, each naming its variable."""
        protocol = f"{variable('security_protocol')}={self.security_protocol}"
        found: list[str] = []
        sasl_values = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_username": self.sasl_username,
            "sasl_password": _revealed(self.sasl_password),
        }
        for name, value in sasl_values.items():
            if self.uses_sasl and not value:
                found.append(f"{variable(name)} must be set with {protocol}")
            elif not self.uses_sasl and value:
                # Most likely the protocol was forgotten: the client would not authenticate.
                found.append(
                    f"{variable(name)} is set, but {protocol} uses no SASL "
                    "(SASL_SSL or SASL_PLAINTEXT do)"
                )
        files = {
            "ssl_ca_location": self.ssl_ca_location,
            "ssl_certificate_location": self.ssl_certificate_location,
            "ssl_key_location": self.ssl_key_location,
        }
        for name, path in files.items():
            if path is None:
                continue
            if not self.uses_tls:
                found.append(
                    f"{variable(name)} is set, but {protocol} uses no TLS (SSL or SASL_SSL do)"
                )
            elif not path.is_file():
                found.append(f"{variable(name)}: no such file {path}")
        if (self.ssl_certificate_location is None) != (self.ssl_key_location is None):
            found.append(
                f"{variable('ssl_certificate_location')} and {variable('ssl_key_location')} "
                "go together (mutual TLS): set both or neither"
            )
        if _revealed(self.ssl_key_password) and self.ssl_key_location is None:
            found.append(
                f"{variable('ssl_key_password')} is set without {variable('ssl_key_location')}"
            )
        return found

    def config(self) -> dict[str, Any]:
        """The librdkafka settings that reach and authenticate to the cluster; a client adds its
        own (group, acks, ...) to them."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.security_protocol == "PLAINTEXT":
            return config
        config["security.protocol"] = self.security_protocol
        if self.uses_sasl:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = _revealed(self.sasl_password)
        optional = {
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        config.update({key: str(path) for key, path in optional.items() if path is not None})
        if self.ssl_key_password is not None:
            config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return config

    def __str__(self) -> str:
        """For messages: where and as whom, e.g. `SASL_SSL://kafka:9093 as waypost (PLAIN)`."""
        where = f"{self.security_protocol}://{self.bootstrap}"
        if self.uses_sasl:
            return f"{where} as {self.sasl_username} ({self.sasl_mechanism})"
        return where


def client_config(kafka: KafkaConnection | str) -> dict[str, Any]:
    """The connection part of a client's librdkafka settings. A plain string is a PLAINTEXT
    bootstrap list (tests and benchmarks); services pass their settings' `KafkaConnection`."""
    return as_connection(kafka).config()


def as_connection(kafka: KafkaConnection | str) -> KafkaConnection:
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)


def _revealed(secret: SecretStr | None) -> str:
    return secret.get_secret_value() if secret is not None else ""
