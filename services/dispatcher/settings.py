"""Dispatcher settings: providers, delivery policy, retries (all from `WAYPOST_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from shared.contracts import Channel
from shared.secrets import Secret, provider_credential
from shared.settings import StreamSettings

DEV_SUPPRESSION_SECRET = "waypost-dev-suppression-secret"  # noqa: S105


class FrequencyCap(BaseModel):
    """At most `per_day` sends per calendar day in the contact's time zone, and at most
    `per_window` sends in any rolling `window` (a duration such as `7d`), per channel."""

    per_day: int | None = Field(default=None, ge=0)
    per_window: int | None = Field(default=None, ge=0)
    window: str | None = None


# SMS and push calls in flight by default, per `max_in_flight`: a try holds its slot while its
# `sending` mark is made durable and for the provider's answer, 0.21 to 0.28 s at 50 ms of
# provider latency when a round of the batch's commit made marks durable (`bench/dispatch.py`'s
# step table; about 0.19 s with intents, docs/delivery.md), so 1,000 sends/s would take about
# 250 slots. The default stays at 192: with 256, SMS and push sent 15 to 33 % more in the bench,
# but the busier worker left twice the emails `unknown` in one of the chaos bench's seeds
# (docs/delivery.md).
# A kill leaves `unknown` the calls then on the wire (the rate times the provider's latency);
# SMS asks its provider about those. Email keeps the common limit: each slot is an SMTP session.
HTTP_IN_FLIGHT_FACTOR = 3
HTTP_SCALED: frozenset[str] = frozenset({"sms", "push"})


class DispatcherSettings(StreamSettings):
    # The worker's consumer group, and the prefix of its tables' changelogs.
    app_id: str = "waypost-dispatcher"
    # Provider calls in flight per channel per worker (a batch's tries beyond it queue for a
    # slot of their channel): size it to the rate wanted times the time a try holds its slot,
    # the provider's latency plus making its `sending` mark durable (docs/delivery.md). Each
    # channel has slots of its own, so a slow provider never holds back another channel's sends.
    max_in_flight: int = Field(default=64, ge=1)
    # A channel's own limit (unset: `max_in_flight`, and three times that for SMS and push,
    # whose provider calls are short HTTP requests; see `HTTP_IN_FLIGHT_FACTOR`).
    max_in_flight_email: int | None = Field(default=None, ge=1)
    max_in_flight_sms: int | None = Field(default=None, ge=1)
    max_in_flight_push: int | None = Field(default=None, ge=1)
    max_in_flight_wechat: int | None = Field(default=None, ge=1)
    # A batch's transaction stays open while its tries call the providers, so it must outlast
    # a batch of slow calls; a worker restarted under the same `worker_id` aborts what its
    # predecessor left open at once, otherwise readers of its outputs wait up to this long.
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000)
    # Document-store operations in flight per worker: many sends share a few connections, and
    # the rest wait in the client, not in the store.
    store_connections: int = Field(default=8, ge=1)
    send_attempts: int = Field(default=5, ge=1)
    # Retry delay classes (seconds): one retry topic each; attempt n waits in class min(n, 3).
    retry_short_seconds: float = Field(default=5.0, gt=0)
    retry_medium_seconds: float = Field(default=60.0, gt=0)
    retry_long_seconds: float = Field(default=900.0, gt=0)
    # How long a configuration error (bad credentials, bad template id) pauses its channel.
    provider_pause_seconds: float = Field(default=60.0, gt=0)
    provider_timeout_seconds: float = Field(default=15.0, gt=0)
    # Idle HTTP connections to the providers (SMS, push, WeChat) are closed after this long:
    # keep it under the providers' own idle timeout (5 s for uvicorn, Node and Apache), or a
    # busy worker may send into a connection the provider already dropped and get no answer.
    http_keepalive_seconds: float = Field(default=4.0, gt=0)
    # Provider rate limits, messages per second per worker (0 = unlimited).
    rate_email: float = Field(default=0.0, ge=0)
    rate_sms: float = Field(default=0.0, ge=0)
    rate_push: float = Field(default=0.0, ge=0)
    rate_wechat: float = Field(default=0.0, ge=0)
    # Caps by channel, JSON: {"email": {"per_day": 3, "per_window": 9, "window": "7d"}}
    frequency_caps: dict[str, FrequencyCap] = Field(default_factory=dict)
    default_timezone: str = "UTC"
    # Keys the suppression list (an HMAC of channel and address, never the address itself);
    # the same in every replica, and kept: a new secret starts an empty list.
    suppression_secret: SecretStr = SecretStr(DEV_SUPPRESSION_SECRET)
    # Prometheus metrics (0 = not served).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0)

    # Email over SMTP
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_use_tls: bool = False
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    # SMTP sessions kept open and reused (unset: one per send in flight, `max_in_flight`).
    # They open on demand, so a quiet worker holds few; a provider that limits concurrent
    # connections per client wants this at or below its limit.
    smtp_connections: int | None = Field(default=None, ge=1)
    # An idle session older than this is closed rather than reused: servers drop idle clients
    # (Postfix after 300 s, many providers sooner), and a dropped one costs a failed command.
    smtp_idle_seconds: float = Field(default=10.0, gt=0)
    # MAIL, RCPT and DATA in one write when the server offers PIPELINING (RFC 2920): one
    # round trip per message where there were three. Off: one command at a time, for a server
    # that offers it and gets it wrong.
    smtp_pipelining: bool = True
    # How long the producer of `waypost.send-receipts.v1` (each try's intent before its call,
    # each call's receipt after it) gathers records into one request per partition. With
    # hundreds of tries in flight, 0 sent nearly every record alone, and the broker spent more
    # CPU on those requests than the dispatcher on its tries (docs/delivery.md).
    receipts_linger_ms: float = Field(default=3.0, ge=0, le=50)
    email_from: str = "Waypost <hello@waypost.local>"
    message_id_domain: str = "waypost.local"
    # The provider's events API, asked what became of an email whose SMTP answer never came
    # (a worker stopped mid-send, a timeout after DATA): Mailgun's, as
    # `https://api.mailgun.net/v3/{your sending domain}` (`https://api.eu.mailgun.net/…` in the
    # EU); `/events?message-id=…&event=accepted` is asked with HTTP Basic `api` and the key.
    # Unset: such an email ends `unknown` (marketing) or is sent again (transactional).
    email_events_url: str | None = None
    email_events_api_key: SecretStr | None = None
    # A message the events log does not show proves nothing until this long after the server
    # could last have taken it (the try's start plus `smtp_timeout_seconds`): an events log
    # shows a message some time after it took it, and Mailgun says a poller should trust a page
    # only once it is half an hour old. Asked sooner and not shown, the email is asked about
    # again then, left `sending` meanwhile (a marketing email is sent at most once).
    email_reconcile_settle_seconds: float = Field(default=1800.0, ge=0)
    # When the events API cannot answer (busy or away): asked again this long later, try after
    # try; after the last, a marketing email stays `unknown`. JSON list in the environment.
    email_reconcile_again_seconds: tuple[float, ...] = (30.0, 120.0, 600.0)
    track_opens: bool = True
    track_clicks: bool = True

    # SMS through a Twilio-style REST API
    sms_base_url: str = "http://127.0.0.1:8025"
    sms_account_sid: str = "ACwaypostsandbox"
    sms_auth_token: SecretStr = SecretStr("")
    sms_from: str = "+15005550006"
    sms_messaging_service_sid: str | None = None
    # An SMS without an answer is looked up in the provider's listing of its number; it counts
    # as never arrived when not listed only this long after its request was last writable (its
    # call's end, or when this worker took the partition of a try another worker stopped in): a
    # request still on its way, or not yet read by the provider, would not be listed yet.
    sms_reconcile_settle_seconds: float = Field(default=10.0, ge=0)
    # When that listing cannot be had (the provider busy or away), a marketing SMS is not left
    # unknown at once: the provider is asked again this long later, try after try; after the
    # last, the send stays `unknown`. JSON list in the environment, e.g. `[30, 120, 600]`.
    sms_reconcile_again_seconds: tuple[float, ...] = (30.0, 120.0, 600.0)

    # Push through FCM HTTP v1; the service-account file names its token endpoint (token_uri).
    fcm_base_url: str = "http://127.0.0.1:8025"
    fcm_service_account_file: Path | None = None

    # WeChat Official Account
    wechat_base_url: str = "http://127.0.0.1:8025"
    wechat_app_id: str = "wxwaypostsandbox"
    wechat_app_secret: SecretStr = SecretStr("")

    def in_flight(self, channel: Channel) -> int:
        """The provider calls `channel` may have in flight per worker."""
        own: int | None = getattr(self, f"max_in_flight_{channel}")
        if own is not None:
            return own
        return self.max_in_flight * (HTTP_IN_FLIGHT_FACTOR if channel in HTTP_SCALED else 1)

    def secrets(self) -> list[Secret]:
        used = [
            *super().secrets(),
            Secret("WAYPOST_LINK_SECRET", self.link_secret.get_secret_value()),
            Secret("WAYPOST_SUPPRESSION_SECRET", self.suppression_secret.get_secret_value()),
            provider_credential("WAYPOST_SMS_AUTH_TOKEN", self.sms_auth_token.get_secret_value()),
            provider_credential(
                "WAYPOST_WECHAT_APP_SECRET", self.wechat_app_secret.get_secret_value()
            ),
        ]
        if self.email_events_url:
            key = self.email_events_api_key
            used.append(
                provider_credential(
                    "WAYPOST_EMAIL_EVENTS_API_KEY", key.get_secret_value() if key else None
                )
            )
        if self.smtp_username:
            password = self.smtp_password.get_secret_value() if self.smtp_password else None
            used.append(provider_credential("WAYPOST_SMTP_PASSWORD", password))
        return used

    @model_validator(mode="after")
    def _events_api_has_its_key(self) -> DispatcherSettings:
        key = self.email_events_api_key
        if self.email_events_url and not (key and key.get_secret_value()):
            raise ValueError(
                "WAYPOST_EMAIL_EVENTS_API_KEY is required with WAYPOST_EMAIL_EVENTS_URL (every "
                "query would be refused, and no unanswered email could be reconciled)"
            )
        return self

    @field_validator(
        "fcm_service_account_file",
        "email_events_url",
        "email_events_api_key",
        "smtp_connections",
        "max_in_flight_email",
        "max_in_flight_sms",
        "max_in_flight_push",
        "max_in_flight_wechat",
        mode="before",
    )
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if value == "" else value
