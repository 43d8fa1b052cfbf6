"""SMS through a Twilio-style REST API."""

from __future__ import annotations

from services.dispatcher.channels import ChannelKit
from services.dispatcher.channels.sms.adapter import SmsSender
from services.dispatcher.channels.sms.domain import render

KIT = ChannelKit("sms", render, lambda settings, _clock, http: SmsSender(settings, http))
