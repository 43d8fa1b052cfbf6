"""Email over SMTP (aiosmtplib): MIME text + HTML, deterministic Message-ID, classified replies."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.domain.rendering import RenderedEmail
from services.dispatcher.settings import DispatcherSettings


class SmtpSender:
    """One SMTP submission per message; a fresh connection keeps failures contained."""

    def __init__(self, settings: DispatcherSettings) -> None:
        self._settings = settings

    def compose(self, message_id: str, to: str, email: RenderedEmail) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self._settings.email_from
        msg["To"] = to
        msg["Subject"] = email.subject
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = f"<{message_id}@{self._settings.message_id_domain}>"
        msg["X-Waypost-Message-Id"] = message_id
        msg.set_content(email.text)
        if email.html:
            msg.add_alternative(email.html, subtype="html")
        return msg

    async def send(self, message_id: str, to: str, email: RenderedEmail) -> Outcome:
        settings = self._settings
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        try:
            await aiosmtplib.send(
                self.compose(message_id, to, email),
                hostname=settings.smtp_host,
                port=settings.smtp_port,
                username=settings.smtp_username,
                password=password,
                start_tls=settings.smtp_starttls,
                use_tls=settings.smtp_use_tls,
                timeout=settings.smtp_timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            return _by_code(min(codes) if codes else 550, str(exc))
        except aiosmtplib.SMTPResponseException as exc:
            return _by_code(exc.code, exc.message)
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPConnectTimeoutError) as exc:
            return Outcome("retry", f"smtp connect: {exc}")
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            return Outcome("retry", f"smtp disconnected: {exc}")
        return Outcome("sent", provider_id=message_id)


def _by_code(code: int, message: str) -> Outcome:
    if 400 <= code < 500:
        return Outcome("retry", f"smtp {code}: {message}")
    return Outcome("recipient", f"smtp {code}: {message}", code=str(code))
