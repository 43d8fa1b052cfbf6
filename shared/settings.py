"""Settings every service shares, read from `WAYPOST_*` environment variables.

Build them once in a service's `__main__` and pass them down; never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypedDict
from urllib.parse import urlsplit, urlunsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.event_loop import EventLoop
from shared.kafka_connection import (
    SASL_PROTOCOLS,
    KafkaConnection,
    SaslMechanism,
    SecurityProtocol,
)
from shared.profiles import ProfileLimits
from shared.secrets import Secret

_LIMITS = ProfileLimits()


def _blank_is_unset(value: object) -> object:
    return None if value == "" else value  # a manifest's optional setting left blank


# A switch that may be left unset (None: the service decides, e.g. by `WAYPOST_ENV`); an empty
# value counts as unset.
OptionalSwitch = Annotated[bool | None, BeforeValidator(_blank_is_unset)]


class CommonSettings(BaseSettings):
    """Kafka, document store and logging: what every service needs."""

    # A value that fails validation is left out of the error: it may be a password or a URL
    # with credentials, and the error ends up in the service's log.
    model_config = SettingsConfigDict(
        env_prefix="WAYPOST_", extra="ignore", hide_input_in_errors=True
    )

    # "dev" (the local stack, the demo, the tests) lets a service start with weak or published
    # secrets, which it only logs; anything else refuses them (`shared.secrets`).
    env: Literal["production", "dev"] = "production"

    kafka_bootstrap: str = "127.0.0.1:9092"
    # A secured cluster: TLS (SSL), SASL, or both (SASL_SSL). Checked at start, every problem
    # named by its variable; every Kafka client is built from `kafka()`.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: Path | None = None
    kafka_ssl_certificate_location: Path | None = None
    kafka_ssl_key_location: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    topic_partitions: int = Field(default=6, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    # May carry the store's credentials: kept out of logs and reprs (`redacted_mongo_url`).
    mongo_url: SecretStr = SecretStr("mongodb://127.0.0.1:27017")
    mongo_db: str = "waypost"
    # The deadline of every document-store call: past it the call fails instead of hanging.
    mongo_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long a document view (profiles, the ledger, recent events, the admin's journey log)
    # gathers its topic's records before one bulk write: a document changed several times
    # within it is written once (`shared.document_view`). The admin shows a change this much
    # later at most. A view's fetch waits this long, and a stopping service gives its views
    # 5 s: hence at most 4. Two seconds hold most of a contact's bursts (a session, then the
    # email it triggered) in one write (docs/document-store.md).
    view_batch_seconds: float = Field(default=2.0, gt=0, le=4)
    log_level: str = "info"
    # JSON lines for operators; "console" for a person at a terminal.
    log_format: Literal["json", "console"] = "json"
    # The services' event loop (`shared/event_loop.py`); ingest's is uvicorn's.
    event_loop: EventLoop = "uvloop"
    data_dir: Path = Path(".local/data")
    # Where contacts reach the ingest service (unsubscribe, open pixel, click and SMS status
    # links), and the secret that signs those links; set both in production.
    public_url: str = "http://127.0.0.1:8000"
    link_secret: SecretStr = SecretStr("waypost-dev-link-secret")
    # What a profile may hold (docs/segments.md, "Profile limits"): ingest refuses a call that
    # alone passes them, the segmenter leaves out what would take a profile past them.
    profile_max_traits: int = Field(default=_LIMITS.max_traits, ge=1)
    profile_max_trait_bytes: int = Field(default=_LIMITS.max_trait_bytes, ge=16)
    profile_max_event_names: int = Field(default=_LIMITS.max_event_names, ge=1)
    profile_max_anonymous_ids: int = Field(default=_LIMITS.max_anonymous_ids, ge=1)

    def redacted_mongo_url(self) -> str:
        """The document store's URL without its user information, for messages."""
        parts = urlsplit(self.mongo_url.get_secret_value())
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    def api_docs_on(self, choice: bool | None) -> bool:
        """Whether an HTTP service serves its interactive docs and OpenAPI document: as set, or
        when unset only in dev (they map every route for whoever reaches the port)."""
        return self.env == "dev" if choice is None else choice

    def kafka(self) -> KafkaConnection:
        """How this service's Kafka clients reach the cluster."""
        return KafkaConnection(
            bootstrap=self.kafka_bootstrap,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password,
            ssl_ca_location=self.kafka_ssl_ca_location,
            ssl_certificate_location=self.kafka_ssl_certificate_location,
            ssl_key_location=self.kafka_ssl_key_location,
            ssl_key_password=self.kafka_ssl_key_password,
        )

    def secrets(self) -> list[Secret]:
        """The secrets this service uses (checked at its start): here Kafka's credentials, when
        the cluster asks for them; each service adds its own."""
        # Their length is the cluster's business, like a provider's credential; but never empty
        # or a placeholder.
        used: list[Secret] = []
        if self.kafka_security_protocol in SASL_PROTOCOLS:
            password = self.kafka_sasl_password
            used.append(
                Secret(
                    "WAYPOST_KAFKA_SASL_PASSWORD",
                    password.get_secret_value() if password else None,
                    min_bytes=0,
                )
            )
        if self.kafka_ssl_key_password is not None:
            used.append(
                Secret(
                    "WAYPOST_KAFKA_SSL_KEY_PASSWORD",
                    self.kafka_ssl_key_password.get_secret_value(),
                    min_bytes=0,
                )
            )
        return used

    def profile_limits(self) -> ProfileLimits:
        return ProfileLimits(
            max_traits=self.profile_max_traits,
            max_trait_bytes=self.profile_max_trait_bytes,
            max_event_names=self.profile_max_event_names,
            max_anonymous_ids=self.profile_max_anonymous_ids,
        )

    @field_validator("log_level")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("event_loop", mode="before")
    @classmethod
    def _loop_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_ca_location",
        "kafka_ssl_certificate_location",
        "kafka_ssl_key_location",
        "kafka_ssl_key_password",
        mode="before",
    )
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        # An empty variable (a manifest's optional secret left blank) means not set.
        return None if value == "" else value

    @model_validator(mode="after")
    def _kafka_connects(self) -> CommonSettings:
        self.kafka()  # raises, naming every WAYPOST_KAFKA_* variable at fault
        return self


class ApiDocsUrls(TypedDict):
    openapi_url: str | None
    docs_url: str | None
    redoc_url: str | None


def api_docs_urls(on: bool) -> ApiDocsUrls:
    """FastAPI's arguments for `/openapi.json`, `/docs` and `/redoc`: all served, or none."""
    if on:
        return ApiDocsUrls(openapi_url="/openapi.json", docs_url="/docs", redoc_url="/redoc")
    return ApiDocsUrls(openapi_url=None, docs_url=None, redoc_url=None)


class StreamSettings(CommonSettings):
    """What a stream worker (segmenter, orchestrator) adds: its batches."""

    # A batch is up to this many records, or what arrived within this many milliseconds: its
    # outputs are acknowledged once, then its rows stored, then its offsets committed.
    batch_max_records: int = Field(default=500, ge=1)
    batch_max_ms: float = Field(default=20.0, gt=0)
    # Transactional workers only: a stable name per replica (a StatefulSet's pod name, say)
    # lets a restarted worker abort what it left open at once; empty: host and process id.
    worker_id: str = ""
    # How long a transaction a crashed worker left open holds up its partitions' readers.
    transaction_timeout_ms: int = Field(default=20_000, ge=1_000)
