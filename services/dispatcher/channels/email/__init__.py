"""Email over SMTP (aiosmtplib), with pooled sessions."""

from __future__ import annotations

from services.dispatcher.channels import ChannelKit
from services.dispatcher.channels.email.adapter import SmtpSender
from services.dispatcher.channels.email.domain import render

KIT = ChannelKit("email", render, lambda settings, clock, _http: SmtpSender(settings, clock))
