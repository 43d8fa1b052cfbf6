"""Email over SMTP (aiosmtplib): MIME text + HTML, deterministic Message-ID, one-click
unsubscribe headers (RFC 8058), and replies classified into outcome classes."""

from __future__ import annotations

import contextlib
import email.policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib

from services.dispatcher.domain.messages import Delivery, EmailContent
from services.dispatcher.domain.outcomes import Outcome, OutcomeKind
from services.dispatcher.settings import DispatcherSettings
from shared.clock import Clock
from shared.contracts import Channel

# Long headers stay on one line: folding List-Unsubscribe breaks DKIM in some clients.
_UNFOLDED = email.policy.SMTP.clone(max_line_length=998)  # the RFC 5322 line limit


class SmtpSender:
    """One SMTP submission per message; a fresh connection keeps failures contained."""

    channel: Channel = "email"

    def __init__(self, settings: DispatcherSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock

    def compose(self, delivery: Delivery) -> EmailMessage:
        content = delivery.content
        assert isinstance(content, EmailContent)
        msg = EmailMessage(policy=_UNFOLDED)
        msg["From"] = self._settings.email_from
        msg["To"] = delivery.address
        msg["Subject"] = content.subject
        msg["Date"] = format_datetime(self._clock.now())
        msg["Message-ID"] = f"<{delivery.message_id}@{self._settings.message_id_domain}>"
        msg["X-Waypost-Message-Id"] = delivery.message_id
        if content.unsubscribe_url:
            msg["List-Unsubscribe"] = f"<{content.unsubscribe_url}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(content.text)
        if content.html:
            msg.add_alternative(content.html, subtype="html")
        return msg

    def wire(self, message: EmailMessage) -> bytes:
        """The bytes sent in DATA."""
        return message.as_bytes(policy=_UNFOLDED)

    async def send(self, delivery: Delivery) -> Outcome:
        settings = self._settings
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        message = self.compose(delivery)
        raw = self.wire(message)
        sender = parseaddr(settings.email_from)[1]
        client = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=password,
            start_tls=settings.smtp_starttls,
            use_tls=settings.smtp_use_tls,
            timeout=settings.smtp_timeout_seconds,
        )
        data_sent = False
        try:
            await client.connect()
            await client.mail(sender)
            await client.rcpt(delivery.address)
            data_sent = True
            await client.data(raw)
        except aiosmtplib.SMTPAuthenticationError as exc:
            return Outcome("config", f"smtp authentication: {exc.message}", code=str(exc.code))
        except aiosmtplib.SMTPSenderRefused as exc:
            # The server refuses our envelope sender: our configuration, not the recipient.
            if 400 <= exc.code < 500:
                return Outcome("retry", f"smtp {exc.code}: {exc.message}", code=str(exc.code))
            return Outcome("config", f"smtp sender {exc.code}: {exc.message}", code=str(exc.code))
        except aiosmtplib.SMTPResponseException as exc:  # RCPT and DATA refusals among them
            return _by_code(exc.code, exc.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            # Only once DATA went out may the message have arrived.
            kind: OutcomeKind = "unknown" if data_sent else "retry"
            return Outcome(kind, f"smtp connection lost: {exc}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            return Outcome("retry", f"smtp connect: {exc}")
        finally:
            if client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.quit()
        return Outcome("sent", provider_id=message["Message-ID"])


def _by_code(code: int, message: str) -> Outcome:
    if 400 <= code < 500:
        return Outcome("retry", f"smtp {code}: {message}", code=str(code))
    return Outcome("recipient", f"smtp {code}: {message}", code=str(code), address_invalid=True)
